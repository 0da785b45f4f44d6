//! Property test of the windowed aggregates against a naive model.
//!
//! Random definitions (every exact aggregation, and last_k, top_k, exp_decay_sum; tumbling,
//! hopping, session, sliding, cumulate and global windows; a filter, finite or infinite
//! retention) and random event streams — out of order, in random batches, spread over the ingest
//! partitions of 1 or 3 worker threads, with events behind the watermark — run through the real
//! rendered dataflow in one process. The result, read from snapshots of the arrangement taken at
//! a random epoch during the stream and at the last one (read on another thread once the trace
//! itself has compacted past both, as the server reads them), must equal what a plain
//! recomputation over the events accepted by then gives: windows and values per key and feature, `closed` flags and retention
//! included. The model computes the watermark itself (Flink's rule) and decides which events are
//! late; "now" of sliding windows and decayed sums is the largest accepted event time. Closed
//! panes leave the aggregate's memory at once here (in a server, 100 ms after they
//! close), and evicted ones are retracted two slots per epoch, so stragglers, retention and
//! reads go through the slots read back from the arrangement, and through evictions in
//! progress.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::Value;

use differential_dataflow::trace::TraceReader;
use sundial_dataflows::features::{assemble, render_with, Epoch, Report, Tuning};
use timely::progress::Antichain;

use sundial_dataflows::read::{read_key, ReadError, Snapshot};
use sundial_dataflows::row::Row;
use sundial_protocol::plan::{Agg, AggParams, DataflowPlan, FeaturePlan, SourcePlan, Window};
use sundial_protocol::value::{Datum, Key, F64};

const LATENESS: i64 = 50;

fn source() -> SourcePlan {
    let json = format!(
        r#"{{"name": "tx", "time": "ts", "allowed_lateness": "{LATENESS}ms",
            "fields": {{"user": "u64", "ts": "i64", "amount": "i64", "score": "f64"}}}}"#
    );
    sundial_definition::source_from_json(&json).unwrap()
}

#[derive(Clone, Debug)]
struct Event {
    user: u64,
    ts: i64,
    amount: Option<i64>,
    score: f64,
}

fn row(e: &Event) -> Row {
    Row {
        time: e.ts,
        values: vec![
            Datum::UInt(e.user),
            Datum::Int(e.ts),
            e.amount.map_or(Datum::Null, Datum::Int),
            Datum::Float(F64(e.score)),
        ]
        .into_boxed_slice(),
    }
}

#[derive(Clone, Debug)]
struct Case {
    plan: DataflowPlan,
    threads: usize,
    /// epochs[e][partition] = events
    epochs: Vec<Vec<Vec<Event>>>,
    /// Also read after this many epochs (a random read time before the end).
    read_after: usize,
}

fn window() -> impl Strategy<Value = Window> {
    prop_oneof![
        (1u64..4).prop_map(|k| Window::Tumbling { size_ms: k * 100 }),
        (1u64..4, 1u64..4).prop_map(|(h, m)| Window::Hopping { size_ms: h * m * 50, hop_ms: h * 50 }),
        (1u64..4).prop_map(|g| Window::Session { gap_ms: g * 40 }),
        (1u64..4, 1u64..5).prop_map(|(t, m)| Window::Sliding { size_ms: t * m * 50, tile_ms: t * 50 }),
        (1u64..4, 1u64..5).prop_map(|(s, m)| Window::Cumulate { step_ms: s * 50, max_ms: s * m * 50 }),
        Just(Window::Global),
    ]
}

fn feature() -> impl Strategy<Value = (Agg, Option<usize>, Window)> {
    let agg = prop_oneof![
        Just(Agg::Count),
        Just(Agg::Sum),
        Just(Agg::Avg),
        Just(Agg::Min),
        Just(Agg::Max),
        Just(Agg::Stddev),
        Just(Agg::Variance),
        Just(Agg::CountDistinct),
        Just(Agg::First),
        Just(Agg::Last),
        Just(Agg::LastK),
        Just(Agg::TopK),
        Just(Agg::ExpDecaySum)
    ];
    (agg, prop_oneof![Just(2usize), Just(3usize)], any::<bool>(), window()).prop_map(|(agg, field, plain, w)| {
        let field = if agg == Agg::Count && plain { None } else { Some(field) };
        (agg, field, w)
    })
}

