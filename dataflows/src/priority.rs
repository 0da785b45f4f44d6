//! Thread priorities. The threads that parse, aggregate and merge run below the threads on a
//! read's way, so that on a busy machine a read that wakes a thread gets a core at once instead
//! of after the running ingest work's time slice. Ingest loses nothing while no read waits: the
//! background threads share whatever the others leave.
//!
//! By default background threads are `SCHED_IDLE` (Linux): a thread of any other policy that
//! wakes preempts them at once. A lower nice value alone does not do that: the running thread
//! keeps its slice (measured in BENCHMARKS.md, "Freshness and point reads under ingest").
//! `SUNDIAL_BACKGROUND_PRIORITY=normal` keeps every thread at the process's priority.

use std::sync::OnceLock;

use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};

/// The environment variable that sets the priority of background threads.
pub const ENV: &str = "SUNDIAL_BACKGROUND_PRIORITY";

/// How background threads run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Background {
    /// `SCHED_IDLE`: any other thread that wakes preempts them.
    Idle,
    /// As every other thread.
    Normal,
}

impl std::str::FromStr for Background {
    type Err = String;
    fn from_str(text: &str) -> Result<Background, String> {
        match text.trim() {
            "idle" => Ok(Background::Idle),
            "normal" => Ok(Background::Normal),
            _ => Err(format!("{ENV} must be idle or normal, not {text:?}")),
        }
    }
}

/// How background threads run in this process: [`ENV`], or [`Background::Idle`]. An unusable
/// value is reported once and the default used.
pub fn background() -> Background {
    static CHOSEN: OnceLock<Background> = OnceLock::new();
    *CHOSEN.get_or_init(|| match std::env::var(ENV) {
        Err(_) => Background::Idle,
        Ok(text) => text.parse().unwrap_or_else(|e: String| {
            tracing::warn!("{e}; background threads run idle");
            Background::Idle
        }),
    })
}

/// Runs the calling thread (only it) as a background thread. A failure (a platform without
/// these policies) only costs read latency: it is logged at debug level.
pub fn run_in_background() {
    if background() == Background::Normal {
        return;
    }
    let me = thread_priority::thread_native_id();
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = thread_priority::set_thread_priority_and_policy(me, ThreadPriority::Min, idle) {
        tracing::debug!(error = ?e, "cannot lower this thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_parsed() {
        assert_eq!("idle".parse(), Ok(Background::Idle));
        assert_eq!(" normal\n".parse(), Ok(Background::Normal));
        for bad in ["10", "low", ""] {
            let e = bad.parse::<Background>().err().unwrap_or_default();
            assert!(e.contains(ENV) && e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn only_the_calling_thread_runs_idle() {
        let policy = || thread_priority::thread_schedule_policy().map_err(|e| format!("{e:?}"));
        let before = policy();
        let lowered = std::thread::spawn(move || {
            run_in_background();
            policy()
        })
        .join();
        let expected = match background() {
            Background::Idle => ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
            Background::Normal => ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
        };
        assert!(matches!(&lowered, Ok(Ok(p)) if *p == expected), "{lowered:?}");
        assert_eq!(policy(), before, "the calling thread's policy is unchanged");
    }
}
