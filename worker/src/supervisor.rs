//! The `sundial worker` process: membership with the coordinator, and one computation child per
//! generation.
//!
//! Everything that happens — a frame from the coordinator, its connection dropping, a message or
//! the exit of the computation child — becomes an [`Event`] on one channel, handled by one loop
//! that owns all state. Heartbeats and reconnects are deadlines of that loop, so there is no
//! shared mutable state between threads.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sundial_protocol::child::{write_request, FromChild, ToChild};

use crate::metrics::WorkerMetrics;
use sundial_protocol::{
    read_coord, read_msg, write_msg, ComputationState, CoordMsg, Formation, FrameError, Register, Reply, Request,
    Running, WorkerMsg, MAGIC, PROTOCOL_VERSION,
};

/// mimalloc options the computation child gets unless the environment sets them (see
/// `spawn_child`, README "Tuning", BENCHMARKS.md):
/// * `MIMALLOC_PURGE_DELAY` (ms): freed memory stays with the process a second, not 10 ms, so
///   that the next epoch's buffers do not fault in fresh zeroed pages;
/// * `MIMALLOC_ALLOW_THP`: no transparent huge pages, which the kernel zeroes 2 MiB at a time
///   whenever the arrangement's merges first touch a region of mimalloc's arenas.
const CHILD_ALLOCATOR: [(&str, &str); 2] = [("MIMALLOC_PURGE_DELAY", "1000"), ("MIMALLOC_ALLOW_THP", "0")];

/// How a worker process is configured.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// The coordinator's control address, `host:port`.
    pub coordinator: String,
    /// Timely worker threads in this process.
    pub threads: usize,
    /// Where the worker keeps its identity (and, later, its log and checkpoints).
    pub data_dir: PathBuf,
    /// The local address the computation binds for timely data (port 0: pick a free one).
    pub listen: String,
    /// The address other processes should use to reach `listen`, if it differs.
    pub advertise: Option<String>,
    /// Where to serve the worker's HTTP endpoint (ingest and `/metrics`), if anywhere.
    pub http: Option<String>,
    /// Where to serve the raw TCP line port, if anywhere.
    pub lines: Option<String>,
    /// When ingest log records are synced.
    pub fsync: crate::log::Fsync,
    /// The program to run as computation child (this binary), and the arguments before
    /// `computation`.
    pub child_program: PathBuf,
    /// Arguments placed before the `computation` subcommand (global flags such as the log format).
    pub child_args: Vec<String>,
}

/// Errors that end a worker process.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The data dir cannot be used.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The identity file holds something else.
    #[error("identity file {0} is corrupt (expected a sundial worker id); move it away to start as a new worker")]
    Identity(PathBuf),
    /// The data address cannot be bound.
    #[error("cannot listen on data address {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        source: io::Error,
    },
    /// A flag is inconsistent.
    #[error("{0}")]
    Config(String),
    /// The coordinator refused this worker.
    #[error("refused by the coordinator: {0}")]
    Refused(String),
}

const ID_FILE: &str = "worker-id";

/// Loads the worker's stable identity from `data_dir`, creating it on first start.
pub fn load_identity(data_dir: &Path) -> Result<String, WorkerError> {
    let dir_err = |source| WorkerError::DataDir { path: data_dir.to_path_buf(), source };
    std::fs::create_dir_all(data_dir).map_err(dir_err)?;
    let path = data_dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            let valid = id.len() == 34 && id.starts_with("w-") && id[2..].chars().all(|c| c.is_ascii_hexdigit());
            if valid {
                Ok(id.to_string())
            } else {
                Err(WorkerError::Identity(path))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = format!("w-{:032x}", rand::random::<u128>());
            let tmp = data_dir.join(format!("{ID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id}\n")).map_err(dir_err)?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(dir_err)?;
            std::fs::rename(&tmp, &path).map_err(dir_err)?;
            Ok(id)
        }
        Err(e) => Err(dir_err(e)),
    }
}