fn case() -> impl Strategy<Value = Case> {
    let features = prop::collection::vec(feature(), 1..5);
    let retention = prop_oneof![Just(None), (0u64..4).prop_map(|k| Some(k * 100))];
    let filter = any::<bool>();
    let threads = prop_oneof![Just(1usize), Just(3usize)];
    let events =
        prop::collection::vec((0u64..5, 0i64..2_000, prop::option::weighted(0.9, -50i64..200), 0u8..4), 0..160);
    (features, retention, filter, threads, events, 1usize..8, any::<u64>(), any::<prop::sample::Index>()).prop_map(
        |(features, retention_ms, filter, threads, raw, nbatches, seed, read_at)| {
            let features = features
                .into_iter()
                .enumerate()
                .map(|(i, (agg, field, window))| FeaturePlan {
                    name: format!("f{i}"),
                    agg,
                    field,
                    window,
                    params: params(),
                })
                .collect();
            let filter = filter
                .then(|| sundial_definition::expr::parse_filter("amount is null or amount > 0", &source()).unwrap());
            let plan = DataflowPlan {
                name: "p".into(),
                id: 0,
                source: source(),
                key: vec![0],
                filter,
                retention_ms,
                features,
            };
            // Event time roughly follows the order of arrival, with jitter: out of order, and
            // sometimes behind the watermark.
            let n = raw.len().max(1) as i64;
            let mut epochs = vec![vec![Vec::new(); threads]; nbatches];
            for (i, (user, jitter, amount, score)) in raw.into_iter().enumerate() {
                let ts = (i as i64 * 2_000 / n) + jitter / 8 - 120;
                let batch = (i * nbatches) / (n as usize).max(1);
                let part = ((seed >> (i % 60)) as usize + i) % threads;
                epochs[batch.min(nbatches - 1)][part].push(Event { user, ts, amount, score: f64::from(score) * 0.5 });
            }
            let read_after = read_at.index(epochs.len()) + 1;
            Case { plan, threads, epochs, read_after }
        },
    )
}

/// The watermark after each epoch, and which events the ingest accepts (those not behind the
/// watermark of the epoch before), exactly as the rule says.
fn model_ingest(case: &Case) -> (Vec<Option<i64>>, Vec<Vec<Vec<bool>>>) {
    let mut max_ts: Vec<Option<i64>> = vec![None; case.threads];
    let mut wm: Option<i64> = None;
    let mut wms = Vec::new();
    let mut accepted = Vec::new();
    for epoch in &case.epochs {
        let mut acc_epoch = Vec::new();
        for (p, events) in epoch.iter().enumerate() {
            let flags: Vec<bool> = events.iter().map(|e| wm.is_none_or(|w| e.ts >= w)).collect();
            for (e, ok) in events.iter().zip(&flags) {
                if *ok {
                    max_ts[p] = max_ts[p].max(Some(e.ts));
                }
            }
            acc_epoch.push(flags);
        }
        if let Some(min) = max_ts.iter().flatten().min() {
            let candidate = min - LATENESS;
            wm = Some(wm.map_or(candidate, |w| w.max(candidate)));
        }
        wms.push(wm);
        accepted.push(acc_epoch);
    }
    (wms, accepted)
}

/// start, end, value, closed
type Win = (Option<i64>, Option<i64>, Value, bool);
type Results = BTreeMap<(u64, String), Vec<Win>>;

/// Parameters of the generated features: k = 3, a half-life of 100 ms.
fn params() -> AggParams {
    AggParams { k: 3, half_life_ms: 100, ..AggParams::default() }
}

