//! Closed panes that left the aggregate's memory, through the real rendered dataflow: a
//! checkpoint taken while most slots live only in the arrangement restores into a dataflow that
//! then reads exactly what the original reads, with retention evicting panes that left memory
//! and stragglers reaching them on both sides. And checkpoints requested while the aggregate
//! applies epochs in slices: taken only once every epoch before them is applied, refused when
//! their epoch is already being applied.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::Value;

use sundial_dataflows::features::{assemble, render_with, Epoch, Rendered, Report, StateSnapshot, Tuning};
use sundial_dataflows::read::read_all;
use sundial_dataflows::row::Row;
use sundial_protocol::plan::{Agg, DataflowPlan, FeaturePlan, Field, FieldType, SourcePlan, TimeUnit, Window};
use sundial_protocol::value::Datum;

fn plan() -> DataflowPlan {
    let source = SourcePlan {
        name: "s".into(),
        fields: vec![
            Field { name: "k".into(), ty: FieldType::U64 },
            Field { name: "t".into(), ty: FieldType::I64 },
            Field { name: "v".into(), ty: FieldType::I64 },
        ],
        time: 1,
        time_unit: TimeUnit::Ms,
        allowed_lateness_ms: 300,
        idle_timeout_ms: 60_000,
    };
    let feature = |name: &str, agg, field, window| FeaturePlan {
        name: name.into(),
        agg,
        field,
        window,
        params: Default::default(),
    };
    DataflowPlan {
        name: "d".into(),
        id: 7,
        source,
        key: vec![0],
        filter: None,
        // 20 panes of 1 s retained: evictions happen during the stream.
        retention_ms: Some(16_000),
        features: vec![
            feature("n", Agg::Count, None, Window::Tumbling { size_ms: 1_000 }),
            feature("total", Agg::Sum, Some(2), Window::Hopping { size_ms: 4_000, hop_ms: 1_000 }),
            feature("last", Agg::Last, Some(2), Window::Tumbling { size_ms: 1_000 }),
        ],
    }
}

/// Epoch `e`'s rows: 100 events 10 ms apart from `e * 1000`, every ninth one 1.2-1.5 s behind
/// the epoch's start: in a pane closed (and gone from memory) since the epoch before, as events
/// that ingest accepted against an older watermark reach the aggregate.
fn rows(e: u64) -> Vec<Row> {
    (0..100u64)
        .map(|i| {
            let base = e as i64 * 1_000;
            let t = if i % 9 == 0 { base - 1_200 - (i as i64 * 37 % 300) } else { base + i as i64 * 10 };
            Row { time: t, values: vec![Datum::UInt(i % 23), Datum::Int(t), Datum::Int((i * 7 % 50) as i64)].into() }
        })
        .collect()
}

type Read = Vec<(String, String, Vec<(Option<i64>, Option<i64>, Value, bool)>)>;

fn read(r: &mut Rendered, at: Epoch) -> Read {
    let (wm, now) = (r.watermarks.borrow().at(at), r.watermarks.borrow().now_at(at));
    let mut out = Read::new();
    let layout = std::sync::Arc::clone(&r.layout);
    read_all(&mut r.trace, at, |key, slots| {
        for (name, windows) in assemble(&layout, &slots, wm, now) {
            let windows: Vec<_> = windows.into_iter().map(|w| (w.start, w.end, w.value, w.closed)).collect();
            if !windows.is_empty() {
                out.push((format!("{key:?}"), name, windows));
            }
        }
    })
    .unwrap();
    out
}

/// Panics with the first difference (whole reads are too long to print).
fn same(a: &Read, b: &Read, what: &str) {
    if a != b {
        let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        panic!(
            "{what}: {} against {} keyed features; first difference: {:?} against {:?}",
            a.len(),
            b.len(),
            a.get(i),
            b.get(i)
        );
    }
}

/// Feeds `epochs` to an original dataflow and to one restored from its checkpoint, then checks
/// that both read the same (more than `windows` keyed features) at the last.
fn feed_both_and_compare(
    worker: &mut timely::worker::Worker,
    original: &mut Rendered,
    restored: &mut Rendered,
    epochs: std::ops::RangeInclusive<u64>,
    windows: usize,
    what: &str,
) {
    let last = *epochs.end();
    for e in epochs {
        feed(worker, original, e);
        feed(worker, restored, e);
    }
    let (a, b) = (read(original, last), read(restored, last));
    assert!(a.len() > windows, "{} windows", a.len());
    same(&a, &b, what);
}

/// Feeds epoch `e` and steps until it is complete.
fn feed(worker: &mut timely::worker::Worker, r: &mut Rendered, e: u64) {
    send(r, e);
    worker.step_while(|| r.probe.less_equal(&e));
}