/// Resolves the data address: binds `listen` once to check it is free (and to pick a port when it
/// is 0), and works out what to advertise. Returns (bind address, advertised address).
pub fn resolve_data_address(listen: &str, advertise: Option<&str>) -> Result<(String, String), WorkerError> {
    let listen_err = |source| WorkerError::Listen { addr: listen.to_string(), source };
    let probe = TcpListener::bind(listen).map_err(listen_err)?;
    let bound: SocketAddr = probe.local_addr().map_err(listen_err)?;
    drop(probe);
    let bind = bound.to_string();
    let advertised = match advertise {
        Some(adv) if advertises_port(adv) => adv.to_string(),
        Some(host) => format!("{host}:{}", bound.port()),
        None if bound.ip().is_unspecified() => {
            return Err(WorkerError::Config(format!(
            "--listen {listen} binds every interface; give --advertise HOST[:PORT] so that peers know where to connect"
        )))
        }
        None => bind.clone(),
    };
    Ok((bind, advertised))
}

/// Whether an `--advertise` value names a port (`HOST:PORT`, `[V6]:PORT`), not only a host.
fn advertises_port(advertise: &str) -> bool {
    advertise.contains(':') && !advertise.starts_with('[') || advertise.starts_with('[') && advertise.contains("]:")
}

