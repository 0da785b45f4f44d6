//! Throughput and memory of the windowed aggregates on the workloads of
//! `../shared/bench/WORKLOADS.md`, against a hand-written baseline measured the same way.
//!
//! ```text
//! bench_windows --workload w1|w2 --mode baseline|sundial [--threads T] [--events N] [--csv FILE]
//!               [--input move|keep]
//! ```
//! Events are parsed rows in memory (generated like `gen.py`: Zipf(1.1) keys over 100,000 users,
//! event time advancing 1 ms per event and up to 5 s late; or read from a `gen.py` CSV), fed in
//! epochs of `--batch` events. `baseline` is a single-threaded hash map of per-minute panes (W2's
//! windows are merged from panes at the end, as a hand-written aggregator would). `sundial` is
//! the rendered dataflow on T worker threads, fed round-robin, waited on until the last epoch is
//! complete. Time and memory are measured until the result is read (each side's state is torn
//! down after, which a running server never does; tearing the arrangement down merges its
//! batches into one more copy). Both print one line: events/s, result checksum (so the two can
//! be compared), retained groups, and the process's peak RSS until then above what the input
//! rows take. With `--input move` (the default) the dataflow takes the rows as ingest hands them
//! over and frees them as it goes, so state reuses their memory and the peak above the input
//! undercounts it; `--input keep` sends copies of an input that stays whole, so that the peak
//! above it is the dataflow's. `drop` runs `sundial` and then drops the dataflow as
//! `DELETE /v1/dataflows/{name}` does, printing the RSS before and after.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use differential_dataflow::trace::TraceReader;
use sundial_dataflows::features::{render, Epoch, Report};
use sundial_dataflows::read::read_all;
use sundial_dataflows::row::Row;
use sundial_protocol::plan::{Agg, DataflowPlan, FeaturePlan, SourcePlan, Window};
use sundial_protocol::value::Datum;

/// The same allocator as the `sundial` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BASE: i64 = 1_700_000_000_000;

struct Args {
    workload: String,
    mode: String,
    threads: usize,
    events: usize,
    batch: usize,
    csv: Option<String>,
    keep_input: bool,
}

fn args() -> Args {
    let mut a = Args {
        workload: "w1".into(),
        mode: "sundial".into(),
        threads: 1,
        events: 10_000_000,
        batch: 200_000,
        csv: None,
        keep_input: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--workload" => a.workload = value,
            "--mode" => a.mode = value,
            "--threads" => a.threads = value.parse().expect("--threads"),
            "--events" => a.events = value.parse().expect("--events"),
            "--batch" => a.batch = value.parse().expect("--batch"),
            "--csv" => a.csv = Some(value),
            "--input" => a.keep_input = value == "keep",
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn source() -> SourcePlan {
    sundial_definition::source_from_json(
        r#"{"name": "events", "time": "ts", "allowed_lateness": "5s", "idle_timeout": "1h",
            "fields": {"user_id": "u64", "ts": "i64", "amount": "i64", "merchant": "u64"}}"#,
    )
    .unwrap()
}

fn plan(workload: &str) -> DataflowPlan {
    let window = match workload {
        "w1" => Window::Tumbling { size_ms: 60_000 },
        // "sum over the last hour" as sliding 1 h windows of 1 min tiles, or as the hopping
        // equivalent (1 h windows every minute).
        "slide1h" | "slide4" => Window::Sliding { size_ms: 3_600_000, tile_ms: 60_000 },
        "hop1h" => Window::Hopping { size_ms: 3_600_000, hop_ms: 60_000 },
        _ => Window::Hopping { size_ms: 600_000, hop_ms: 60_000 },
    };
    if workload == "slide4" {
        // Four sliding features of 60 tiles each, for read latency.
        let feature =
            |name: &str, agg, field| FeaturePlan { name: name.into(), agg, field, window, params: Default::default() };
        return DataflowPlan {
            name: workload.into(),
            id: 0,
            source: source(),
            key: vec![0],
            filter: None,
            retention_ms: None,
            features: vec![
                feature("count", Agg::Count, None),
                feature("sum", Agg::Sum, Some(2)),
                feature("max", Agg::Max, Some(2)),
                feature("avg", Agg::Avg, Some(2)),
            ],
        };
    }
    let mut features = vec![
        FeaturePlan { name: "count".into(), agg: Agg::Count, field: None, window, params: Default::default() },
        FeaturePlan { name: "sum".into(), agg: Agg::Sum, field: Some(2), window, params: Default::default() },
    ];
    if workload == "w2" {
        features.push(FeaturePlan {
            name: "max".into(),
            agg: Agg::Max,
            field: Some(2),
            window,
            params: Default::default(),
        });
    }
    DataflowPlan {
        name: workload.into(),
        id: 0,
        source: source(),
        key: vec![0],
        filter: None,
        retention_ms: matches!(workload, "slide1h" | "hop1h").then_some(3_600_000),
        features,
    }
}

/// xorshift64*, deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn generate(n: usize) -> Vec<Row> {
    let keys = 100_000usize;
    // Bounded Zipf(1.1) by inverse CDF, keys scrambled over the key space as gen.py does.
    let mut cdf = Vec::with_capacity(keys);
    let mut total = 0.0;
    for k in 1..=keys {
        total += 1.0 / (k as f64).powf(1.1);
        cdf.push(total);
    }
    let mut rng = Rng(42);
    (0..n)
        .map(|i| {
            let u = rng.unit() * total;
            let rank = cdf.partition_point(|&c| c < u) as u64;
            let user = (rank * 2_654_435_761) % keys as u64;
            let ts = BASE + i as i64 - (rng.next() % 5_000) as i64;
            let amount = (rng.next() % 100_000) as i64 + 1;
            let merchant = rng.next() % 1_000;
            Row {
                time: ts,
                values: vec![Datum::UInt(user), Datum::Int(ts), Datum::Int(amount), Datum::UInt(merchant)]
                    .into_boxed_slice(),
            }
        })
        .collect()
}

