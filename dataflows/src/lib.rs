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
pub mod priority;
pub mod read;
pub mod row;
pub mod spine;