/// Binds `addr` (if given) for an ingest front end and starts `serve` on it. Returns the
/// address to advertise: the bound one, or the host of `--advertise` with the bound port when
/// the bind address is unspecified (0.0.0.0).
fn serve_ingest(
    addr: Option<&str>,
    advertise: Option<&str>,
    what: &str,
    serve: impl FnOnce(TcpListener) -> io::Result<()>,
) -> Result<Option<String>, WorkerError> {
    let Some(addr) = addr else { return Ok(None) };
    let listen_err = |source| WorkerError::Listen { addr: addr.to_string(), source };
    let listener = TcpListener::bind(addr).map_err(listen_err)?;
    let bound = listener.local_addr().map_err(listen_err)?;
    let advertised = if bound.ip().is_unspecified() {
        let host = advertise.map(|a| a.rsplit_once(':').map_or(a, |(h, _)| h)).ok_or_else(|| {
            WorkerError::Config(format!("{what} {addr} binds every interface; give --advertise HOST"))
        })?;
        format!("{host}:{}", bound.port())
    } else {
        bound.to_string()
    };
    serve(listener).map_err(listen_err)?;
    tracing::info!(address = %advertised, "{what} listening");
    Ok(Some(advertised))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// What the supervisor's event loop handles.
pub enum Event {
    /// A frame from the coordinator.
    Coord {
        /// The connection it came on.
        conn: u64,
        /// The message.
        msg: CoordMsg,
    },
    /// The coordinator connection ended.
    CoordLost {
        /// Which.
        conn: u64,
        /// Why.
        reason: String,
    },
    /// A frame from the computation child.
    Child {
        /// Its generation.
        generation: u64,
        /// The message.
        msg: FromChild,
    },
    /// The computation child's output ended.
    ChildEof {
        /// Its generation.
        generation: u64,
    },
    /// A batch from this worker's ingest endpoint.
    LocalIngest {
        /// The source.
        source: String,
        /// CSV with a header.
        csv: bool,
        /// The text.
        body: String,
        /// The producer's batch id.
        batch: Option<String>,
        /// Where the outcome goes.
        reply: tokio::sync::oneshot::Sender<crate::ingest::IngestResult>,
    },
}

/// Request ids of local ingest batches start here, above the coordinator's.
const LOCAL_IDS: u64 = 1 << 62;

struct Conn {
    id: u64,
    stream: TcpStream,
    index: usize,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    last_heard: Instant,
    next_heartbeat: Instant,
}

struct ChildRun {
    generation: u64,
    index: usize,
    process: Child,
    stdin: ChildStdin,
    started: bool,
    failure_reported: bool,
}

enum ConnectError {
    Retry(String),
    /// Refused because this worker's id is still connected (see [`CoordMsg::Refused`]).
    StillConnected {
        reason: String,
        retry_after: Duration,
    },
    Fatal(String),
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// How long a worker tries again while the coordinator says its id is still connected. A dead
/// process's connection closes at once on its host, and one lost with its host goes within the
/// default heartbeat timeout (5 s): past this, another live worker has this identity (a copied
/// data dir).
const REFUSED_RETRY_FOR: Duration = Duration::from_secs(6);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

struct Supervisor {
    cfg: SupervisorConfig,
    id: String,
    bind: String,
    data_addr: String,
    host: String,
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    conn: Option<Conn>,
    conn_seq: u64,
    backoff: Duration,
    /// Since when the coordinator has refused this worker's id as still connected.
    refused_since: Option<Instant>,
    next_connect: Instant,
    child: Option<ChildRun>,
    last_generation: u64,
    terminate: Arc<AtomicBool>,
    ingest_addr: Option<String>,
    lines_addr: Option<String>,
    local: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<crate::ingest::IngestResult>>,
    next_local: u64,
    metrics: Arc<WorkerMetrics>,
    /// Requests the computation is serving, for counting their outcomes.
    inflight: std::collections::HashMap<u64, Inflight>,
    /// When to send the next stats to the coordinator.
    next_stats: Instant,
    /// The newest checkpoint the coordinator said every process has.
    last_committed: Option<u64>,
}

/// A request the computation is serving, as the metrics need it.
enum Inflight {
    /// An ingest batch of this source.
    Ingest(String),
    /// A read (`keys` or `export`), since this instant.
    Read(&'static str, Instant),
}

/// How often the worker sends its stats to the coordinator.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the worker process. Returns only on a fatal error (a refusal by the coordinator, an
/// unusable data dir or address); a missing coordinator is waited for.
pub fn run(cfg: SupervisorConfig) -> Result<(), WorkerError> {
    if cfg.threads == 0 {
        return Err(WorkerError::Config("--threads must be at least 1".into()));
    }
    let id = load_identity(&cfg.data_dir)?;
    let (bind, data_addr) = resolve_data_address(&cfg.listen, cfg.advertise.as_deref())?;
    tracing::info!(worker_id = %id, data_addr = %data_addr, coordinator = %cfg.coordinator, threads = cfg.threads, "worker starting");
    let terminate = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&terminate))
            .map_err(|e| WorkerError::Config(format!("cannot install the signal handler: {e}")))?;
    }
    let (events_tx, events) = mpsc::channel();
    let advertise = cfg.advertise.as_deref();
    let metrics = Arc::new(
        WorkerMetrics::new(Some(cfg.data_dir.clone()))
            .map_err(|e| WorkerError::Config(format!("cannot set up the metrics: {e}")))?,
    );
    let ingest_addr = serve_ingest(cfg.http.as_deref(), advertise, "HTTP endpoint", |listener| {
        crate::ingest::spawn(listener, events_tx.clone(), Arc::clone(&metrics))
    })?;
    let lines_addr = serve_ingest(cfg.lines.as_deref(), advertise, "line port", |listener| {
        crate::lines::spawn(listener, events_tx.clone())
    })?;
    let mut sup = Supervisor {
        cfg,
        id,
        bind,
        data_addr,
        host: host_name(),
        events_tx,
        events,
        conn: None,
        conn_seq: 0,
        backoff: BACKOFF_START,
        refused_since: None,
        next_connect: Instant::now(),
        child: None,
        last_generation: 0,
        terminate,
        ingest_addr,
        lines_addr,
        local: std::collections::HashMap::new(),
        next_local: LOCAL_IDS,
        metrics,
        inflight: std::collections::HashMap::new(),
        next_stats: Instant::now(),
        last_committed: None,
    };
    sup.run()
}

