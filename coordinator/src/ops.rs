//! What the coordinator knows about the cluster's work, for `GET /metrics`, `GET /v1/stats`, the
//! status page and `sundial status`: every worker's latest stats (sent every second), the
//! coordinator's own read latencies, and a history of ingest and read rates over the last
//! [`HISTORY`] samples (one per second), so that a page opened now shows the last minutes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use sundial_metrics::prometheus::{HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use sundial_metrics::WorkerFamilies;
use sundial_protocol::stats::WorkerStats;

use crate::catalog::Catalog;
use crate::membership::ClusterStatus;

/// Samples of the rate history kept (one per second: ten minutes).
pub const HISTORY: usize = 600;

/// The read endpoints whose latency is measured.
pub const READ_ENDPOINTS: [&str; 3] = ["key", "lookup", "export"];

/// One second of the history.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// When, Unix ms.
    pub unix_ms: u64,
    /// Events accepted per second since the previous sample.
    pub ingest_per_second: f64,
    /// Reads answered per second since the previous sample.
    pub reads_per_second: f64,
    #[serde(skip)]
    accepted: u64,
    #[serde(skip)]
    reads: u64,
    #[serde(skip)]
    at: Option<Instant>,
}

/// The coordinator's metrics and the workers' reports.
pub struct Ops {
    registry: Registry,
    /// Latency of reads answered by the HTTP API, by endpoint (to the response's head; an export
    /// streams its body after that).
    pub read_seconds: HistogramVec,
    /// Ingest requests to the coordinator's endpoint, by HTTP status.
    pub ingest_requests: IntCounterVec,
    workers: Mutex<BTreeMap<usize, (WorkerStats, Instant)>>,
    history: Mutex<VecDeque<Sample>>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Ops {
    /// Empty metrics.
    pub fn new() -> Result<Ops, sundial_metrics::prometheus::Error> {
        let registry = Registry::new();
        let read_seconds = sundial_metrics::read_latency(
            &registry,
            "sundial_read_duration_seconds",
            "Time to answer a read through the HTTP API, by endpoint.",
        )?;
        let ingest_requests = IntCounterVec::new(
            Opts::new("sundial_http_ingest_requests_total", "Ingest requests to the coordinator, by HTTP status."),
            &["status"],
        )?;
        registry.register(Box::new(ingest_requests.clone()))?;
        Ok(Ops {
            registry,
            read_seconds,
            ingest_requests,
            workers: Mutex::new(BTreeMap::new()),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
        })
    }

    fn workers(&self) -> MutexGuard<'_, BTreeMap<usize, (WorkerStats, Instant)>> {
        self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn history(&self) -> MutexGuard<'_, VecDeque<Sample>> {
        self.history.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps the stats worker `index` reported.
    pub fn record_worker(&self, index: usize, stats: WorkerStats) {
        self.workers().insert(index, (stats, Instant::now()));
    }

    /// Reads answered so far, over all endpoints.
    pub fn reads(&self) -> u64 {
        READ_ENDPOINTS.iter().map(|e| self.read_seconds.with_label_values(&[*e]).get_sample_count()).sum()
    }

    /// Events accepted so far, summed over the workers' reports.
    pub fn accepted(&self) -> u64 {
        self.workers().values().flat_map(|(s, _)| s.sources.iter()).map(|s| s.accepted).sum()
    }

    /// Takes one sample of the rates; called every second.
    pub fn sample(&self) {
        let (accepted, reads, now) = (self.accepted(), self.reads(), Instant::now());
        let mut history = self.history();
        let (ingest_per_second, reads_per_second) = match history.back() {
            Some(prev) => {
                let secs = prev.at.map_or(1.0, |t| now.duration_since(t).as_secs_f64()).max(0.001);
                // A worker that restarted counts from zero again: no negative rates.
                (accepted.saturating_sub(prev.accepted) as f64 / secs, reads.saturating_sub(prev.reads) as f64 / secs)
            }
            None => (0.0, 0.0),
        };
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(Sample {
            unix_ms: unix_ms(),
            ingest_per_second,
            reads_per_second,
            accepted,
            reads,
            at: Some(now),
        });
    }

    /// The Prometheus text: the coordinator's own metrics, the cluster's, and every worker's
    /// latest report (label `worker`).
    pub fn render(&self, status: &ClusterStatus, catalog: &Catalog) -> String {
        let mut families = self.registry.gather();
        match self.cluster_families(status, catalog) {
            Ok(f) => families.extend(f),
            Err(e) => tracing::error!("building the cluster metrics: {e}"),
        }
        match WorkerFamilies::new(&["worker"]) {
            Ok(f) => {
                for (index, (stats, _)) in self.workers().iter() {
                    f.add(stats, &[&index.to_string()]);
                }
                families.extend(f.gather());
            }
            Err(e) => tracing::error!("building the worker metrics: {e}"),
        }
        sundial_metrics::encode(families)
    }

    fn cluster_families(
        &self,
        status: &ClusterStatus,
        catalog: &Catalog,
    ) -> Result<Vec<sundial_metrics::prometheus::proto::MetricFamily>, sundial_metrics::prometheus::Error> {
        use sundial_metrics::prometheus::core::Collector;
        use sundial_metrics::prometheus::{GaugeVec, IntGauge};
        let generation = IntGauge::new("sundial_cluster_generation", "The cluster's current (or last) generation.")?;
        generation.set(i64::try_from(status.generation).unwrap_or(i64::MAX));
        let state = IntGaugeVec::new(
            Opts::new("sundial_cluster_state", "1 for the cluster's state (waiting, forming, running, degraded)."),
            &["state"],
        )?;
        for s in ["waiting", "forming", "running", "degraded"] {
            state.with_label_values(&[s]).set(i64::from(status.state == s));
        }
        let workers = IntGaugeVec::new(Opts::new("sundial_cluster_workers", "Worker slots by state."), &["state"])?;
        let mut by_state: BTreeMap<String, i64> = BTreeMap::new();
        for w in &status.workers {
            let name = serde_json::to_value(w.state).ok().and_then(|v| v.as_str().map(str::to_string));
            *by_state.entry(name.unwrap_or_else(|| "unknown".into())).or_default() += 1;
        }
        for (s, n) in by_state {
            workers.with_label_values(&[&s]).set(n);
        }
        let heartbeat = GaugeVec::new(
            Opts::new("sundial_worker_heartbeat_age_seconds", "Seconds since each worker's last heartbeat."),
            &["worker"],
        )?;
        for w in &status.workers {
            if let Some(ms) = w.last_heartbeat_ms_ago {
                heartbeat.with_label_values(&[&w.index.to_string()]).set(ms as f64 / 1000.0);
            }
        }
        let sources = IntGauge::new("sundial_catalog_sources", "Sources in the catalog.")?;
        sources.set(catalog.sources.len() as i64);
        let dataflows = IntGauge::new("sundial_catalog_dataflows", "Dataflows in the catalog.")?;
        dataflows.set(catalog.dataflows.len() as i64);
        let collectors: [&dyn Collector; 6] = [&generation, &state, &workers, &heartbeat, &sources, &dataflows];
        Ok(collectors.iter().flat_map(|c| c.collect()).filter(|f| !f.get_metric().is_empty()).collect())
    }

    /// The summary behind `GET /v1/stats`: totals and rates, per source, per dataflow (with its
    /// features), per worker, and the rate history.
    pub fn summary(&self, status: &ClusterStatus, catalog: &Catalog) -> Value {
        let workers = self.workers();
        let history = self.history();
        // Rates over the last five seconds of samples.
        let recent: Vec<&Sample> = history.iter().rev().take(5).collect();
        let average = |f: fn(&Sample) -> f64| {
            if recent.is_empty() {
                0.0
            } else {
                recent.iter().map(|s| f(s)).sum::<f64>() / recent.len() as f64
            }
        };
        let live: Vec<(usize, &WorkerStats)> = workers.iter().map(|(i, (s, _))| (*i, s)).collect();

        let sources: Vec<Value> = catalog
            .sources
            .iter()
            .map(|entry| {
                let name = &entry.plan.name;
                let per: Vec<_> = live.iter().flat_map(|(_, s)| s.sources.iter().filter(|x| &x.name == name)).collect();
                let watermark = per.iter().filter_map(|s| s.watermark_ms).max();
                let max_event_time = per.iter().filter_map(|s| s.max_event_time_ms).max();
                json!({
                    "name": name,
                    "accepted": per.iter().map(|s| s.accepted).sum::<u64>(),
                    "rejected": per.iter().map(|s| s.rejected).sum::<u64>(),
                    "late": per.iter().map(|s| s.late).sum::<u64>(),
                    "watermark_ms": watermark,
                    "max_event_time_ms": max_event_time,
                    "watermark_lag_ms": watermark.zip(max_event_time).map(|(w, m)| m.saturating_sub(w).max(0)),
                })
            })
            .collect();

        let dataflows: Vec<Value> = catalog
            .dataflows
            .iter()
            .map(|entry| {
                let name = &entry.plan.name;
                let per: Vec<(&WorkerStats, &sundial_protocol::stats::DataflowStats)> = live
                    .iter()
                    .flat_map(|(_, s)| s.dataflows.iter().filter(|d| &d.name == name).map(move |d| (*s, d)))
                    .collect();
                let readable = if per.len() == live.len() && !per.is_empty() {
                    per.iter()
                        .map(|(_, d)| d.readable_epoch)
                        .collect::<Option<Vec<u64>>>()
                        .and_then(|v| v.into_iter().min())
                } else {
                    None
                };
                json!({
                    "name": name,
                    "source": entry.plan.source.name,
                    "features": entry.spec.get("features").cloned().unwrap_or(Value::Null),
                    "live_slots": per.iter().map(|(_, d)| d.live_slots).sum::<u64>(),
                    "arrangement_updates": per.iter().map(|(_, d)| d.arrangement_updates).sum::<u64>(),
                    "state_bytes": per.iter().map(|(_, d)| d.state_bytes).sum::<u64>(),
                    "readable_epoch": readable,
                    "epoch_lag_ms": per.iter().map(|(s, d)| s.epoch_lag_ms(d)).max().unwrap_or(0),
                })
            })
            .collect();

        let worker_rows: Vec<Value> = status
            .workers
            .iter()
            .map(|w| {
                let report = workers.get(&w.index);
                json!({
                    "index": w.index,
                    "host": w.host,
                    "state": w.state,
                    "heartbeat_ms_ago": w.last_heartbeat_ms_ago,
                    "computation_running": report.map(|(s, _)| s.computation_running),
                    "accepted": report.map(|(s, _)| s.sources.iter().map(|x| x.accepted).sum::<u64>()),
                    "state_bytes": report.map(|(s, _)| s.dataflows.iter().map(|d| d.state_bytes).sum::<u64>()),
                    "reads": report.map(|(s, _)| s.reads),
                    "report_ms_ago": report.map(|(_, at)| at.elapsed().as_millis() as u64),
                })
            })
            .collect();

        json!({
            "generation": status.generation,
            "state": status.state,
            "ingest": {
                "events_per_second": average(|s| s.ingest_per_second),
                "accepted": sources.iter().filter_map(|s| s["accepted"].as_u64()).sum::<u64>(),
                "rejected": sources.iter().filter_map(|s| s["rejected"].as_u64()).sum::<u64>(),
                "late": sources.iter().filter_map(|s| s["late"].as_u64()).sum::<u64>(),
            },
            "reads": {
                "per_second": average(|s| s.reads_per_second),
                "total": READ_ENDPOINTS.iter().map(|e| self.read_seconds.with_label_values(&[*e]).get_sample_count()).sum::<u64>(),
            },
            "state_bytes": dataflows.iter().filter_map(|d| d["state_bytes"].as_u64()).sum::<u64>(),
            "sources": sources,
            "dataflows": dataflows,
            "workers": worker_rows,
            "history": history.iter().collect::<Vec<_>>(),
        })
    }
}