fn plain_value(agg: Agg, field: Option<usize>, events: &[&Event], now: Option<i64>) -> Value {
    let vals: Vec<(i64, Datum)> = events
        .iter()
        .filter_map(|e| match field {
            None => Some((e.ts, Datum::Null)),
            Some(2) => e.amount.map(|a| (e.ts, Datum::Int(a))),
            Some(_) => Some((e.ts, Datum::Float(F64(e.score)))),
        })
        .collect();
    let float = |f: f64| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
    let nums: Vec<f64> = vals.iter().filter_map(|(_, d)| d.as_f64()).collect();
    if agg != Agg::Count && agg != Agg::CountDistinct && vals.is_empty() {
        return Value::Null;
    }
    match agg {
        Agg::Count => vals.len().into(),
        Agg::Sum if field == Some(2) => {
            let sum: i128 = vals.iter().map(|(_, d)| d.as_i128().unwrap_or(0)).sum();
            i64::try_from(sum).map_or(Value::Null, Value::from)
        }
        Agg::Sum => float(nums.iter().sum()),
        Agg::Avg => float(nums.iter().sum::<f64>() / nums.len() as f64),
        Agg::Min => vals.iter().map(|(_, d)| d.clone()).min().map_or(Value::Null, |d| d.to_json()),
        Agg::Max => vals.iter().map(|(_, d)| d.clone()).max().map_or(Value::Null, |d| d.to_json()),
        Agg::Variance | Agg::Stddev => {
            let n = nums.len() as f64;
            let mean = nums.iter().sum::<f64>() / n;
            let var = nums.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            float(if agg == Agg::Stddev { var.sqrt() } else { var })
        }
        Agg::CountDistinct => vals.iter().map(|(_, d)| d.clone()).collect::<BTreeSet<_>>().len().into(),
        Agg::First => vals.iter().min_by(|a, b| a.cmp(b)).map_or(Value::Null, |(_, d)| d.to_json()),
        Agg::Last => vals.iter().max_by(|a, b| a.cmp(b)).map_or(Value::Null, |(_, d)| d.to_json()),
        Agg::LastK => {
            let mut items = vals.clone();
            items.sort_by(|a, b| b.cmp(a));
            Value::Array(items.iter().take(3).map(|(_, d)| d.to_json()).collect())
        }
        Agg::TopK => {
            let mut items: Vec<Datum> = vals.iter().map(|(_, d)| d.clone()).collect();
            items.sort_by(|a, b| b.cmp(a));
            Value::Array(items.iter().take(3).map(Datum::to_json).collect())
        }
        Agg::ExpDecaySum => {
            let now = now.unwrap_or(0);
            float(vals.iter().map(|(t, d)| d.as_f64().unwrap_or(0.0) * 2f64.powf(-((now - t) as f64) / 100.0)).sum())
        }
        Agg::ApproxDistinct | Agg::ApproxQuantile => Value::Null,
    }
}

