//! The membership state machine: which worker holds which process index, whether the cluster is
//! formed, and when to form the next generation.
//!
//! It is plain data and functions of `(state, input, now)`: no sockets, no clock of its own, so
//! every transition is unit-tested. The server feeds it connections, messages and ticks, and
//! carries out the [`Action`]s it returns.
//!
//! Phases: `waiting` (not every worker has registered yet) → `forming` (a [`CoordMsg::Form`] was
//! sent for a new generation; waiting for every worker's `Started`) → `running`. The loss of a
//! worker, or the failure of any process's computation, ends the generation: `degraded` until
//! every index has a connected worker again, then `forming` with generation + 1.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use sundial_protocol::{ComputationState, CoordMsg, Formation, Register, WorkerMsg};

/// Identifies one control connection.
pub type ConnId = u64;

/// What the server must do on behalf of the state machine.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // moved once per message; boxing would only add allocations
pub enum Action {
    /// Send a message on a connection.
    Send(ConnId, CoordMsg),
    /// Close a connection.
    Close(ConnId),
}

/// Timing of the membership protocol.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How often workers send heartbeats, and the coordinator pings.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is lost.
    pub heartbeat_timeout: Duration,
    /// How long a formation may take before the generation is given up.
    pub formation_timeout: Duration,
    /// The pause after a failed generation before the next one is formed.
    pub retry_pause: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            formation_timeout: Duration::from_secs(45),
            retry_pause: Duration::from_millis(500),
        }
    }
}

/// The part of the membership that survives a coordinator restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Persisted {
    /// The newest generation ever formed.
    pub generation: u64,
    /// The worker id that holds each process index.
    pub workers: Vec<Option<String>>,
}

/// The state of one process index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// No worker has ever held this index.
    Unassigned,
    /// Connected, with no computation in the current generation.
    Idle,
    /// Connected; its computation is connecting to its peers.
    Starting,
    /// Connected and running the current generation.
    Running,
    /// Not connected.
    Lost,
}

#[derive(Clone, Debug)]
struct Slot {
    worker_id: Option<String>,
    conn: Option<ConnId>,
    host: String,
    data_addr: String,
    ingest_addr: Option<String>,
    lines_addr: Option<String>,
    threads: usize,
    pid: Option<u32>,
    computation_pid: Option<u32>,
    state: WorkerState,
    last_heartbeat: Option<(Instant, SystemTime)>,
    lost_reason: Option<String>,
}

impl Slot {
    fn empty() -> Self {
        Slot {
            worker_id: None,
            conn: None,
            host: String::new(),
            data_addr: String::new(),
            ingest_addr: None,
            lines_addr: None,
            threads: 0,
            pid: None,
            computation_pid: None,
            state: WorkerState::Unassigned,
            last_heartbeat: None,
            lost_reason: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Waiting,
    Forming { since: Instant },
    Running { since: Instant },
    Degraded,
}

/// Why a registration was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// In words for the operator.
    pub reason: String,
    /// The refusal may pass by itself: the worker should try again.
    pub retry: bool,
}

impl Refusal {
    fn fatal(reason: String) -> Refusal {
        Refusal { reason, retry: false }
    }
}

/// The cluster's membership.
#[derive(Debug)]
pub struct Membership {
    timing: Timing,
    generation: u64,
    slots: Vec<Slot>,
    phase: Phase,
    /// Why the last generation ended, for the status.
    last_failure: Option<String>,
    not_before: Option<Instant>,
    next_ping: Option<Instant>,
    dirty: bool,
}

/// The cluster as `GET /v1/cluster` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    /// The current (or last) generation; 0 before the first.
    pub generation: u64,
    /// `waiting`, `forming`, `running` or `degraded`.
    pub state: &'static str,
    /// Why the cluster is not running, if it is not.
    pub reason: Option<String>,
    /// `--workers`.
    pub expected_workers: usize,
    /// Workers connected now.
    pub registered_workers: usize,
    /// Timely threads per worker process (0 before any registered).
    pub threads_per_worker: usize,
    /// One entry per process index.
    pub workers: Vec<WorkerStatus>,
}