fn read_csv(path: &str, limit: usize) -> Vec<Row> {
    let text = std::fs::read_to_string(path).expect("read the CSV");
    let (rows, errors) = sundial_dataflows::row::parse_body(&text, true, &source(), 1);
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(3)]);
    rows.into_iter().map(|(_, r)| r).take(limit).collect()
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (groups, sum of counts, sum of sums, sum of maxes) over every window.
type Checksum = (u64, u64, i128, i128);

/// The baseline's checksum, and the time until it was ready (its maps are dropped after).
fn baseline(rows: &[Row], workload: &str) -> (Checksum, Duration, u64) {
    let started = Instant::now();
    let mut panes: HashMap<(u64, i64), (u64, i64, i64)> = HashMap::new();
    for row in rows {
        let (Datum::UInt(user), Datum::Int(amount)) = (&row.values[0], &row.values[2]) else { continue };
        let pane = row.time.div_euclid(60_000);
        let e = panes.entry((*user, pane)).or_insert((0, 0, i64::MIN));
        e.0 += 1;
        e.1 += amount;
        e.2 = e.2.max(*amount);
    }
    if workload == "w1" {
        let mut c: Checksum = (0, 0, 0, 0);
        for (count, sum, _) in panes.values() {
            c.0 += 1;
            c.1 += count;
            c.2 += i128::from(*sum);
        }
        return (c, started.elapsed(), rss_kib("VmHWM:"));
    }
    let mut windows: HashMap<(u64, i64), (u64, i64, i64)> = HashMap::new();
    for ((user, pane), (count, sum, max)) in &panes {
        for k in 0..10 {
            let e = windows.entry((*user, pane - k)).or_insert((0, 0, i64::MIN));
            e.0 += count;
            e.1 += sum;
            e.2 = e.2.max(*max);
        }
    }
    let mut c: Checksum = (0, 0, 0, 0);
    for (count, sum, max) in windows.values() {
        c.0 += 1;
        c.1 += count;
        c.2 += i128::from(*sum);
        c.3 += i128::from(*max);
    }
    (c, started.elapsed(), rss_kib("VmHWM:"))
}

/// The dataflow's checksum, and the time until every worker had read it (before the dataflow's
/// state is torn down, which a running server never does).
/// How rows reach the dataflow: moved in, as ingest hands over what it parsed (the fastest;
/// the dataflow frees them as it goes, so the memory they free is reused by state), or copied
/// from an input that stays whole (so that the peak memory above the input is the dataflow's).
enum Feed {
    Move(Vec<std::sync::Mutex<Vec<Vec<Row>>>>),
    Keep(Vec<Row>),
}