fn model(case: &Case) -> (Results, Option<i64>) {
    let (wms, accepted) = model_ingest(case);
    let wm = wms.last().copied().flatten();
    let mut events: Vec<&Event> = Vec::new();
    for (e, epoch) in case.epochs.iter().enumerate() {
        for (p, evs) in epoch.iter().enumerate() {
            events.extend(evs.iter().zip(&accepted[e][p]).filter(|(_, ok)| **ok).map(|(ev, _)| ev));
        }
    }
    let plan = &case.plan;
    // "now" of sliding windows: the largest accepted event time of the source (before filters).
    let now = events.iter().map(|e| e.ts).max();
    events.retain(|e| plan.filter.is_none() || e.amount.is_none_or(|a| a > 0));
    let retained = |end: i64| match (wm, plan.retention_ms) {
        (Some(w), Some(r)) => end > w - r as i64,
        _ => true,
    };
    let mut out: Results = BTreeMap::new();
    let users: BTreeSet<u64> = events.iter().map(|e| e.user).collect();
    for user in users {
        let mine: Vec<&Event> = events.iter().copied().filter(|e| e.user == user).collect();
        for f in &plan.features {
            let mut windows: Vec<(i64, i64)> = Vec::new();
            match f.window {
                Window::Tumbling { size_ms } => {
                    let s = size_ms as i64;
                    windows = mine.iter().map(|e| (e.ts.div_euclid(s) * s, e.ts.div_euclid(s) * s + s)).collect();
                }
                Window::Hopping { size_ms, hop_ms } => {
                    let (s, h) = (size_ms as i64, hop_ms as i64);
                    for e in &mine {
                        let last = e.ts.div_euclid(h) * h;
                        for k in 0..s / h {
                            windows.push((last - k * h, last - k * h + s));
                        }
                    }
                }
                Window::Session { gap_ms } => {
                    let mut ts: Vec<i64> = mine.iter().map(|e| e.ts).collect();
                    ts.sort_unstable();
                    for t in ts {
                        match windows.last_mut() {
                            Some((_, end)) if t < *end => *end = (*end).max(t + gap_ms as i64),
                            _ => windows.push((t, t + gap_ms as i64)),
                        }
                    }
                }
                Window::Sliding { size_ms, tile_ms } => {
                    if let Some(now) = now {
                        let end = now.div_euclid(tile_ms as i64) * tile_ms as i64 + tile_ms as i64;
                        windows.push((end - size_ms as i64, end));
                    }
                }
                Window::Cumulate { step_ms, max_ms } => {
                    let (step, max) = (step_ms as i64, max_ms as i64);
                    for e in &mine {
                        let base = e.ts.div_euclid(max) * max;
                        let first = (e.ts - base).div_euclid(step) + 1;
                        for k in first..=max / step {
                            windows.push((base, base + k * step));
                        }
                    }
                }
                Window::Global => {}
            }
            windows.sort_unstable();
            windows.dedup();
            let mut rows = Vec::new();
            if f.window == Window::Global {
                rows.push((None, None, plain_value(f.agg, f.field, &mine, now), false));
            }
            for (start, end) in windows {
                if !retained(end) {
                    continue;
                }
                let inside: Vec<&Event> = mine.iter().copied().filter(|e| e.ts >= start && e.ts < end).collect();
                if inside.is_empty() {
                    // A sliding window over none of the key's events is not reported.
                    continue;
                }
                rows.push((
                    Some(start),
                    Some(end),
                    plain_value(f.agg, f.field, &inside, now),
                    wm.is_some_and(|w| w >= end),
                ));
            }
            if !rows.is_empty() {
                out.insert((user, f.name.clone()), rows);
            }
        }
    }
    (out, wm)
}