/// Sends epoch `e`'s rows and report and closes the epoch, without stepping.
fn send(r: &mut Rendered, e: u64) {
    r.rows.advance_to(e);
    r.reports.advance_to(e);
    let batch = rows(e);
    let max = batch.iter().map(|row| row.time).max();
    r.rows.send(std::sync::Arc::new(batch));
    r.reports.send(Report { partition: 0, max_ts: max, idle: false });
    r.rows.advance_to(e + 1);
    r.reports.advance_to(e + 1);
}

#[test]
fn a_checkpoint_of_panes_that_left_memory_restores_exactly() {
    let tuning = Tuning { freeze_after: Duration::ZERO, evict_per_epoch: 5, freeze_min_panes: 0, slice_events: 7 };
    timely::execute_directly(move |worker| {
        let mut original = worker.dataflow::<Epoch, _, _>(|scope| render_with(scope, plan(), None, tuning));
        // 40 epochs, then a checkpoint requested at epoch 41: taken before 41 is applied.
        for e in 1..=40 {
            feed(worker, &mut original, e);
        }
        let stats = original.stats.get();
        assert!(
            stats.hot_slots * 4 < stats.live_slots,
            "most slots left memory: {} of {} in memory",
            stats.hot_slots,
            stats.live_slots
        );
        assert!(stats.read_back > 0, "stragglers read slots back");
        original.checkpoint.borrow_mut().requested = Some(41);
        feed(worker, &mut original, 41);
        let (at, bytes) = original.checkpoint.borrow_mut().result.take().expect("the snapshot was taken");
        assert_eq!(at, 41);
        let snapshot: StateSnapshot = bincode::deserialize(&bytes.unwrap()).unwrap();

        // Restored, then fed what the ingest log holds from epoch 41 on.
        let mut restored = worker.dataflow::<Epoch, _, _>(|scope| render_with(scope, plan(), Some(snapshot), tuning));
        feed(worker, &mut restored, 41);
        same(&read(&mut restored, 41), &read(&mut original, 41), "at the checkpoint's epoch");
        feed_both_and_compare(worker, &mut original, &mut restored, 42..=70, 40, "after 30 more epochs");
        assert_eq!(original.stats.get().live_slots, restored.stats.get().live_slots);
    });
}

/// Panes leave memory at once, evictions go 5 slots per epoch, and epochs are applied one event
/// per activation of the aggregate.
const ONE_EVENT_SLICES: Tuning =
    Tuning { freeze_after: Duration::ZERO, evict_per_epoch: 5, freeze_min_panes: 0, slice_events: 1 };

/// A dataflow with [`ONE_EVENT_SLICES`], fed epochs 1 to 5.
fn five_epochs_in_slices_of_one(worker: &mut timely::worker::Worker) -> Rendered {
    let mut r = worker.dataflow::<Epoch, _, _>(|scope| render_with(scope, plan(), None, ONE_EVENT_SLICES));
    for e in 1..=5 {
        feed(worker, &mut r, e);
    }
    r
}

#[test]
fn a_checkpoint_requested_while_epochs_wait_holds_every_one_before_it() {
    // One event per activation: each epoch takes hundreds of activations, and the aggregate
    // stops with complete epochs still waiting.
    timely::execute_directly(move |worker| {
        let mut original = five_epochs_in_slices_of_one(worker);
        // Epochs 6 to 10 arrive together, with a checkpoint requested at 11.
        original.checkpoint.borrow_mut().requested = Some(11);
        for e in 6..=10 {
            send(&mut original, e);
        }
        worker.step_while(|| original.probe.less_equal(&10));
        let (at, bytes) = original.checkpoint.borrow_mut().result.take().expect("the snapshot was taken");
        assert_eq!(at, 11);
        let snapshot: StateSnapshot = bincode::deserialize(&bytes.unwrap()).unwrap();
        let mut restored =
            worker.dataflow::<Epoch, _, _>(|scope| render_with(scope, plan(), Some(snapshot), ONE_EVENT_SLICES));
        feed_both_and_compare(worker, &mut original, &mut restored, 11..=20, 20, "after the checkpoint");
    });
}

#[test]
fn a_checkpoint_requested_at_an_epoch_being_applied_is_refused() {
    timely::execute_directly(move |worker| {
        let mut r = five_epochs_in_slices_of_one(worker);
        send(&mut r, 6);
        // A few activations: epoch 6 is part applied (one event each).
        for _ in 0..20 {
            worker.step();
        }
        assert!(r.probe.less_equal(&6), "epoch 6 is still being applied");
        r.checkpoint.borrow_mut().requested = Some(6);
        worker.step_while(|| r.probe.less_equal(&6));
        let (at, result) = r.checkpoint.borrow_mut().result.take().expect("an answer");
        assert_eq!(at, 6);
        assert!(result.is_err(), "a snapshot at 6 would hold part or all of epoch 6");
    });
}
