//! How fast the ingest log encodes and writes: bincode (what the log uses) against abomonation,
//! on the same records, and appends with each fsync policy.
//!
//! `cargo run --release -p sundial-worker --example log_codec [ROWS]`
//!
//! abomonation cannot encode the log's own `Row` (an enum of typed values with boxed strings)
//! without hand-written unsafe impls, so both codecs are also measured on the fixed-width tuple
//! of the benchmark's schema `(user_id u64, ts i64, amount i64, merchant u64)`, which abomonation
//! encodes as one memcpy: its best case.
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use sundial_dataflows::row::Row;
use sundial_protocol::value::Datum;
use sundial_worker::log::{Fsync, Log};

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn per_sec(n: usize, d: Duration) -> String {
    format!("{:>7.1} M rows/s", n as f64 / d.as_secs_f64() / 1e6)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let tuples: Vec<(u64, i64, i64, u64)> = (0..n as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) % 1_000_000, 1_700_000_000_000 + i as i64, (i % 1000) as i64, i % 5000))
        .collect();
    let rows: Vec<Row> = tuples
        .iter()
        .map(|&(u, t, a, m)| Row {
            time: t,
            values: vec![Datum::UInt(u), Datum::Int(t), Datum::Int(a), Datum::UInt(m)].into_boxed_slice(),
        })
        .collect();

    // bincode on the log's rows.
    let mut bytes = Vec::new();
    let enc_rows = best_of(5, || bytes = bincode::serialize(&rows).unwrap());
    let row_bytes = bytes.len();
    let dec_rows = best_of(5, || {
        let back: Vec<Row> = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back.len(), n);
    });
    let crc_rows = best_of(5, || {
        std::hint::black_box(crc32c::crc32c(&bytes));
    });

    // bincode on tuples.
    let mut tbytes = Vec::new();
    let enc_tuples = best_of(5, || tbytes = bincode::serialize(&tuples).unwrap());
    let dec_tuples = best_of(5, || {
        let back: Vec<(u64, i64, i64, u64)> = bincode::deserialize(&tbytes).unwrap();
        assert_eq!(back.len(), n);
    });

    // abomonation on tuples.
    let mut abytes = Vec::new();
    let enc_abom = best_of(5, || {
        abytes.clear();
        unsafe { abomonation::encode(&tuples, &mut abytes) }.unwrap();
    });
    let dec_abom = best_of(5, || {
        let mut copy = abytes.clone();
        let (back, _) = unsafe { abomonation::decode::<Vec<(u64, i64, i64, u64)>>(&mut copy) }.unwrap();
        assert_eq!(back.len(), n);
    });
    let copy_only = best_of(5, || {
        std::hint::black_box(abytes.clone());
    });

    println!("rows={n}");
    println!(
        "bincode   Vec<Row>              encode {}  decode {}  {} B/row",
        per_sec(n, enc_rows),
        per_sec(n, dec_rows),
        row_bytes / n
    );
    println!(
        "bincode   Vec<(u64,i64,i64,u64)> encode {}  decode {}  {} B/row",
        per_sec(n, enc_tuples),
        per_sec(n, dec_tuples),
        tbytes.len() / n
    );
    println!(
        "abomonation Vec<(u64,i64,i64,u64)> encode {}  decode {} (incl. a copy of the buffer: {})  {} B/row",
        per_sec(n, enc_abom),
        per_sec(n, dec_abom),
        per_sec(n, copy_only),
        abytes.len() / n
    );
    println!("crc32c over the Row encoding: {:.1} GB/s", row_bytes as f64 / crc_rows.as_secs_f64() / 1e9);

    // Appends of batches of 10,000 rows, as ingest replies do, with each fsync policy.
    let batch = 10_000.min(n);
    for fsync in [Fsync::Batch, Fsync::Always, Fsync::Interval(Duration::from_millis(100))] {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), fsync).unwrap();
        let batches = (n / batch).clamp(1, 200);
        let t = Instant::now();
        for (i, chunk) in rows.chunks(batch).take(batches).enumerate() {
            log.append_batch(i as u64, "events", None, chunk, 0, 0).unwrap();
        }
        let d = t.elapsed();
        println!(
            "append {batches} batches of {batch} rows, --fsync {fsync}: {} ({:.2} ms per batch)",
            per_sec(batches * batch, d),
            d.as_secs_f64() * 1000.0 / batches as f64
        );
    }
}
