//! The sundial worker process.
//!
//! `sundial worker` runs the [`supervisor`]: it registers with the coordinator, keeps a stable
//! identity in its data dir, sends heartbeats, and for every generation the coordinator forms
//! spawns a [`computation`] child (the same binary, hidden subcommand `computation`) that runs
//! the timely workers over a [`mesh`] of TCP connections to the other processes. A dead peer
//! takes the child down (timely is fail-fast); the supervisor stays, reports it and waits for
//! the next generation.

pub mod checkpoint;
pub mod computation;
pub mod engine;
pub mod ingest;
pub mod lines;
pub mod log;
pub mod mesh;
pub mod metrics;
pub mod supervisor;

pub use supervisor::{run, SupervisorConfig, WorkerError};