/// One worker's share of one batch.
enum Chunk<'a> {
    Moved(std::vec::IntoIter<Row>),
    Kept(std::slice::Iter<'a, Row>),
}

impl Iterator for Chunk<'_> {
    type Item = Row;
    fn next(&mut self) -> Option<Row> {
        match self {
            Chunk::Moved(rows) => rows.next(),
            Chunk::Kept(rows) => rows.next().cloned(),
        }
    }
}

impl Feed {
    /// Each batch of `batch` rows split over `threads` workers (their ingest partitions).
    fn new(rows: Vec<Row>, keep: bool, threads: usize, batch: usize) -> Feed {
        if keep {
            return Feed::Keep(rows);
        }
        let mut shares: Vec<Vec<Vec<Row>>> = (0..threads).map(|_| Vec::new()).collect();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<Row> = rows.by_ref().take(batch).collect();
            let share = chunk.len().div_ceil(threads);
            let mut chunk = chunk.into_iter();
            for s in shares.iter_mut() {
                s.push(chunk.by_ref().take(share).collect());
            }
        }
        Feed::Move(shares.into_iter().map(std::sync::Mutex::new).collect())
    }

    fn chunks(&self, me: usize, threads: usize, batch: usize) -> Vec<Chunk<'_>> {
        match self {
            Feed::Move(shares) => {
                let mine = std::mem::take(&mut *shares[me].lock().unwrap());
                mine.into_iter().map(|c| Chunk::Moved(c.into_iter())).collect()
            }
            Feed::Keep(rows) => rows
                .chunks(batch.max(1))
                .map(|chunk| {
                    let share = chunk.len().div_ceil(threads).max(1);
                    Chunk::Kept(chunk.chunks(share).nth(me).unwrap_or(&[]).iter())
                })
                .collect(),
        }
    }
}