/// One process index in [`ClusterStatus`].
#[derive(Clone, Debug, Serialize)]
pub struct WorkerStatus {
    /// The process index.
    pub index: usize,
    /// The worker id holding it.
    pub id: Option<String>,
    /// The worker's host name.
    pub host: String,
    /// Its timely data address.
    pub data_addr: String,
    /// Where it takes ingest requests over HTTP, if it does.
    pub ingest_addr: Option<String>,
    /// Where it takes NDJSON over its raw TCP line port, if it does.
    pub lines_addr: Option<String>,
    /// Its thread count.
    pub threads: usize,
    /// The worker (supervisor) process id.
    pub pid: Option<u32>,
    /// The process id of its computation child, if one runs.
    pub computation_pid: Option<u32>,
    /// Its state.
    pub state: WorkerState,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms_ago: Option<u64>,
    /// Wall-clock time of its last heartbeat, Unix milliseconds.
    pub last_heartbeat_unix_ms: Option<u64>,
    /// Why it was lost, if it is.
    pub lost_reason: Option<String>,
}

impl Membership {
    /// A membership for `expected` workers, continuing from what was persisted.
    pub fn new(expected: usize, timing: Timing, persisted: Persisted) -> Self {
        let mut slots = vec![Slot::empty(); expected];
        for (slot, id) in slots.iter_mut().zip(persisted.workers) {
            if let Some(id) = id {
                slot.worker_id = Some(id);
                slot.state = WorkerState::Lost;
                slot.lost_reason = Some("not yet reconnected to this coordinator".into());
            }
        }
        Membership {
            timing,
            generation: persisted.generation,
            slots,
            phase: Phase::Waiting,
            last_failure: None,
            not_before: None,
            next_ping: None,
            dirty: false,
        }
    }