/// Runs the case through the dataflow; reads after `read_after` epochs and at the end, from
/// snapshots of the arrangement taken then and read on another thread after the trace has
/// compacted past both.
fn run(case: &Case) -> [(Results, Option<i64>); 2] {
    let (wms, accepted) = model_ingest(case);
    let shared = std::sync::Arc::new((case.clone(), accepted, wms));
    let guards = timely::execute(timely::Config::process(case.threads), move |worker| {
        let (case, accepted, _wms) = &*shared;
        let me = worker.index();
        let mut r = worker.dataflow::<Epoch, _, _>(|scope| {
            render_with(
                scope,
                case.plan.clone(),
                None,
                Tuning {
                    freeze_after: std::time::Duration::ZERO,
                    evict_per_epoch: 2,
                    freeze_min_panes: 0,
                    slice_events: 3,
                },
            )
        });
        let mut max_ts: Option<i64> = None;
        let mut epoch: Epoch = 1;
        let mut at_read = None;
        for (e, batch) in case.epochs.iter().enumerate() {
            r.rows.advance_to(epoch);
            r.reports.advance_to(epoch);
            let mut rows = Vec::new();
            for (ev, ok) in batch[me].iter().zip(&accepted[e][me]) {
                if *ok {
                    max_ts = max_ts.max(Some(ev.ts));
                    rows.push(row(ev));
                }
            }
            // In two batches (when there are two rows or more), as successive ingest requests
            // of one epoch arrive.
            let second = rows.split_off(rows.len() / 2);
            r.rows.send(std::sync::Arc::new(rows));
            r.rows.send(std::sync::Arc::new(second));
            // A partition that has had no event declares itself idle (as after the idle timeout).
            r.reports.send(Report { partition: me as u32, max_ts, idle: max_ts.is_none() });
            epoch += 1;
            r.rows.advance_to(epoch);
            r.reports.advance_to(epoch);
            // Lockstep: the next batch is checked against this epoch's watermark.
            worker.step_while(|| r.probe.less_equal(&(epoch - 1)));
            // Epoch e + 1 is complete after the e-th batch: the reads are taken from snapshots
            // as the server takes them.
            if epoch - 1 == case.read_after as Epoch {
                at_read = Some(Snapshot::of(&mut r.trace));
            }
        }
        let at_end = Snapshot::of(&mut r.trace);
        // The trace then moves on: every epoch compacts into one, and merges run. The snapshots
        // still read their epochs, on another thread.
        r.trace.set_logical_compaction(Antichain::from_elem(epoch).borrow());
        r.trace.set_physical_compaction(Antichain::from_elem(epoch).borrow());
        for _ in 0..10 {
            worker.step();
        }
        let any = Key::One(Datum::UInt(0));
        assert_eq!(
            read_key(&mut r.trace, &any, epoch - 1),
            Err(ReadError::Compacted { as_of: epoch - 1, since: epoch }),
            "the trace itself is compacted"
        );
        let snapshots =
            [(case.read_after as Epoch, at_read.expect("the read epoch is one of the case's")), (epoch - 1, at_end)];
        let (marks, layout) = (r.watermarks.borrow().clone(), std::sync::Arc::clone(&r.layout));
        let reader = std::thread::spawn(move || {
            snapshots.map(|(at, snapshot)| {
                let (wm, now) = (marks.at(at), marks.now_at(at));
                let mut results: Vec<(u64, String, Vec<Win>)> = Vec::new();
                let mut every_key = Vec::new();
                snapshot
                    .read_all(at, |key, slots| {
                        every_key.push((key.clone(), slots.clone()));
                        let Datum::UInt(user) = key.parts()[0] else { panic!("u64 keys") };
                        for (name, windows) in assemble(&layout, &slots, wm, now) {
                            if !windows.is_empty() {
                                results.push((
                                    user,
                                    name,
                                    windows.into_iter().map(|w| (w.start, w.end, w.value, w.closed)).collect(),
                                ));
                            }
                        }
                    })
                    .unwrap();
                // Key by key through one cursor, in another order (and a key with no slots),
                // as key reads go: the same slots.
                let absent = Key::One(Datum::UInt(u64::MAX));
                let mut keys: Vec<&Key> = every_key.iter().map(|(k, _)| k).rev().collect();
                keys.insert(keys.len() / 2, &absent);
                let mut by_key = Vec::new();
                snapshot.read_keys(keys, at, |key, slots| by_key.push((key.clone(), slots))).unwrap();
                let mut want: Vec<_> = every_key.iter().rev().cloned().collect();
                want.insert(want.len() / 2, (absent.clone(), Vec::new()));
                assert_eq!(by_key, want);
                (results, wm)
            })
        });
        reader.join().unwrap()
    })
    .unwrap();
    let mut out = [(BTreeMap::new(), None), (BTreeMap::new(), None)];
    for result in guards.join() {
        for (i, (results, w)) in result.unwrap().into_iter().enumerate() {
            out[i].1 = w;
            for (user, name, windows) in results {
                assert!(out[i].0.insert((user, name), windows).is_none(), "a key lives on one worker only");
            }
        }
    }
    out
}

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_f64() || b.is_f64() => (x - y).abs() <= 1e-6 * (1.0 + x.abs().max(y.abs())),
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn aggregates_match_the_model(case in case()) {
        // At a random read time during the stream (the model sees the epochs up to it), and at
        // the end.
        let earlier = Case { epochs: case.epochs[..case.read_after].to_vec(), ..case.clone() };
        let [at_read, at_end] = run(&case);
        for ((got, got_wm), (want, want_wm)) in [(at_read, model(&earlier)), (at_end, model(&case))] {
            prop_assert_eq!(got_wm, want_wm, "watermark");
            prop_assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "groups");
            for (k, w) in &want {
                let g = &got[k];
                prop_assert_eq!(g.len(), w.len(), "windows of {:?}: got {:?} want {:?}", k, g, w);
                for (a, b) in g.iter().zip(w) {
                    prop_assert!(a.0 == b.0 && a.1 == b.1 && a.3 == b.3 && close(&a.2, &b.2), "{:?}: got {:?} want {:?}", k, g, w);
                }
            }
        }
    }
}