fn sundial(
    feed: Arc<Feed>,
    workload: &str,
    threads: usize,
    batch: usize,
    then_drop: bool,
) -> (Checksum, Duration, u64) {
    let plan = plan(workload);
    let started = Instant::now();
    let guards = timely::execute(timely::Config::process(threads), move |worker| {
        let me = worker.index();
        let feed = Arc::clone(&feed);
        let mine = feed.chunks(me, threads, batch);
        let mut r = worker.dataflow::<Epoch, _, _>(|scope| render(scope, plan.clone(), None));
        // Events always wait here (two epochs of `--batch` in flight): a worker in this state
        // is catching up, and applies whole epochs (see `Rendered::catching_up`).
        r.catching_up.set(true);
        let mut epoch: Epoch = 1;
        let mut max_ts = None;
        for chunk in mine {
            r.rows.advance_to(epoch);
            r.reports.advance_to(epoch);
            let rows: Vec<Row> = chunk.collect();
            max_ts = max_ts.max(rows.iter().map(|row| row.time).max());
            r.rows.send(std::sync::Arc::new(rows));
            r.reports.send(Report { partition: me as u32, max_ts, idle: max_ts.is_none() });
            epoch += 1;
            r.rows.advance_to(epoch);
            r.reports.advance_to(epoch);
            // Keep at most two epochs in flight.
            worker.step_while(|| r.probe.less_equal(&(epoch.saturating_sub(2))));
            // As a worker does with its read handle: let the arrangement compact and merge its
            // batches up to what is complete (a handle that never advances keeps every batch
            // apart, which makes the final read slow and defers all merging to the teardown).
            if let Some(complete) = r.probe.with_frontier(|f| f.first().copied()) {
                let done = [complete.saturating_sub(1)];
                r.trace.set_logical_compaction(timely::progress::frontier::AntichainRef::new(&done));
                r.trace.set_physical_compaction(timely::progress::frontier::AntichainRef::new(&done));
            }
        }
        worker.step_while(|| r.probe.less_equal(&(epoch - 1)));
        let mut c: Checksum = (0, 0, 0, 0);
        let layout = std::sync::Arc::clone(&r.layout);
        let (watermark, now) = {
            let marks = r.watermarks.borrow();
            (marks.at(epoch - 1), marks.now_at(epoch - 1))
        };
        let mut keys = Vec::new();
        read_all(&mut r.trace, epoch - 1, |key, slots| {
            if keys.len() < 20_000 {
                keys.push(key.clone());
            }
            for (name, windows) in sundial_dataflows::features::assemble(&layout, &slots, watermark, now) {
                for w in windows {
                    match name.as_str() {
                        "count" => {
                            c.0 += 1;
                            c.1 += w.value.as_u64().unwrap_or(0);
                        }
                        "sum" => c.2 += i128::from(w.value.as_i64().unwrap_or(0)),
                        _ => c.3 += i128::from(w.value.as_i64().unwrap_or(0)),
                    }
                }
            }
        })
        .unwrap();
        let ready = started.elapsed();
        // The peak so far: what the dataflow took to compute and serve the result. (Tearing it
        // down merges the arrangement's batches into one copy more, which a running server
        // never does.)
        let peak = rss_kib("VmHWM:");
        if layout.plan.name == "slide4" && me == 0 {
            // One key's features at a time, as a point read does: read the key's tiles from the
            // arrangement and assemble the four sliding windows.
            let mut times: Vec<Duration> = keys
                .iter()
                .map(|key| {
                    let t = Instant::now();
                    let slots = sundial_dataflows::read::read_key(&mut r.trace, key, epoch - 1).unwrap();
                    let features = sundial_dataflows::features::assemble(&layout, &slots, watermark, now);
                    std::hint::black_box(features);
                    t.elapsed()
                })
                .collect();
            times.sort();
            let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
            println!(
                "point reads of 4 sliding features (60 tiles each): keys={} p50_us={:.1} p99_us={:.1} max_us={:.1}",
                times.len(),
                at(0.5),
                at(0.99),
                at(1.0)
            );
        }
        if then_drop {
            // What `DELETE /v1/dataflows/{name}` does on a worker: close the inputs, release the
            // trace; timely then completes and removes the dataflow with its operators' state.
            let before = rss_kib("VmRSS:");
            drop((r.rows, r.reports, r.trace));
            while worker.has_dataflows() {
                worker.step();
            }
            // mimalloc returns freed pages to the OS after its purge delay, on later calls: run
            // with `MIMALLOC_PURGE_DELAY=0` (as scripts/bench-windows does) to see them gone.
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(std::hint::black_box(vec![0u8; 1 << 16]));
            let after = rss_kib("VmRSS:");
            if me == 0 {
                println!(
                    "drop: rss_before_kib={before} rss_after_kib={after} freed_kib={}",
                    before.saturating_sub(after)
                );
            }
        }
        (c, ready, peak)
    })
    .unwrap();
    let mut total: Checksum = (0, 0, 0, 0);
    let mut ready = Duration::ZERO;
    let mut peak = 0;
    for result in guards.join() {
        let (c, t, p) = result.unwrap();
        peak = peak.max(p);
        total.0 += c.0;
        total.1 += c.1;
        total.2 += c.2;
        total.3 += c.3;
        ready = ready.max(t);
    }
    (total, ready, peak)
}

fn main() {
    let a = args();
    let rows = match &a.csv {
        Some(path) => read_csv(path, a.events),
        None => generate(a.events),
    };
    let n = rows.len();
    let (checksum, elapsed, peak, rss_input) = match a.mode.as_str() {
        "baseline" => {
            let rss_input = rss_kib("VmRSS:");
            let (c, t, peak) = baseline(&rows, &a.workload);
            (c, t, peak, rss_input)
        }
        _ => {
            let feed = Arc::new(Feed::new(rows, a.keep_input, a.threads, a.batch));
            let rss_input = rss_kib("VmRSS:");
            let (c, t, peak) = sundial(feed, &a.workload, a.threads, a.batch, a.mode == "drop");
            (c, t, peak, rss_input)
        }
    };
    let groups = checksum.0;
    let secs = elapsed.as_secs_f64();
    let peak_above_input = peak.saturating_sub(rss_input) * 1024;
    println!(
        "workload={} mode={} input={} threads={} events={} secs={:.3} events_per_sec={:.0} checksum={:?} groups={} peak_bytes_above_input={} bytes_per_group={:.0}",
        a.workload,
        a.mode,
        if a.keep_input { "keep" } else { "move" },
        a.threads,
        n,
        secs,
        n as f64 / secs,
        checksum,
        groups,
        peak_above_input,
        peak_above_input as f64 / groups.max(1) as f64
    );
}
