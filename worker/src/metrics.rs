//! What a worker process counts and holds, for its `GET /metrics` and for the coordinator.
//!
//! The supervisor's event loop owns the updates (ingest outcomes, frontiers and gauges from the
//! computation, reads); the HTTP thread only renders. Both share one [`WorkerMetrics`].

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use sundial_metrics::prometheus::{HistogramVec, Registry};
use sundial_metrics::WorkerFamilies;
use sundial_protocol::stats::{DataflowStats, SourceStats, WorkerStats};
use sundial_protocol::IngestOutcome;

/// The worker's metrics.
pub struct WorkerMetrics {
    /// The data dir, whose log and checkpoints are measured.
    data_dir: Option<std::path::PathBuf>,
    stats: Mutex<WorkerStats>,
    heard: Mutex<Option<Instant>>,
    registry: Registry,
    /// Latency of read requests served by this worker, from the request's arrival at the
    /// supervisor to the computation's answer.
    pub read_seconds: HistogramVec,
}

impl WorkerMetrics {
    /// Empty metrics of a worker with `data_dir`.
    pub fn new(data_dir: Option<std::path::PathBuf>) -> Result<WorkerMetrics, sundial_metrics::prometheus::Error> {
        let registry = Registry::new();
        let read_seconds = sundial_metrics::read_latency(
            &registry,
            "sundial_worker_read_duration_seconds",
            "Time the worker's computation took to answer a read request.",
        )?;
        Ok(WorkerMetrics {
            data_dir,
            stats: Mutex::new(WorkerStats::default()),
            heard: Mutex::new(None),
            registry,
            read_seconds,
        })
    }

    /// The snapshot, for changing it (held briefly, never across a blocking call).
    pub fn stats(&self) -> MutexGuard<'_, WorkerStats> {
        self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes that the coordinator was heard now (`connected`) or that it is gone.
    pub fn coordinator_heard(&self, connected: bool) {
        let mut heard = self.heard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *heard = connected.then(Instant::now);
    }

    /// A copy of the snapshot, with the coordinator's silence measured now.
    pub fn snapshot(&self) -> WorkerStats {
        let mut stats = self.stats().clone();
        let heard = *self.heard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stats.coordinator_heard_ms_ago = heard.map(|t| t.elapsed().as_millis() as u64);
        if let Some(dir) = &self.data_dir {
            let logs = std::fs::read_dir(dir.join("log")).into_iter().flatten().flatten();
            stats.log_bytes = logs.map(|e| crate::log::bytes(&e.path())).sum();
            stats.checkpoint_bytes = crate::checkpoint::bytes(dir);
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            stats.checkpoint_age_ms = crate::checkpoint::complete(dir).last().map(|e| now.saturating_sub(*e));
        }
        stats
    }

    /// The Prometheus text of everything.
    pub fn render(&self) -> String {
        let snapshot = self.snapshot();
        let mut families = match WorkerFamilies::new(&[]) {
            Ok(f) => {
                f.add(&snapshot, &[]);
                f.gather()
            }
            Err(e) => {
                tracing::error!("building the metric families: {e}");
                Vec::new()
            }
        };
        families.extend(self.registry.gather());
        sundial_metrics::encode(families)
    }

    /// Counts an ingest batch's outcome.
    pub fn ingested(&self, source: &str, outcome: &IngestOutcome) {
        let mut stats = self.stats();
        stats.newest_ingested_epoch = stats.newest_ingested_epoch.max(Some(outcome.epoch));
        let s = source_entry(&mut stats.sources, source);
        s.accepted += outcome.accepted;
        s.rejected += outcome.rejected;
        s.late += outcome.late;
        s.batches += 1;
    }

    /// Records the readable epochs the computation reported: each that moved counts as a
    /// completed epoch.
    pub fn frontiers(&self, frontiers: &[(String, u64)]) {
        let mut stats = self.stats();
        for (name, epoch) in frontiers {
            let d = dataflow_entry(&mut stats.dataflows, name);
            if d.readable_epoch != Some(*epoch) {
                d.readable_epoch = Some(*epoch);
                d.epochs_completed += 1;
            }
        }
    }

