//! sundial's dataflows: plans and commands rendered into timely (and, for features,
//! differential) operators.
//!
//! Nothing here opens a socket or runs an async runtime; every piece can be built and tested in
//! one thread with `timely::execute_directly` or in one process with several worker threads.
//!
//! * [`control`]: the control dataflow that every worker builds first. Commands enter it at worker
//!   0 only, stamped with consecutive times, and are broadcast, so every worker sees the same
//!   commands in the same order.
//! * [`diagnostic`]: the exchange check that proves the processes form one computation.

pub mod acc;
pub mod batcher;
pub mod control;
pub mod diagnostic;
pub mod eval;
pub mod features;
pub mod read;
pub mod row;
pub mod spine;

/// Lets any thread that waits for a core run first. Background work that runs for milliseconds
/// at a time (parsing an ingest body, merging batches) calls it about every 100 µs of work: when
/// every core is busy, a thread on a read's path that wakes up then waits that long at most,
/// instead of the rest of the background thread's scheduler slice. (Single-key p99 under ingest
/// 15-20% lower in four of four pairs, ingest unchanged: BENCHMARKS.md, session 6.)
pub fn let_waiting_threads_run() {
    std::thread::yield_now();
}