    /// What to persist; `None` when nothing changed since the last call.
    pub fn take_dirty(&mut self) -> Option<Persisted> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(Persisted {
            generation: self.generation,
            workers: self.slots.iter().map(|s| s.worker_id.clone()).collect(),
        })
    }

    /// The heartbeat settings to tell workers.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The current generation and the connection of process 0, when the cluster runs; otherwise
    /// the reason it does not, for a 503.
    pub fn ready(&self) -> Result<(u64, ConnId), String> {
        match (&self.phase, self.slots.first().and_then(|s| s.conn)) {
            (Phase::Running { .. }, Some(conn)) => Ok((self.generation, conn)),
            _ => Err(self.reason().unwrap_or_else(|| "the cluster is not running".into())),
        }
    }

    /// When the cluster runs: its generation, the connection of every process by index, and the
    /// threads per process.
    pub fn running(&self) -> Option<(u64, Vec<ConnId>, usize)> {
        if !matches!(self.phase, Phase::Running { .. }) {
            return None;
        }
        let conns: Option<Vec<ConnId>> = self.slots.iter().map(|s| s.conn).collect();
        Some((self.generation, conns?, self.slots.first().map_or(1, |s| s.threads)))
    }

    /// Handles a worker's registration on connection `conn`. Returns the index it holds, or the
    /// reason it is refused.
    pub fn register(&mut self, conn: ConnId, reg: &Register, now: Instant) -> (Result<usize, Refusal>, Vec<Action>) {
        let index = match self.pick_slot(reg) {
            Ok(i) => i,
            Err(refusal) => return (Err(refusal), Vec::new()),
        };
        if let Some(other) =
            self.slots.iter().enumerate().find(|(i, s)| *i != index && s.conn.is_some() && s.threads != reg.threads)
        {
            return (
                Err(Refusal::fatal(format!(
                    "this worker has {} threads but worker {} has {}; every worker of a cluster needs the same --threads",
                    reg.threads, other.0, other.1.threads
                ))),
                Vec::new(),
            );
        }
        let slot = &mut self.slots[index];
        if slot.worker_id.as_deref() != Some(reg.worker_id.as_str()) {
            if let Some(old) = &slot.worker_id {
                tracing::warn!(index, old = %old, new = %reg.worker_id, "a new worker replaces the lost worker at this index");
            }
            slot.worker_id = Some(reg.worker_id.clone());
            self.dirty = true;
        }
        slot.conn = Some(conn);
        slot.host = reg.host.clone();
        slot.data_addr = reg.data_addr.clone();
        slot.ingest_addr = reg.ingest_addr.clone();
        slot.lines_addr = reg.lines_addr.clone();
        slot.threads = reg.threads;
        slot.pid = Some(reg.pid);
        slot.computation_pid = None;
        slot.last_heartbeat = Some((now, SystemTime::now()));
        slot.lost_reason = None;
        slot.state = WorkerState::Idle;
        if let Some(running) = &reg.running {
            if running.generation > self.generation {
                // Never reuse a generation number, even if the last one was not persisted.
                self.generation = running.generation;
                self.dirty = true;
            }
            if running.generation == self.generation && running.index == index && running.started {
                slot.state = WorkerState::Running;
            }
        }
        tracing::info!(index, worker_id = %reg.worker_id, host = %reg.host, data_addr = %reg.data_addr, "worker registered");
        let actions = self.maybe_form(now);
        (Ok(index), actions)
    }

    fn pick_slot(&self, reg: &Register) -> Result<usize, Refusal> {
        if let Some((i, slot)) =
            self.slots.iter().enumerate().find(|(_, s)| s.worker_id.as_deref() == Some(reg.worker_id.as_str()))
        {
            if slot.conn.is_some() {
                // Also what a worker restarted at once sees while its old connection's close is
                // on its way: the worker tries again.
                return Err(Refusal {
                    reason: format!(
                        "worker id {} is already connected as process {i} (pid {} on {}); do two workers share a data dir?",
                        reg.worker_id,
                        slot.pid.unwrap_or_default(),
                        slot.host
                    ),
                    retry: true,
                });
            }
            return Ok(i);
        }
        if let Some(i) = self.slots.iter().position(|s| s.worker_id.is_none()) {
            return Ok(i);
        }
        if let Some(i) = self.slots.iter().position(|s| s.conn.is_none()) {
            return Ok(i);
        }
        Err(Refusal::fatal(format!("the cluster already has all of its {} workers connected", self.slots.len())))
    }

    /// Handles a message on a registered connection (not `Reply`, which the server routes).
    pub fn on_message(&mut self, conn: ConnId, msg: &WorkerMsg, now: Instant) -> Vec<Action> {
        let Some(index) = self.index_of(conn) else {
            return Vec::new();
        };
        match msg {
            // Stats are kept by the server, not the membership.
            WorkerMsg::Stats(_) | WorkerMsg::Checkpointed { .. } => Vec::new(),
            WorkerMsg::Heartbeat { generation, state, computation_pid, .. } => {
                let slot = &mut self.slots[index];
                slot.last_heartbeat = Some((now, SystemTime::now()));
                slot.computation_pid = *computation_pid;
                if *generation == self.generation
                    && *state == ComputationState::Idle
                    && slot.state == WorkerState::Running
                {
                    return self.end_generation(format!("worker {index} reports no computation"), now);
                }
                Vec::new()
            }
            WorkerMsg::Started { generation, computation_pid } => {
                if *generation != self.generation || !matches!(self.phase, Phase::Forming { .. }) {
                    return Vec::new();
                }
                let slot = &mut self.slots[index];
                slot.state = WorkerState::Running;
                slot.computation_pid = Some(*computation_pid);
                if self.slots.iter().all(|s| s.state == WorkerState::Running) {
                    if let Phase::Forming { since } = self.phase {
                        tracing::info!(
                            generation = self.generation,
                            formation_ms = now.duration_since(since).as_millis() as u64,
                            "cluster formed"
                        );
                    }
                    self.phase = Phase::Running { since: now };
                    self.last_failure = None;
                }
                Vec::new()
            }
            WorkerMsg::Failed { generation, reason } => {
                if *generation != self.generation {
                    return Vec::new();
                }
                self.slots[index].state = WorkerState::Idle;
                self.slots[index].computation_pid = None;
                if matches!(self.phase, Phase::Forming { .. } | Phase::Running { .. }) {
                    return self.end_generation(format!("the computation of worker {index} failed: {reason}"), now);
                }
                Vec::new()
            }
            WorkerMsg::Register(_) | WorkerMsg::Reply { .. } | WorkerMsg::Frontiers { .. } => Vec::new(),
        }
    }

    /// Handles the end of a connection.
    pub fn disconnected(&mut self, conn: ConnId, reason: &str, now: Instant) -> Vec<Action> {
        let Some(index) = self.index_of(conn) else {
            return Vec::new();
        };
        let slot = &mut self.slots[index];
        slot.conn = None;
        slot.state = WorkerState::Lost;
        slot.computation_pid = None;
        slot.lost_reason = Some(reason.to_string());
        tracing::warn!(index, worker_id = ?slot.worker_id, "worker lost: {reason}");
        if matches!(self.phase, Phase::Forming { .. } | Phase::Running { .. }) {
            return self.end_generation(format!("worker {index} lost: {reason}"), now);
        }
        Vec::new()
    }

    /// Advances time: heartbeat timeouts, pings, formation timeout and retries.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let timeout = self.timing.heartbeat_timeout;
        let silent: Vec<(ConnId, Duration)> = self
            .slots
            .iter()
            .filter_map(|s| {
                let conn = s.conn?;
                let (at, _) = s.last_heartbeat?;
                let age = now.saturating_duration_since(at);
                (age > timeout).then_some((conn, age))
            })
            .collect();
        for (conn, age) in silent {
            actions.push(Action::Close(conn));
            actions.extend(self.disconnected(conn, &format!("no heartbeat for {:.1}s", age.as_secs_f64()), now));
        }
        if let Phase::Forming { since } = self.phase {
            if now.saturating_duration_since(since) > self.timing.formation_timeout {
                actions.extend(self.end_generation(
                    format!("generation {} did not form within {:?}", self.generation, self.timing.formation_timeout),
                    now,
                ));
            }
        }
        if self.next_ping.is_none_or(|t| now >= t) {
            self.next_ping = Some(now + self.timing.heartbeat_interval);
            actions.extend(self.slots.iter().filter_map(|s| s.conn).map(|c| Action::Send(c, CoordMsg::Ping)));
        }
        actions.extend(self.maybe_form(now));
        actions
    }

    fn index_of(&self, conn: ConnId) -> Option<usize> {
        self.slots.iter().position(|s| s.conn == Some(conn))
    }

    fn end_generation(&mut self, reason: String, now: Instant) -> Vec<Action> {
        tracing::warn!(generation = self.generation, "generation ended: {reason}");
        self.phase = Phase::Degraded;
        self.last_failure = Some(format!("generation {} ended: {reason}", self.generation));
        self.not_before = Some(now + self.timing.retry_pause);
        let mut actions = Vec::new();
        for slot in &mut self.slots {
            if let Some(conn) = slot.conn {
                slot.state = WorkerState::Idle;
                slot.computation_pid = None;
                actions
                    .push(Action::Send(conn, CoordMsg::Stop { generation: self.generation, reason: reason.clone() }));
            }
        }
        actions
    }

    fn maybe_form(&mut self, now: Instant) -> Vec<Action> {
        if matches!(self.phase, Phase::Forming { .. } | Phase::Running { .. }) {
            return Vec::new();
        }
        if self.slots.iter().any(|s| s.conn.is_none()) {
            return Vec::new();
        }
        if self.generation > 0 && self.slots.iter().all(|s| s.state == WorkerState::Running) {
            tracing::info!(generation = self.generation, "adopted the running generation from the workers");
            self.phase = Phase::Running { since: now };
            self.last_failure = None;
            return Vec::new();
        }
        if self.not_before.is_some_and(|t| now < t) {
            return Vec::new();
        }
        self.generation += 1;
        self.dirty = true;
        self.phase = Phase::Forming { since: now };
        let addresses: Vec<String> = self.slots.iter().map(|s| s.data_addr.clone()).collect();
        let threads = self.slots.first().map_or(1, |s| s.threads);
        let token = rand::random::<u64>();
        tracing::info!(generation = self.generation, ?addresses, threads, "forming generation");
        let mut actions = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            slot.state = WorkerState::Starting;
            if let Some(conn) = slot.conn {
                let formation = Formation {
                    generation: self.generation,
                    index,
                    addresses: addresses.clone(),
                    threads,
                    token,
                    restore: None,
                    checkpoint_interval_ms: 0,
                };
                actions.push(Action::Send(conn, CoordMsg::Form(formation)));
            }
        }
        actions
    }

    fn reason(&self) -> Option<String> {
        let missing: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_none())
            .map(|(i, s)| match &s.lost_reason {
                Some(r) => format!("worker {i} ({r})"),
                None => format!("worker {i}"),
            })
            .collect();
        let waiting = if missing.is_empty() {
            None
        } else {
            Some(format!("waiting for {} of {} workers: {}", missing.len(), self.slots.len(), missing.join(", ")))
        };
        match (&self.phase, waiting) {
            (Phase::Running { .. }, _) => None,
            (Phase::Forming { .. }, _) => Some(format!("generation {} is forming", self.generation)),
            (_, waiting) => {
                let parts: Vec<String> = self.last_failure.iter().cloned().chain(waiting).collect();
                if parts.is_empty() {
                    Some("the next generation is about to form".into())
                } else {
                    Some(parts.join("; "))
                }
            }
        }
    }

    /// The cluster as `GET /v1/cluster` shows it.
    pub fn status(&self, now: Instant) -> ClusterStatus {
        let state = match self.phase {
            Phase::Waiting => "waiting",
            Phase::Forming { .. } => "forming",
            Phase::Running { .. } => "running",
            Phase::Degraded => "degraded",
        };
        ClusterStatus {
            generation: self.generation,
            state,
            reason: self.reason(),
            expected_workers: self.slots.len(),
            registered_workers: self.slots.iter().filter(|s| s.conn.is_some()).count(),
            threads_per_worker: self.slots.iter().find(|s| s.conn.is_some()).map_or(0, |s| s.threads),
            workers: self
                .slots
                .iter()
                .enumerate()
                .map(|(index, s)| WorkerStatus {
                    index,
                    id: s.worker_id.clone(),
                    host: s.host.clone(),
                    data_addr: s.data_addr.clone(),
                    ingest_addr: s.ingest_addr.clone(),
                    lines_addr: s.lines_addr.clone(),
                    threads: s.threads,
                    pid: s.pid,
                    computation_pid: s.computation_pid,
                    state: s.state,
                    last_heartbeat_ms_ago: s
                        .last_heartbeat
                        .map(|(at, _)| now.saturating_duration_since(at).as_millis() as u64),
                    last_heartbeat_unix_ms: s
                        .last_heartbeat
                        .and_then(|(_, wall)| wall.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_millis() as u64),
                    lost_reason: s.lost_reason.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_protocol::{Running, MAGIC, PROTOCOL_VERSION};

    fn reg(id: &str, threads: usize) -> Register {
        Register {
            magic: MAGIC.into(),
            protocol_version: PROTOCOL_VERSION,
            worker_id: id.into(),
            host: "h".into(),
            data_addr: format!("127.0.0.1:{}", 7000 + id.len()),
            threads,
            pid: 1,
            running: None,
            ingest_addr: None,
            lines_addr: None,
            checkpoints: Vec::new(),
        }
    }

    fn forms(actions: &[Action]) -> Vec<(ConnId, Formation)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(c, CoordMsg::Form(f)) => Some((*c, f.clone())),
                _ => None,
            })
            .collect()
    }

    fn join(m: &mut Membership, conn: ConnId, reg: &Register, now: Instant) -> Vec<Action> {
        let (result, actions) = m.register(conn, reg, now);
        assert!(result.is_ok(), "{result:?}");
        actions
    }

    fn started(m: &mut Membership, conn: ConnId, generation: u64, now: Instant) {
        m.on_message(conn, &WorkerMsg::Started { generation, computation_pid: 9 }, now);
    }

    #[test]
    fn forms_when_all_registered_and_runs_when_all_started() {
        let now = Instant::now();
        let mut m = Membership::new(2, Timing::default(), Persisted::default());
        let (r, a) = m.register(1, &reg("a", 2), now);
        assert_eq!(r, Ok(0));
        assert!(forms(&a).is_empty());
        assert_eq!(m.status(now).state, "waiting");
        let (r, a) = m.register(2, &reg("bb", 2), now);
        assert_eq!(r, Ok(1));
        let f = forms(&a);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].1.generation, 1);
        assert_eq!(f[1].1.index, 1);
        assert_eq!(f[0].1.addresses, vec!["127.0.0.1:7001".to_string(), "127.0.0.1:7002".to_string()]);
        assert_eq!(m.status(now).state, "forming");
        assert!(m.ready().is_err());
        started(&mut m, 1, 1, now);
        started(&mut m, 2, 1, now);
        assert_eq!(m.status(now).state, "running");
        assert_eq!(m.ready(), Ok((1, 1)));
    }

    #[test]
    fn loss_degrades_and_return_forms_next_generation_with_same_index() {
        let now = Instant::now();
        let mut m = Membership::new(2, Timing::default(), Persisted::default());
        join(&mut m, 1, &reg("a", 1), now);
        join(&mut m, 2, &reg("bb", 1), now);
        started(&mut m, 1, 1, now);
        started(&mut m, 2, 1, now);
        let a = m.disconnected(2, "connection closed", now);
        assert_eq!(
            a,
            vec![Action::Send(1, CoordMsg::Stop { generation: 1, reason: "worker 1 lost: connection closed".into() })]
        );
        let status = m.status(now);
        assert_eq!(status.state, "degraded");
        assert!(status.reason.as_deref().unwrap_or_default().contains("worker 1 lost"), "{:?}", status.reason);
        assert_eq!(status.workers[1].state, WorkerState::Lost);
        let (r, a) = m.register(3, &reg("bb", 1), now);
        assert_eq!(r, Ok(1));
        assert!(forms(&a).is_empty(), "waits for the retry pause");
        let a = m.tick(now + Duration::from_secs(1));
        let f = forms(&a);
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|(_, f)| f.generation == 2));
        assert_eq!(f.iter().find(|(c, _)| *c == 3).map(|(_, f)| f.index), Some(1));
    }

    #[test]
    fn refusals_name_the_cause() {
        let now = Instant::now();
        let mut m = Membership::new(2, Timing::default(), Persisted::default());
        join(&mut m, 1, &reg("a", 2), now);
        let (r, _) = m.register(2, &reg("a", 2), now);
        let refusal = r.unwrap_err();
        assert!(refusal.reason.contains("already connected as process 0"));
        assert!(refusal.retry, "a restarted worker may be refused until its old connection closes");
        let (r, _) = m.register(3, &reg("bb", 3), now);
        let refusal = r.unwrap_err();
        assert!(refusal.reason.contains("same --threads"));
        assert!(!refusal.retry);
        join(&mut m, 4, &reg("bb", 2), now);
        let (r, _) = m.register(5, &reg("ccc", 2), now);
        let refusal = r.unwrap_err();
        assert!(refusal.reason.contains("already has all of its 2 workers"));
        assert!(!refusal.retry);
    }

    #[test]
    fn replacement_takes_a_lost_index() {
        let now = Instant::now();
        let mut m = Membership::new(1, Timing::default(), Persisted::default());
        join(&mut m, 1, &reg("a", 1), now);
        m.disconnected(1, "gone", now);
        let (r, _) = m.register(2, &reg("zz", 1), now);
        assert_eq!(r, Ok(0));
        assert_eq!(m.take_dirty().map(|p| p.workers), Some(vec![Some("zz".to_string())]));
    }

    #[test]
    fn silent_worker_is_lost_after_timeout() {
        let now = Instant::now();
        let timing = Timing { heartbeat_timeout: Duration::from_secs(2), ..Timing::default() };
        let mut m = Membership::new(1, timing, Persisted::default());
        join(&mut m, 7, &reg("a", 1), now);
        started(&mut m, 7, 1, now);
        assert!(!m.tick(now + Duration::from_secs(1)).contains(&Action::Close(7)));
        let a = m.tick(now + Duration::from_secs(3));
        assert!(a.contains(&Action::Close(7)));
        let status = m.status(now + Duration::from_secs(3));
        assert_eq!(status.state, "degraded");
        assert!(status.workers[0].lost_reason.as_deref().unwrap_or_default().starts_with("no heartbeat for"));
    }

    #[test]
    fn restarted_coordinator_adopts_running_generation() {
        let now = Instant::now();
        let persisted = Persisted { generation: 4, workers: vec![Some("a".into()), Some("bb".into())] };
        let mut m = Membership::new(2, Timing::default(), persisted);
        let mut a = reg("a", 1);
        a.running = Some(Running { generation: 4, index: 0, started: true });
        let mut b = reg("bb", 1);
        b.running = Some(Running { generation: 4, index: 1, started: true });
        join(&mut m, 1, &a, now);
        let (_, actions) = m.register(2, &b, now);
        assert!(forms(&actions).is_empty());
        assert_eq!(m.ready(), Ok((4, 1)));
    }

    #[test]
    fn restarted_coordinator_reforms_when_a_worker_is_not_running() {
        let now = Instant::now();
        let persisted = Persisted { generation: 4, workers: vec![Some("a".into()), Some("bb".into())] };
        let mut m = Membership::new(2, Timing::default(), persisted);
        let mut a = reg("a", 1);
        a.running = Some(Running { generation: 4, index: 0, started: true });
        join(&mut m, 1, &a, now);
        let (_, actions) = m.register(2, &reg("bb", 1), now);
        let f = forms(&actions);
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|(_, f)| f.generation == 5));
    }

    #[test]
    fn failure_of_a_computation_ends_the_generation_and_reforms() {
        let now = Instant::now();
        let mut m = Membership::new(2, Timing::default(), Persisted::default());
        join(&mut m, 1, &reg("a", 1), now);
        join(&mut m, 2, &reg("bb", 1), now);
        started(&mut m, 1, 1, now);
        started(&mut m, 2, 1, now);
        let a = m.on_message(1, &WorkerMsg::Failed { generation: 1, reason: "exit 3".into() }, now);
        assert_eq!(a.len(), 2, "stop to both: {a:?}");
        assert_eq!(m.status(now).state, "degraded");
        // A stale failure report of the old generation changes nothing after re-formation.
        let f = forms(&m.tick(now + Duration::from_secs(1)));
        assert!(f.iter().all(|(_, f)| f.generation == 2));
        assert!(m.on_message(2, &WorkerMsg::Failed { generation: 1, reason: "late".into() }, now).is_empty());
        assert_eq!(m.status(now).state, "forming");
    }
}
