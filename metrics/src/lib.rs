//! Prometheus metrics of sundial processes.
//!
//! A worker keeps its counters and gauges in a [`WorkerStats`] snapshot (its supervisor owns it
//! and also sends it to the coordinator every second). [`WorkerFamilies`] turns snapshots into
//! metric families: on a worker for itself, on the coordinator for every worker, with a `worker`
//! label. Counters are built fresh per scrape from the snapshot's totals, so the text always
//! shows exactly what the snapshot holds. Histograms that must accumulate observations (read
//! latency) live in a long-lived [`Registry`] of the process instead, and both are encoded
//! together by [`encode`].
//!
//! Names follow the Prometheus conventions: `sundial_` prefix, `_total` for counters, base units
//! (`_seconds`, `_bytes`).

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use sundial_protocol::stats::WorkerStats;

pub use prometheus;

/// Buckets of read latency histograms, in seconds: 100 µs to about 6.5 s.
pub fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 2.0, 17).unwrap_or_else(|_| prometheus::DEFAULT_BUCKETS.to_vec())
}

/// A histogram of read latencies by endpoint, registered in `registry`.
pub fn read_latency(registry: &Registry, name: &str, help: &str) -> Result<HistogramVec, prometheus::Error> {
    let histogram = HistogramVec::new(HistogramOpts::new(name, help).buckets(latency_buckets()), &["endpoint"])?;
    registry.register(Box::new(histogram.clone()))?;
    Ok(histogram)
}

/// The metric families of worker snapshots.
pub struct WorkerFamilies {
    extra: Vec<String>,
    accepted: IntCounterVec,
    rejected: IntCounterVec,
    late: IntCounterVec,
    batches: IntCounterVec,
    watermark: GaugeVec,
    max_event_time: GaugeVec,
    watermark_lag: GaugeVec,
    epochs: IntCounterVec,
    readable_epoch: GaugeVec,
    epoch_lag: GaugeVec,
    live_slots: IntGaugeVec,
    updates: IntGaugeVec,
    state_bytes: IntGaugeVec,
    reads: IntCounterVec,
    generation: IntGaugeVec,
    running: IntGaugeVec,
    started: IntCounterVec,
    coordinator_heard: GaugeVec,
    log_bytes: IntGaugeVec,
    checkpoint_bytes: IntGaugeVec,
    checkpoint_age: GaugeVec,
}

fn labels<'a>(first: &[&'a str], extra: &'a [String]) -> Vec<&'a str> {
    first.iter().copied().chain(extra.iter().map(String::as_str)).collect()
}

