//! The sundial coordinator: cluster membership, and the HTTP API that clients talk to.
//!
//! It never links timely: it speaks the [`sundial_protocol`] to worker processes over its
//! control port, keeps the [`membership`] state machine, and answers HTTP on another port.
//! Process-index assignments and the generation number are persisted in its data dir, so a
//! restarted coordinator gives every worker its old index and can adopt a generation that kept
//! running while it was away.

pub mod catalog;
pub mod http;
pub mod membership;
pub mod ops;
pub mod server;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use membership::{Membership, Persisted, Timing};

/// How the coordinator is configured.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// The control port's address.
    pub listen: String,
    /// The HTTP API's address.
    pub http: String,
    /// Worker processes in the cluster.
    pub workers: usize,
    /// Where the coordinator keeps its state.
    pub data_dir: PathBuf,
    /// Heartbeat timing.
    pub timing: Timing,
    /// How often the cluster takes a checkpoint.
    pub checkpoint_interval: Duration,
}

/// Errors that stop the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A flag is out of range.
    #[error("{0}")]
    Config(String),
    /// A port cannot be bound.
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        /// Which port.
        what: &'static str,
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// The data dir cannot be used.
    #[error("data dir {path}: {message}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// The addresses the coordinator actually bound, written to `addresses.json` in its data dir so
/// that `sundial local` and tests can use port 0.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BoundAddresses {
    /// The control port.
    pub control: String,
    /// The HTTP API.
    pub http: String,
}

/// Version of the `membership.json` format.
const MEMBERSHIP_FORMAT: u32 = 1;

/// `membership.json`: the persisted membership with its format version.
#[derive(Serialize, Deserialize)]
pub(crate) struct MembershipFile {
    format: u32,
    #[serde(flatten)]
    persisted: Persisted,
}

impl MembershipFile {
    pub(crate) fn new(persisted: Persisted) -> Self {
        MembershipFile { format: MEMBERSHIP_FORMAT, persisted }
    }
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    if config.workers == 0 || config.workers > 1024 {
        return Err(CoordinatorError::Config(format!("--workers must be between 1 and 1024, not {}", config.workers)));
    }
    if config.timing.heartbeat_timeout <= config.timing.heartbeat_interval {
        return Err(CoordinatorError::Config("--heartbeat-timeout must be longer than --heartbeat-interval".into()));
    }
    let data_err = |message: String| CoordinatorError::DataDir { path: config.data_dir.clone(), message };
    std::fs::create_dir_all(&config.data_dir).map_err(|e| data_err(e.to_string()))?;
    let membership_file = config.data_dir.join("membership.json");
    let persisted = match store::read_json::<MembershipFile>(&membership_file).map_err(data_err)? {
        None => Persisted::default(),
        Some(file) if file.format == MEMBERSHIP_FORMAT => file.persisted,
        Some(file) => {
            return Err(data_err(format!(
                "membership.json has format {}, this coordinator reads format {MEMBERSHIP_FORMAT}",
                file.format
            )))
        }
    };
    if persisted.workers.len() > config.workers {
        tracing::warn!(
            persisted = persisted.workers.len(),
            workers = config.workers,
            "fewer workers than before; the assignments of the extra indices are forgotten"
        );
    }

    let control = tokio::net::TcpListener::bind(&config.listen).await.map_err(|source| CoordinatorError::Bind {
        what: "control",
        addr: config.listen.clone(),
        source,
    })?;
    let http = tokio::net::TcpListener::bind(&config.http).await.map_err(|source| CoordinatorError::Bind {
        what: "HTTP",
        addr: config.http.clone(),
        source,
    })?;
    let bound = BoundAddresses {
        control: control.local_addr().map_err(CoordinatorError::Http)?.to_string(),
        http: http.local_addr().map_err(CoordinatorError::Http)?.to_string(),
    };
    store::write_json_atomic(&config.data_dir.join("addresses.json"), &bound).map_err(|e| data_err(e.to_string()))?;
    tracing::info!(control = %bound.control, http = %bound.http, workers = config.workers, generation = persisted.generation, "coordinator listening");

    let catalog_file = config.data_dir.join("catalog.json");
    let mut catalog = match store::read_json::<catalog::Catalog>(&catalog_file).map_err(data_err)? {
        None => catalog::Catalog::default(),
        Some(c) if c.format == catalog::CATALOG_FORMAT => c,
        Some(c) => {
            return Err(data_err(format!(
                "catalog.json has format {}, this coordinator reads format {}",
                c.format,
                catalog::CATALOG_FORMAT
            )))
        }
    };
    catalog.assign_ids();
    tracing::info!(sources = catalog.sources.len(), dataflows = catalog.dataflows.len(), "catalog loaded");
    let membership = Membership::new(config.workers, config.timing, persisted);
    let ops = ops::Ops::new().map_err(|e| CoordinatorError::Config(format!("setting up the metrics: {e}")))?;
    let shared = server::Shared::new(membership, membership_file, catalog, catalog_file, ops);
    shared.set_checkpoint_interval(config.checkpoint_interval);
    let control_task = tokio::spawn(server::serve_control(std::sync::Arc::clone(&shared), control));
    let ticker = {
        let shared = std::sync::Arc::clone(&shared);
        let every = (config.timing.heartbeat_interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(100));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            loop {
                interval.tick().await;
                shared.tick();
            }
        })
    };
    let sampler = {
        let shared = std::sync::Arc::clone(&shared);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            loop {
                interval.tick().await;
                shared.ops.sample();
            }
        })
    };
    let checkpointer = {
        let shared = std::sync::Arc::clone(&shared);
        let every = config.checkpoint_interval;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                shared.checkpoint().await;
            }
        })
    };
    let app = http::router(std::sync::Arc::clone(&shared));
    // A clean shutdown takes a last checkpoint first, so that the next start replays nothing.
    let last_checkpoint = async move {
        shutdown.await;
        shared.final_checkpoint(Duration::from_secs(10)).await;
    };
    let result = axum::serve(http, app).with_graceful_shutdown(last_checkpoint).await.map_err(CoordinatorError::Http);
    control_task.abort();
    ticker.abort();
    sampler.abort();
    checkpointer.abort();
    tracing::info!("coordinator stopped");
    result
}

/// Wrapper so the membership module's serde types stay in one place.
pub use membership::ClusterStatus;