    /// Takes the computation's gauges; dataflows it no longer has are forgotten.
    pub fn gauges(
        &self,
        sources: &[sundial_protocol::stats::SourceGauges],
        dataflows: &[sundial_protocol::stats::DataflowGauges],
    ) {
        let mut stats = self.stats();
        for g in sources {
            let s = source_entry(&mut stats.sources, &g.name);
            s.watermark_ms = g.watermark_ms;
            s.max_event_time_ms = g.max_event_time_ms;
        }
        stats.dataflows.retain(|d| dataflows.iter().any(|g| g.name == d.name));
        for g in dataflows {
            let d = dataflow_entry(&mut stats.dataflows, &g.name);
            d.live_slots = g.live_slots;
            d.arrangement_updates = g.arrangement_updates;
            d.state_bytes = g.state_bytes;
        }
    }

    /// A computation of `generation` started (`running`) or ended.
    pub fn computation(&self, generation: u64, running: bool) {
        let mut stats = self.stats();
        stats.generation = generation;
        if running && !stats.computation_running {
            stats.computations_started += 1;
        }
        stats.computation_running = running;
        if !running {
            // The gauges described the computation that ended.
            for s in &mut stats.sources {
                s.watermark_ms = None;
                s.max_event_time_ms = None;
            }
            for d in &mut stats.dataflows {
                d.readable_epoch = None;
                d.live_slots = 0;
                d.arrangement_updates = 0;
                d.state_bytes = 0;
            }
        }
    }

    /// Counts a read served, `started` when its request arrived.
    pub fn read(&self, endpoint: &str, started: Instant) {
        self.read_seconds.with_label_values(&[endpoint]).observe(started.elapsed().as_secs_f64());
        self.stats().reads += 1;
    }
}

fn source_entry<'a>(sources: &'a mut Vec<SourceStats>, name: &str) -> &'a mut SourceStats {
    let i = match sources.binary_search_by(|s| s.name.as_str().cmp(name)) {
        Ok(i) => i,
        Err(i) => {
            sources.insert(i, SourceStats { name: name.to_string(), ..SourceStats::default() });
            i
        }
    };
    &mut sources[i]
}

fn dataflow_entry<'a>(dataflows: &'a mut Vec<DataflowStats>, name: &str) -> &'a mut DataflowStats {
    let i = match dataflows.binary_search_by(|d| d.name.as_str().cmp(name)) {
        Ok(i) => i,
        Err(i) => {
            dataflows.insert(i, DataflowStats { name: name.to_string(), ..DataflowStats::default() });
            i
        }
    };
    &mut dataflows[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_generations_and_gauges_do_not() {
        let m = WorkerMetrics::new(None).unwrap();
        m.computation(1, true);
        let outcome = IngestOutcome { accepted: 10, rejected: 2, late: 1, epoch: 500, errors: Vec::new() };
        m.ingested("tx", &outcome);
        m.ingested("tx", &outcome);
        m.frontiers(&[("spend".into(), 400)]);
        m.frontiers(&[("spend".into(), 400)]);
        m.frontiers(&[("spend".into(), 520)]);
        m.gauges(
            &[sundial_protocol::stats::SourceGauges {
                name: "tx".into(),
                watermark_ms: Some(7),
                max_event_time_ms: Some(9),
            }],
            &[sundial_protocol::stats::DataflowGauges {
                name: "spend".into(),
                live_slots: 3,
                arrangement_updates: 4,
                state_bytes: 100,
            }],
        );
        let s = m.snapshot();
        assert_eq!(
            (s.sources[0].accepted, s.sources[0].rejected, s.sources[0].late, s.sources[0].batches),
            (20, 4, 2, 2)
        );
        assert_eq!(s.dataflows[0].epochs_completed, 2);
        assert_eq!(s.epoch_lag_ms(&s.dataflows[0]), 0);
        assert_eq!(s.sources[0].watermark_ms, Some(7));
        m.computation(1, false);
        m.computation(2, true);
        let s = m.snapshot();
        assert_eq!(s.sources[0].accepted, 20);
        assert_eq!(s.sources[0].watermark_ms, None);
        assert_eq!(s.dataflows[0].live_slots, 0);
        assert_eq!(s.computations_started, 2);
        assert!(m.render().contains("sundial_ingest_events_total{source=\"tx\"} 20"));
    }
}