impl WorkerFamilies {
    /// Families whose every series also carries the labels `extra` (the coordinator adds
    /// `worker`; a worker adds none).
    pub fn new(extra: &[&str]) -> Result<Self, prometheus::Error> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let source = labels(&["source"], &extra);
        let dataflow = labels(&["dataflow"], &extra);
        let none = labels(&[], &extra);
        let counter = |name: &str, help: &str, l: &[&str]| IntCounterVec::new(Opts::new(name, help), l);
        let gauge = |name: &str, help: &str, l: &[&str]| GaugeVec::new(Opts::new(name, help), l);
        let int_gauge = |name: &str, help: &str, l: &[&str]| IntGaugeVec::new(Opts::new(name, help), l);
        Ok(WorkerFamilies {
            accepted: counter("sundial_ingest_events_total", "Events accepted by ingest.", &source)?,
            rejected: counter(
                "sundial_ingest_rejected_total",
                "Lines rejected by ingest (malformed, wrong types).",
                &source,
            )?,
            late: counter("sundial_ingest_late_total", "Events dropped as late (behind the watermark).", &source)?,
            batches: counter("sundial_ingest_batches_total", "Ingest batches answered.", &source)?,
            watermark: gauge(
                "sundial_watermark_seconds",
                "The source's watermark, as event time (Unix seconds).",
                &source,
            )?,
            max_event_time: gauge(
                "sundial_max_event_time_seconds",
                "The largest event time accepted (Unix seconds).",
                &source,
            )?,
            watermark_lag: gauge(
                "sundial_watermark_lag_seconds",
                "How far the watermark is behind the largest event time accepted.",
                &source,
            )?,
            epochs: counter(
                "sundial_epochs_completed_total",
                "Times the dataflow's readable epoch advanced.",
                &dataflow,
            )?,
            readable_epoch: gauge(
                "sundial_readable_epoch_seconds",
                "The newest epoch readable on every thread (Unix seconds of ingest time).",
                &dataflow,
            )?,
            epoch_lag: gauge(
                "sundial_epoch_lag_seconds",
                "How far the newest readable epoch is behind the newest ingested one.",
                &dataflow,
            )?,
            live_slots: int_gauge(
                "sundial_dataflow_live_slots",
                "Live groups (key x pane, session or global window) in the dataflow's state.",
                &dataflow,
            )?,
            updates: int_gauge(
                "sundial_dataflow_arrangement_updates",
                "Updates held by the dataflow's arrangement.",
                &dataflow,
            )?,
            state_bytes: int_gauge(
                "sundial_dataflow_state_bytes",
                "Bytes of the dataflow's state (arrangement and live groups).",
                &dataflow,
            )?,
            reads: counter("sundial_worker_reads_total", "Read requests served by the worker.", &none)?,
            generation: int_gauge("sundial_worker_generation", "The generation of the worker's computation.", &none)?,
            running: int_gauge(
                "sundial_worker_computation_running",
                "1 while the worker's computation runs and is connected to its peers.",
                &none,
            )?,
            started: counter("sundial_worker_computations_started_total", "Computations the worker started.", &none)?,
            coordinator_heard: gauge(
                "sundial_worker_coordinator_heard_seconds",
                "Seconds since the worker last heard from the coordinator.",
                &none,
            )?,
            log_bytes: int_gauge("sundial_log_bytes", "Bytes of the worker's ingest log segments on disk.", &none)?,
            checkpoint_bytes: int_gauge(
                "sundial_checkpoint_bytes",
                "Bytes of the worker's checkpoint files on disk.",
                &none,
            )?,
            checkpoint_age: gauge(
                "sundial_checkpoint_age_seconds",
                "Seconds since the epoch of the worker's newest complete checkpoint.",
                &none,
            )?,
            extra,
        })
    }

    fn collectors(&self) -> Vec<&dyn Collector> {
        vec![
            &self.accepted,
            &self.rejected,
            &self.late,
            &self.batches,
            &self.watermark,
            &self.max_event_time,
            &self.watermark_lag,
            &self.epochs,
            &self.readable_epoch,
            &self.epoch_lag,
            &self.live_slots,
            &self.updates,
            &self.state_bytes,
            &self.reads,
            &self.generation,
            &self.running,
            &self.started,
            &self.coordinator_heard,
            &self.log_bytes,
            &self.checkpoint_bytes,
            &self.checkpoint_age,
        ]
    }

    /// Adds the series of one worker's snapshot; `extra` gives the values of the extra labels.
    pub fn add(&self, stats: &WorkerStats, extra: &[&str]) {
        debug_assert_eq!(extra.len(), self.extra.len());
        fn with<'a>(first: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
            std::iter::once(first).chain(extra.iter().copied()).collect()
        }
        for s in &stats.sources {
            let l = with(&s.name, extra);
            self.accepted.with_label_values(&l).inc_by(s.accepted);
            self.rejected.with_label_values(&l).inc_by(s.rejected);
            self.late.with_label_values(&l).inc_by(s.late);
            self.batches.with_label_values(&l).inc_by(s.batches);
            if let Some(w) = s.watermark_ms {
                self.watermark.with_label_values(&l).set(w as f64 / 1000.0);
            }
            if let Some(m) = s.max_event_time_ms {
                self.max_event_time.with_label_values(&l).set(m as f64 / 1000.0);
            }
            if let (Some(w), Some(m)) = (s.watermark_ms, s.max_event_time_ms) {
                self.watermark_lag.with_label_values(&l).set(m.saturating_sub(w).max(0) as f64 / 1000.0);
            }
        }
        for d in &stats.dataflows {
            let l = with(&d.name, extra);
            self.epochs.with_label_values(&l).inc_by(d.epochs_completed);
            if let Some(e) = d.readable_epoch {
                self.readable_epoch.with_label_values(&l).set(e as f64 / 1000.0);
            }
            self.epoch_lag.with_label_values(&l).set(stats.epoch_lag_ms(d) as f64 / 1000.0);
            self.live_slots.with_label_values(&l).set(clamp(d.live_slots));
            self.updates.with_label_values(&l).set(clamp(d.arrangement_updates));
            self.state_bytes.with_label_values(&l).set(clamp(d.state_bytes));
        }
        self.reads.with_label_values(extra).inc_by(stats.reads);
        self.generation.with_label_values(extra).set(clamp(stats.generation));
        self.running.with_label_values(extra).set(i64::from(stats.computation_running));
        self.started.with_label_values(extra).inc_by(stats.computations_started);
        if let Some(ms) = stats.coordinator_heard_ms_ago {
            self.coordinator_heard.with_label_values(extra).set(ms as f64 / 1000.0);
        }
        self.log_bytes.with_label_values(extra).set(clamp(stats.log_bytes));
        self.checkpoint_bytes.with_label_values(extra).set(clamp(stats.checkpoint_bytes));
        if let Some(ms) = stats.checkpoint_age_ms {
            self.checkpoint_age.with_label_values(extra).set(ms as f64 / 1000.0);
        }
    }

    /// The families with at least one series.
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.collectors().into_iter().flat_map(|c| c.collect()).filter(|f| !f.get_metric().is_empty()).collect()
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The Prometheus text format of `families`, sorted by name.
pub fn encode(mut families: Vec<MetricFamily>) -> String {
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    match prometheus::TextEncoder::new().encode(&families, &mut out) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(e) => format!("# encoding the metrics failed: {e}\n"),
    }
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_protocol::stats::{DataflowStats, SourceStats};

    fn sample() -> WorkerStats {
        WorkerStats {
            generation: 3,
            computation_running: true,
            computations_started: 2,
            newest_ingested_epoch: Some(10_500),
            sources: vec![SourceStats {
                name: "tx".into(),
                accepted: 1000,
                rejected: 7,
                late: 2,
                batches: 4,
                watermark_ms: Some(5_000),
                max_event_time_ms: Some(8_000),
            }],
            dataflows: vec![DataflowStats {
                name: "spend".into(),
                readable_epoch: Some(10_000),
                epochs_completed: 50,
                live_slots: 300,
                arrangement_updates: 600,
                state_bytes: 48_000,
            }],
            reads: 12,
            coordinator_heard_ms_ago: Some(250),
            log_bytes: 4096,
            checkpoint_bytes: 1024,
            checkpoint_age_ms: Some(1500),
        }
    }

    fn value(samples: &[prometheus_parse::Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
        let sample = samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        }
    }

    #[test]
    fn a_worker_snapshot_renders_as_parseable_text() {
        let families = WorkerFamilies::new(&[]).unwrap();
        families.add(&sample(), &[]);
        let text = encode(families.gather());
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let s = &scrape.samples;
        assert_eq!(value(s, "sundial_ingest_events_total", Some(("source", "tx"))), 1000.0);
        assert_eq!(value(s, "sundial_ingest_rejected_total", Some(("source", "tx"))), 7.0);
        assert_eq!(value(s, "sundial_ingest_late_total", Some(("source", "tx"))), 2.0);
        assert_eq!(value(s, "sundial_watermark_seconds", Some(("source", "tx"))), 5.0);
        assert_eq!(value(s, "sundial_watermark_lag_seconds", Some(("source", "tx"))), 3.0);
        assert_eq!(value(s, "sundial_epoch_lag_seconds", Some(("dataflow", "spend"))), 0.5);
        assert_eq!(value(s, "sundial_dataflow_state_bytes", Some(("dataflow", "spend"))), 48_000.0);
        assert_eq!(value(s, "sundial_worker_generation", None), 3.0);
        assert_eq!(value(s, "sundial_log_bytes", None), 4096.0);
        assert_eq!(value(s, "sundial_checkpoint_age_seconds", None), 1.5);
        assert!(text.contains("# TYPE sundial_ingest_events_total counter"), "{text}");
    }

    #[test]
    fn the_coordinator_labels_each_worker() {
        let families = WorkerFamilies::new(&["worker"]).unwrap();
        let mut second = sample();
        second.sources[0].accepted = 5;
        families.add(&sample(), &["0"]);
        families.add(&second, &["1"]);
        let text = encode(families.gather());
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let accepted: Vec<f64> = ["0", "1"]
            .iter()
            .map(|w| {
                scrape
                    .samples
                    .iter()
                    .find(|s| s.metric == "sundial_ingest_events_total" && s.labels.get("worker") == Some(w))
                    .map(|s| match s.value {
                        prometheus_parse::Value::Counter(v) => v,
                        _ => f64::NAN,
                    })
                    .unwrap()
            })
            .collect();
        assert_eq!(accepted, vec![1000.0, 5.0]);
    }

    #[test]
    fn histograms_accumulate() {
        let registry = Registry::new();
        let reads = read_latency(&registry, "sundial_read_duration_seconds", "Read latency.").unwrap();
        reads.with_label_values(&["key"]).observe(0.0004);
        reads.with_label_values(&["key"]).observe(0.002);
        let text = encode(registry.gather());
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let count = scrape.samples.iter().find(|s| s.metric == "sundial_read_duration_seconds_count").unwrap();
        assert!(matches!(count.value, prometheus_parse::Value::Untyped(2.0) | prometheus_parse::Value::Counter(2.0)));
    }
}
