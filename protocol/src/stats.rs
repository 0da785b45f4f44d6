//! Snapshots of what a worker process has done and holds: what its `/metrics` shows, what it
//! reports to the coordinator every second, and what the status page and `sundial status` sum.
//!
//! Counters (`accepted`, `rejected`, `late`, `reads`, …) count since the worker process started
//! and survive its generations; gauges (watermarks, state sizes) describe the running computation.

use serde::{Deserialize, Serialize};

/// A source's state in the running computation of one process.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceGauges {
    /// The source.
    pub name: String,
    /// The watermark agreed in the dataflows reading the source (ms of event time).
    pub watermark_ms: Option<i64>,
    /// The largest event time this process has accepted (ms).
    pub max_event_time_ms: Option<i64>,
}

/// A dataflow's state on one process, summed over its worker threads.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataflowGauges {
    /// The dataflow.
    pub name: String,
    /// Live slots (key × pane, session or global group) in the aggregates' state.
    pub live_slots: u64,
    /// Updates held by the dataflow's arrangement (its batches' lengths).
    pub arrangement_updates: u64,
    /// Bytes of state: the arrangement's updates and the live slots, at their in-memory sizes.
    pub state_bytes: u64,
}

/// Per-source counters of one process.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceStats {
    /// The source.
    pub name: String,
    /// Events accepted.
    pub accepted: u64,
    /// Lines rejected (malformed, wrong types, …).
    pub rejected: u64,
    /// Events dropped as late.
    pub late: u64,
    /// Ingest batches answered.
    pub batches: u64,
    /// The watermark (ms of event time), while a computation runs.
    pub watermark_ms: Option<i64>,
    /// The largest event time accepted (ms), while a computation runs.
    pub max_event_time_ms: Option<i64>,
}

/// Per-dataflow state of one process.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataflowStats {
    /// The dataflow.
    pub name: String,
    /// The newest epoch readable on every thread of this process.
    pub readable_epoch: Option<u64>,
    /// How often the readable epoch advanced (since the process started).
    pub epochs_completed: u64,
    /// See [`DataflowGauges::live_slots`].
    pub live_slots: u64,
    /// See [`DataflowGauges::arrangement_updates`].
    pub arrangement_updates: u64,
    /// See [`DataflowGauges::state_bytes`].
    pub state_bytes: u64,
}

/// Everything one worker process reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkerStats {
    /// The generation of its computation (0 before the first).
    pub generation: u64,
    /// A computation runs and is connected to its peers.
    pub computation_running: bool,
    /// Computations this process started (generations it took part in).
    pub computations_started: u64,
    /// The newest epoch an ingest reply of this process named.
    pub newest_ingested_epoch: Option<u64>,
    /// Per source, sorted by name.
    pub sources: Vec<SourceStats>,
    /// Per dataflow, sorted by name.
    pub dataflows: Vec<DataflowStats>,
    /// Read requests served.
    pub reads: u64,
    /// Milliseconds since the coordinator was last heard (`None`: not connected).
    pub coordinator_heard_ms_ago: Option<u64>,
    /// Bytes of the ingest log segments on disk.
    #[serde(default)]
    pub log_bytes: u64,
    /// Bytes of the checkpoint files on disk.
    #[serde(default)]
    pub checkpoint_bytes: u64,
    /// Milliseconds since the epoch of the newest complete checkpoint (`None`: none yet).
    #[serde(default)]
    pub checkpoint_age_ms: Option<u64>,
}

impl WorkerStats {
    /// How far the readable epoch of `dataflow` is behind the newest ingested epoch, in ms
    /// (0 when everything ingested is readable).
    pub fn epoch_lag_ms(&self, dataflow: &DataflowStats) -> u64 {
        match (self.newest_ingested_epoch, dataflow.readable_epoch) {
            (Some(ingested), Some(readable)) => ingested.saturating_sub(readable),
            (Some(_), None) => 0,
            (None, _) => 0,
        }
    }
}