impl Supervisor {
    fn run(&mut self) -> Result<(), WorkerError> {
        loop {
            if self.terminate.load(Ordering::Relaxed) {
                self.stop_child("the worker is shutting down");
                tracing::info!("worker stopped");
                return Ok(());
            }
            let now = Instant::now();
            if self.conn.is_none() && now >= self.next_connect {
                match self.connect() {
                    Ok(conn) => {
                        tracing::info!(index = conn.index, coordinator = %self.cfg.coordinator, "registered with the coordinator");
                        self.conn = Some(conn);
                        self.backoff = BACKOFF_START;
                        self.refused_since = None;
                    }
                    Err(ConnectError::Fatal(reason)) => {
                        self.stop_child("the coordinator refused this worker");
                        return Err(WorkerError::Refused(reason));
                    }
                    Err(ConnectError::StillConnected { reason, retry_after }) => {
                        // As when this worker was restarted before the coordinator saw its old
                        // connection close. Past a while (the coordinator would have noticed a
                        // dead connection by its heartbeats), another live worker has this id.
                        let since = *self.refused_since.get_or_insert(now);
                        if now.duration_since(since) > REFUSED_RETRY_FOR {
                            self.stop_child("the coordinator refused this worker");
                            return Err(WorkerError::Refused(reason));
                        }
                        tracing::warn!(retry_in_ms = retry_after.as_millis() as u64, "refused for now: {reason}");
                        self.next_connect = Instant::now() + retry_after;
                    }
                    Err(ConnectError::Retry(reason)) => {
                        self.refused_since = None;
                        tracing::warn!(coordinator = %self.cfg.coordinator, retry_in_ms = self.backoff.as_millis() as u64, "coordinator not reachable: {reason}");
                        self.next_connect = Instant::now() + self.backoff;
                        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            let deadline = match &self.conn {
                Some(c) => c.next_heartbeat.min(c.last_heard + c.heartbeat_timeout),
                None => self.next_connect,
            };
            // Wake at least every 100 ms to notice a termination signal.
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(100));
            match self.events.recv_timeout(wait) {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            self.on_deadlines();
        }
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        let Some(conn) = &mut self.conn else { return };
        if now.duration_since(conn.last_heard) > conn.heartbeat_timeout {
            let silent = now.duration_since(conn.last_heard);
            self.drop_conn(&format!("coordinator silent for {:.1}s", silent.as_secs_f64()));
            return;
        }
        if now >= conn.next_heartbeat {
            conn.next_heartbeat = now + conn.heartbeat_interval;
            let (generation, state, computation_pid) = match &self.child {
                Some(c) => (
                    c.generation,
                    if c.started { ComputationState::Running } else { ComputationState::Starting },
                    Some(c.process.id()),
                ),
                None => (self.last_generation, ComputationState::Idle, None),
            };
            let checkpoints = crate::checkpoint::complete(&self.cfg.data_dir);
            self.send(&WorkerMsg::Heartbeat { generation, state, computation_pid, checkpoints });
        }
        if now >= self.next_stats {
            self.next_stats = now + STATS_INTERVAL;
            let stats = self.metrics.snapshot();
            self.send(&WorkerMsg::Stats(stats));
        }
    }

    fn connect(&mut self) -> Result<Conn, ConnectError> {
        let addrs: Vec<SocketAddr> = self
            .cfg
            .coordinator
            .to_socket_addrs()
            .map_err(|e| ConnectError::Retry(format!("cannot resolve {}: {e}", self.cfg.coordinator)))?
            .collect();
        let mut last = format!("{} resolves to no address", self.cfg.coordinator);
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        let mut stream = stream.ok_or(ConnectError::Retry(last))?;
        let retry = |e: io::Error| ConnectError::Retry(e.to_string());
        stream.set_nodelay(true).map_err(retry)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(retry)?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(retry)?;
        let running =
            self.child.as_ref().map(|c| Running { generation: c.generation, index: c.index, started: c.started });
        let register = WorkerMsg::Register(Register {
            magic: MAGIC.into(),
            protocol_version: PROTOCOL_VERSION,
            worker_id: self.id.clone(),
            host: self.host.clone(),
            data_addr: self.data_addr.clone(),
            threads: self.cfg.threads,
            pid: std::process::id(),
            running,
            ingest_addr: self.ingest_addr.clone(),
            lines_addr: self.lines_addr.clone(),
            checkpoints: crate::checkpoint::complete(&self.cfg.data_dir),
        });
        write_msg(&mut stream, &register).map_err(|e| ConnectError::Retry(format!("sending registration: {e}")))?;
        let (index, interval_ms, timeout_ms) = match read_msg::<_, CoordMsg>(&mut stream) {
            Ok(CoordMsg::Welcome { index, heartbeat_interval_ms, heartbeat_timeout_ms }) => {
                (index, heartbeat_interval_ms, heartbeat_timeout_ms)
            }
            Ok(CoordMsg::Refused { reason, retry_after_ms: Some(ms) }) => {
                let retry_after = Duration::from_millis(ms).clamp(BACKOFF_START, BACKOFF_MAX);
                return Err(ConnectError::StillConnected { reason, retry_after });
            }
            Ok(CoordMsg::Refused { reason, retry_after_ms: None }) => return Err(ConnectError::Fatal(reason)),
            Ok(other) => return Err(ConnectError::Retry(format!("unexpected handshake reply {other:?}"))),
            Err(FrameError::Closed) => {
                return Err(ConnectError::Retry("the coordinator closed the connection during the handshake".into()))
            }
            Err(e) => return Err(ConnectError::Retry(format!("handshake: {e}"))),
        };
        stream.set_read_timeout(None).map_err(retry)?;
        self.conn_seq += 1;
        let conn_id = self.conn_seq;
        let mut reader = stream.try_clone().map_err(retry)?;
        let tx = self.events_tx.clone();
        thread::Builder::new()
            .name("sundial:coord-read".into())
            .spawn(move || loop {
                match read_coord(&mut reader) {
                    Ok(msg) => {
                        if tx.send(Event::Coord { conn: conn_id, msg }).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Event::CoordLost { conn: conn_id, reason: e.to_string() });
                        return;
                    }
                }
            })
            .map_err(retry)?;
        let interval = Duration::from_millis(interval_ms.clamp(10, 60_000));
        let now = Instant::now();
        let heartbeat_timeout = Duration::from_millis(timeout_ms.clamp(interval_ms.max(10), 600_000));
        Ok(Conn {
            id: conn_id,
            stream,
            index,
            heartbeat_interval: interval,
            heartbeat_timeout,
            last_heard: now,
            next_heartbeat: now,
        })
    }

    fn drop_conn(&mut self, reason: &str) {
        if let Some(conn) = self.conn.take() {
            tracing::warn!(coordinator = %self.cfg.coordinator, "lost the coordinator: {reason}; reconnecting (the computation keeps running)");
            self.metrics.coordinator_heard(false);
            let _ = conn.stream.shutdown(Shutdown::Both);
            self.next_connect = Instant::now() + BACKOFF_START;
        }
    }

    fn send(&mut self, msg: &WorkerMsg) {
        let Some(conn) = &mut self.conn else { return };
        if let Err(e) = write_msg(&mut conn.stream, msg) {
            self.drop_conn(&format!("sending: {e}"));
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Coord { conn, msg } => {
                let Some(c) = &mut self.conn else { return };
                if c.id != conn {
                    return;
                }
                c.last_heard = Instant::now();
                self.metrics.coordinator_heard(true);
                self.on_coord(msg);
            }
            Event::CoordLost { conn, reason } => {
                if self.conn.as_ref().is_some_and(|c| c.id == conn) {
                    self.drop_conn(&reason);
                }
            }
            Event::Child { generation, msg } => self.on_child(generation, msg),
            Event::ChildEof { generation } => self.on_child_eof(generation),
            Event::LocalIngest { source, csv, body, batch, reply } => {
                self.local_ingest(source, csv, body, batch, reply)
            }
        }
    }

    fn on_coord(&mut self, msg: CoordMsg) {
        match msg {
            CoordMsg::Ping => {}
            CoordMsg::CheckpointCommitted { epoch } => self.checkpoint_committed(epoch),
            CoordMsg::Form(formation) => self.start_child(formation),
            CoordMsg::Stop { generation, reason } => {
                if self.child.as_ref().is_some_and(|c| c.generation <= generation) {
                    self.stop_child(&reason);
                }
            }
            CoordMsg::Request { id, generation, request, .. } => {
                let inflight = match &request {
                    Request::Ingest { source, .. } => Some(Inflight::Ingest(source.clone())),
                    // A read with no keys of this process only tells it of the read's epoch (the
                    // owners serve it): not a read served here.
                    Request::Read { keys: Some(k), .. } if k.is_empty() => None,
                    Request::Read { keys: Some(_), .. } => Some(Inflight::Read("keys", Instant::now())),
                    Request::Read { keys: None, .. } => Some(Inflight::Read("export", Instant::now())),
                    _ => None,
                };
                let error = match &mut self.child {
                    Some(c) if c.generation == generation && c.started => {
                        match write_request(&mut c.stdin, id, request) {
                            Ok(()) => {
                                if let Some(what) = inflight {
                                    self.inflight.insert(id, what);
                                }
                                None
                            }
                            Err(e) => Some(format!("the computation does not take requests: {e}")),
                        }
                    }
                    Some(c) => Some(format!("this worker runs generation {}, not {generation}", c.generation)),
                    None => Some("this worker runs no computation".to_string()),
                };
                if let Some(message) = error {
                    self.send(&WorkerMsg::Reply { id, reply: Reply::Error { message } });
                }
            }
            CoordMsg::Welcome { .. } | CoordMsg::Refused { .. } => {
                tracing::warn!("ignored a handshake message outside the handshake");
            }
        }
    }

    fn start_child(&mut self, formation: Formation) {
        let generation = formation.generation;
        self.stop_child(&format!("generation {generation} replaces it"));
        self.last_generation = generation;
        match self.spawn_child(&formation) {
            Ok(run) => {
                tracing::info!(generation, index = formation.index, pid = run.process.id(), "starting computation");
                self.child = Some(run);
            }
            Err(e) => {
                let reason = format!("cannot start the computation: {e}");
                tracing::error!(generation, "{reason}");
                self.send(&WorkerMsg::Failed { generation, reason });
            }
        }
    }

    fn spawn_child(&self, formation: &Formation) -> io::Result<ChildRun> {
        let mut command = Command::new(&self.cfg.child_program);
        // Page zeroing was the largest single cost of an end-to-end ingest; an operator's
        // setting wins.
        for (name, value) in CHILD_ALLOCATOR {
            if std::env::var_os(name).is_none() {
                command.env(name, value);
            }
        }
        let mut process = command
            .args(&self.cfg.child_args)
            .arg("computation")
            .arg("--listen")
            .arg(&self.bind)
            .arg("--data-dir")
            .arg(&self.cfg.data_dir)
            .arg("--fsync")
            .arg(self.cfg.fsync.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let (Some(mut stdin), Some(mut stdout)) = (process.stdin.take(), process.stdout.take()) else {
            let _ = process.kill();
            let _ = process.wait();
            return Err(io::Error::other("the computation child has no pipes"));
        };
        if let Err(e) = write_msg(&mut stdin, &ToChild::Form(formation.clone())) {
            let _ = process.kill();
            let _ = process.wait();
            return Err(io::Error::other(e.to_string()));
        }
        let generation = formation.generation;
        let tx = self.events_tx.clone();
        thread::Builder::new().name("sundial:child-read".into()).spawn(move || loop {
            match read_msg::<_, FromChild>(&mut stdout) {
                Ok(msg) => {
                    if tx.send(Event::Child { generation, msg }).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if !matches!(e, FrameError::Closed) {
                        tracing::warn!(generation, error = %e, "bad output from the computation child");
                    }
                    let _ = tx.send(Event::ChildEof { generation });
                    return;
                }
            }
        })?;
        Ok(ChildRun { generation, index: formation.index, process, stdin, started: false, failure_reported: false })
    }

    fn local_ingest(
        &mut self,
        source: String,
        csv: bool,
        body: String,
        batch: Option<String>,
        reply: tokio::sync::oneshot::Sender<crate::ingest::IngestResult>,
    ) {
        let Some(run) = self.child.as_mut().filter(|c| c.started) else {
            let _ = reply.send(Err((503, "no computation runs on this worker (the cluster is forming)".into())));
            return;
        };
        let id = self.next_local;
        self.next_local += 1;
        let inflight = Inflight::Ingest(source.clone());
        let request = Request::Ingest { after: 0, source, csv, body, first_line: 1, min_epoch: 0, batch };
        match write_request(&mut run.stdin, id, request) {
            Ok(()) => {
                self.local.insert(id, reply);
                self.inflight.insert(id, inflight);
            }
            Err(e) => {
                let _ = reply.send(Err((503, format!("the computation does not take requests: {e}"))));
            }
        }
    }

    /// Answers every local request still waiting: its computation is gone.
    fn fail_local(&mut self, reason: &str) {
        // The computation that was serving these is gone.
        self.inflight.clear();
        self.metrics.computation(self.last_generation, false);
        for (_, waiter) in self.local.drain() {
            let _ = waiter.send(Err((503, reason.to_string())));
        }
    }

    fn stop_child(&mut self, reason: &str) {
        self.fail_local(reason);
        if let Some(mut run) = self.child.take() {
            tracing::info!(generation = run.generation, "stopping computation: {reason}");
            let _ = run.process.kill();
            let _ = run.process.wait();
        }
    }

    /// Whether the data port was picked by the system (`--listen` with port 0, and no port in
    /// `--advertise`), so that another may be picked.
    fn data_port_is_ours(&self) -> bool {
        let system_port = self.cfg.listen.parse::<SocketAddr>().is_ok_and(|a| a.port() == 0);
        system_port && !self.cfg.advertise.as_deref().is_some_and(advertises_port)
    }

    /// After the computation could not bind the data address: the port was free when this
    /// worker picked it, but is not now (an outgoing connection of some process can take a free
    /// port between two generations). A port the system chose is chosen again, and the
    /// coordinator hears the new address by a new registration.
    fn repick_data_port(&mut self) {
        if !self.data_port_is_ours() {
            return;
        }
        match resolve_data_address(&self.cfg.listen, self.cfg.advertise.as_deref()) {
            Ok((bind, data_addr)) => {
                tracing::warn!(old = %self.data_addr, new = %data_addr, "the data port is taken; the data address changes");
                self.bind = bind;
                self.data_addr = data_addr;
                self.drop_conn("the data address changed");
            }
            Err(e) => tracing::warn!("the data port is taken, and no other can be had: {e}"),
        }
    }

    fn on_child(&mut self, generation: u64, msg: FromChild) {
        if self.child.as_ref().is_none_or(|c| c.generation != generation) {
            return;
        }
        if let FromChild::Reply { id, reply } = &msg {
            if let Some(what) = self.inflight.remove(id) {
                self.account(what, reply);
            }
        }
        let bind_failed = matches!(msg, FromChild::BindFailed { .. });
        let Some(run) = self.child.as_mut() else { return };
        match msg {
            FromChild::Started => {
                run.started = true;
                self.metrics.computation(generation, true);
                let computation_pid = run.process.id();
                tracing::info!(generation, "computation connected to all peers");
                self.send(&WorkerMsg::Started { generation, computation_pid });
            }
            FromChild::Frontiers { frontiers } => {
                self.metrics.frontiers(&frontiers);
                self.send(&WorkerMsg::Frontiers { generation, frontiers })
            }
            FromChild::Stats { sources, dataflows } => self.metrics.gauges(&sources, &dataflows),
            FromChild::Checkpointed { epoch } => {
                tracing::debug!(generation, epoch, "checkpoint written");
                self.send(&WorkerMsg::Checkpointed { generation, epoch });
            }
            FromChild::Failed { reason } | FromChild::BindFailed { reason } => {
                run.failure_reported = true;
                // The coordinator learns the checkpoints as they are now (one may have been set
                // aside as damaged) before it forms the next generation.
                let (state, computation_pid) = (ComputationState::Starting, Some(run.process.id()));
                let checkpoints = crate::checkpoint::complete(&self.cfg.data_dir);
                self.send(&WorkerMsg::Heartbeat { generation, state, computation_pid, checkpoints });
                self.send(&WorkerMsg::Failed { generation, reason });
                if bind_failed {
                    self.repick_data_port();
                }
            }
            FromChild::Reply { id, reply } if id >= LOCAL_IDS => {
                if let Some(waiter) = self.local.remove(&id) {
                    let _ = waiter.send(match reply {
                        Reply::Ingested(outcome) => Ok(outcome),
                        Reply::Error { message } if message.starts_with("unknown source") => Err((404, message)),
                        Reply::Error { message } => Err((503, message)),
                        Reply::Refused { status, message } => Err((status, message)),
                        other => Err((502, format!("unexpected reply {other:?}"))),
                    });
                }
            }
            FromChild::Reply { id, reply } => self.send(&WorkerMsg::Reply { id, reply }),
        }
    }

    /// Every process has the checkpoint at `epoch`. Keeps it and the previously committed one
    /// (which every process also has: a fallback, should the newest be lost or damaged), and
    /// deletes older checkpoints and the log segments that the fallback covers. After a restart
    /// the first commit deletes nothing (the previous commit is not known yet).
    fn checkpoint_committed(&mut self, epoch: u64) {
        let previous = self.last_committed.replace(epoch);
        let Some(oldest_kept) = previous.filter(|p| *p < epoch) else { return };
        let kept = [oldest_kept, epoch];
        let data_dir = &self.cfg.data_dir;
        let checkpoints = match crate::checkpoint::delete_before(data_dir, oldest_kept) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(epoch, "deleting old checkpoints: {e}");
                0
            }
        };
        let mut freed = 0;
        if let Ok(entries) = std::fs::read_dir(data_dir.join("log")) {
            for entry in entries.flatten() {
                match crate::log::delete_covered(&entry.path(), oldest_kept) {
                    Ok(n) => freed += n,
                    Err(e) => {
                        tracing::warn!(epoch, dir = %entry.path().display(), "deleting covered log segments: {e}")
                    }
                }
            }
        }
        tracing::info!(
            epoch,
            kept = ?kept,
            old_checkpoints = checkpoints,
            log_bytes_freed = freed,
            "checkpoint committed"
        );
    }

    /// Counts the outcome of a request for the metrics, and logs a batch with rejected lines
    /// (once per batch, with the first reason).
    fn account(&mut self, what: Inflight, reply: &Reply) {
        match (what, reply) {
            (Inflight::Ingest(source), Reply::Ingested(outcome)) => {
                self.metrics.ingested(&source, outcome);
                if let Some(first) = outcome.errors.first() {
                    tracing::warn!(
                        source = %source,
                        rejected = outcome.rejected,
                        accepted = outcome.accepted,
                        "ingest batch had rejected lines; first: line {}: {}",
                        first.line,
                        first.reason
                    );
                }
            }
            (Inflight::Ingest(source), Reply::Error { message }) => {
                tracing::warn!(source = %source, "ingest batch refused: {message}");
            }
            (Inflight::Read(endpoint, started), Reply::Read { .. }) => self.metrics.read(endpoint, started),
            _ => {}
        }
    }

    fn on_child_eof(&mut self, generation: u64) {
        let Some(mut run) = self.child.take_if(|c| c.generation == generation) else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let status = loop {
            match run.process.try_wait() {
                Ok(Some(status)) => break status.to_string(),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) | Err(_) => {
                    let _ = run.process.kill();
                    break match run.process.wait() {
                        Ok(s) => format!("{s} (killed after closing its output)"),
                        Err(e) => format!("unknown status ({e})"),
                    };
                }
            }
        };
        tracing::warn!(generation, "computation ended: {status}");
        self.fail_local(&format!("the computation ended: {status}"));
        if !run.failure_reported {
            self.send(&WorkerMsg::Failed { generation, reason: format!("computation exited: {status}") });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_and_validated() {
        let dir = std::env::temp_dir().join(format!("sundial-id-{}", rand::random::<u64>()));
        let first = load_identity(&dir).unwrap();
        assert_eq!(load_identity(&dir).unwrap(), first);
        std::fs::write(dir.join(ID_FILE), "garbage").unwrap();
        assert!(matches!(load_identity(&dir), Err(WorkerError::Identity(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn data_address_rules() {
        let (bind, adv) = resolve_data_address("127.0.0.1:0", None).unwrap();
        assert_eq!(bind, adv);
        assert!(!bind.ends_with(":0"));
        let (_, adv) = resolve_data_address("0.0.0.0:0", Some("10.1.0.2")).unwrap();
        assert!(adv.starts_with("10.1.0.2:"));
        assert!(resolve_data_address("0.0.0.0:0", None).is_err());
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = busy.local_addr().unwrap().to_string();
        let err = resolve_data_address(&addr, None).unwrap_err().to_string();
        assert!(err.contains("cannot listen"), "{err}");
    }
}
