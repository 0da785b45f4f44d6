//! The control port: one task per worker connection, feeding the [`Membership`] state machine and
//! carrying out its actions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use sundial_protocol::{
    body_len, decode, encode_coord, parse_handshake, Command, CoordMsg, FrameError, Reply, Request, WorkerMsg,
};

use crate::catalog::Catalog;
use crate::membership::{Action, ConnId, Membership, Persisted};
use crate::store;

/// How long a new connection has to send its registration.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write to a worker may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// When a worker refused for a still-connected id tries again.
const REFUSED_RETRY_AFTER: Duration = Duration::from_millis(250);

#[allow(clippy::large_enum_variant)] // moved once per message; boxing would only add allocations
enum Out {
    Msg(CoordMsg),
    Close,
}

struct Inner {
    membership: Membership,
    conns: HashMap<ConnId, mpsc::UnboundedSender<Out>>,
    /// Requests waiting for their reply: the connection and generation they went to, and the
    /// waiter.
    pending: HashMap<u64, (ConnId, u64, oneshot::Sender<Reply>)>,
    next_conn: ConnId,
    next_request: u64,
    /// The generation whose catalog replay has finished.
    replayed: u64,
    /// The generation whose catalog replay is under way.
    replaying: Option<u64>,
    /// Commands sequenced in the replayed generation; data requests wait for them.
    after: u64,
    /// The epoch from which the replayed generation holds everything accepted before it.
    recovered_at: u64,
    /// What each process last reported as complete: (generation, dataflow → epoch).
    frontiers: HashMap<ConnId, (u64, HashMap<String, u64>)>,
    /// The complete checkpoints each process index has (epochs).
    checkpoints: HashMap<usize, std::collections::BTreeSet<u64>>,
    /// The newest checkpoint every process has.
    committed: u64,
    /// How often to take checkpoints (told to workers in formations).
    checkpoint_interval: Duration,
}

/// State shared by the control port, the ticker and the HTTP API.
pub struct Shared {
    inner: Mutex<Inner>,
    membership_file: PathBuf,
    catalog: Mutex<Catalog>,
    catalog_file: PathBuf,
    /// Serializes catalog changes and replays, so that commands reach workers in catalog order.
    commands: tokio::sync::Mutex<()>,
    /// Ingest requests so far, to spread them over the processes in turn.
    ingests: std::sync::atomic::AtomicUsize,
    /// The newest epoch an ingest reply named.
    newest_epoch: std::sync::atomic::AtomicU64,
    /// Metrics and the workers' reports.
    pub ops: crate::ops::Ops,
}

/// Why a request to the computation could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The cluster is not running.
    #[error("{0}")]
    NotReady(String),
    /// No reply came in time.
    #[error("no reply from the computation within {0:?}")]
    Timeout(Duration),
    /// The generation ended before the reply.
    #[error("the generation ended before the computation replied")]
    Abandoned,
    /// The computation answered with an error.
    #[error("{0}")]
    Failed(String),
    /// The computation refused the request with this HTTP status.
    #[error("{1}")]
    Refused(u16, String),
}

/// The running, replayed cluster: what data requests need.
#[derive(Clone, Debug)]
pub struct Ready {
    /// The generation.
    pub generation: u64,
    /// The connection of each process, by index.
    pub conns: Vec<ConnId>,
    /// Worker threads per process.
    pub threads: usize,
    /// Commands the workers must have applied before serving.
    pub after: u64,
    /// Everything accepted before this generation (replayed from the workers' logs) is
    /// readable from this epoch on; earlier epochs of this generation hold less.
    pub recovered_at: u64,
}

/// A request's place in `pending`, given up when its caller stops waiting before the answer
/// came (a timeout, or a dropped caller). Once the answer came, the connection's reader has
/// removed it already.
struct Waiting<'a> {
    shared: &'a Shared,
    id: u64,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.lock().pending.remove(&self.id);
        }
    }
}

impl Shared {
    /// Shared state around a membership and a catalog.
    pub fn new(
        membership: Membership,
        membership_file: PathBuf,
        catalog: Catalog,
        catalog_file: PathBuf,
        ops: crate::ops::Ops,
    ) -> Arc<Self> {
        Arc::new(Shared {
            inner: Mutex::new(Inner {
                membership,
                conns: HashMap::new(),
                pending: HashMap::new(),
                next_conn: 1,
                next_request: 1,
                replayed: 0,
                replaying: None,
                after: 0,
                recovered_at: 0,
                frontiers: HashMap::new(),
                checkpoints: HashMap::new(),
                committed: 0,
                checkpoint_interval: Duration::from_secs(10),
            }),
            membership_file,
            catalog: Mutex::new(catalog),
            catalog_file,
            commands: tokio::sync::Mutex::new(()),
            ingests: std::sync::atomic::AtomicUsize::new(0),
            newest_epoch: std::sync::atomic::AtomicU64::new(0),
            ops,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; the data stays usable either way.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The number of the next ingest request.
    pub fn next_ingest(&self) -> usize {
        self.ingests.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The newest epoch an ingest reply named.
    pub fn newest_epoch(&self) -> u64 {
        self.newest_epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records an epoch an ingest reply named.
    pub fn saw_epoch(&self, epoch: u64) {
        self.newest_epoch.fetch_max(epoch, std::sync::atomic::Ordering::Relaxed);
    }

    /// The catalog (locked briefly; never held across an await).
    pub fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the membership, carries out the actions it returns, persists changes, and
    /// starts the catalog replay when a new generation runs.
    fn with_membership<R>(self: &Arc<Self>, f: impl FnOnce(&mut Membership) -> (R, Vec<Action>)) -> R {
        let mut inner = self.lock();
        let (result, actions) = f(&mut inner.membership);
        apply(&mut inner, actions);
        // Requests to a generation that ended get no reply: their waiters learn it at once
        // (a catalog replay waiting on one would hold the next generation's replay back).
        let running = inner.membership.running().map(|(g, _, _)| g);
        inner.pending.retain(|_, (_, g, _)| Some(*g) == running);
        if let Some(p) = inner.membership.take_dirty() {
            self.persist(&p);
        }
        if let Some((generation, _, _)) = inner.membership.running() {
            if inner.replayed < generation && inner.replaying != Some(generation) {
                inner.replaying = Some(generation);
                let shared = Arc::clone(self);
                tokio::spawn(async move { shared.replay(generation).await });
            }
        }
        result
    }

    fn persist(&self, p: &Persisted) {
        if let Err(e) = store::write_json_atomic(&self.membership_file, &crate::MembershipFile::new(p.clone())) {
            tracing::error!(file = %self.membership_file.display(), "cannot persist the membership: {e}");
        }
    }

    /// The cluster status.
    pub fn status(&self) -> crate::membership::ClusterStatus {
        let inner = self.lock();
        let mut status = inner.membership.status(Instant::now());
        if status.state == "running" && inner.replayed < status.generation {
            status.state = "forming";
            status.reason = Some(format!("generation {} is replaying the catalog", status.generation));
        }
        status
    }

    /// The newest epoch of `dataflow` complete on every process of `ready`, from what the
    /// processes reported; `None` until each has reported it.
    pub fn newest_complete(&self, ready: &Ready, dataflow: &str) -> Option<u64> {
        let inner = self.lock();
        ready
            .conns
            .iter()
            .map(|c| match inner.frontiers.get(c) {
                Some((generation, f)) if *generation == ready.generation => f.get(dataflow).copied(),
                _ => None,
            })
            .collect::<Option<Vec<u64>>>()
            .and_then(|v| v.into_iter().min())
    }

    /// The running cluster, once its catalog is replayed.
    pub fn ready(&self) -> Result<Ready, RequestError> {
        let inner = self.lock();
        match inner.membership.running() {
            Some((generation, conns, threads)) if inner.replayed == generation => {
                Ok(Ready { generation, conns, threads, after: inner.after, recovered_at: inner.recovered_at })
            }
            Some((generation, _, _)) => {
                Err(RequestError::NotReady(format!("generation {generation} is replaying the catalog")))
            }
            None => Err(RequestError::NotReady(
                inner.membership.ready().err().unwrap_or_else(|| "the cluster is not running".into()),
            )),
        }
    }

    /// Sends `request` on connection `conn` (a process of `generation`) and waits for the reply.
    pub async fn request_to(
        &self,
        conn: ConnId,
        generation: u64,
        request: Request,
        timeout: Duration,
    ) -> Result<Reply, RequestError> {
        let (id, rx) = {
            let mut inner = self.lock();
            let id = inner.next_request;
            inner.next_request += 1;
            let (tx, rx) = oneshot::channel();
            inner.pending.insert(id, (conn, generation, tx));
            let sent = inner.conns.get(&conn).is_some_and(|c| {
                c.send(Out::Msg(CoordMsg::Request { id, generation, request, body_bytes: None })).is_ok()
            });
            if !sent {
                inner.pending.remove(&id);
                return Err(RequestError::NotReady("a worker process is not connected".into()));
            }
            (id, rx)
        };
        // Whether the answer comes, the wait times out or the caller stops waiting (a client that
        // went away drops its handler), the request's waiter leaves `pending` with it.
        let mut waiting = Waiting { shared: self, id, answered: false };
        let answer = tokio::time::timeout(timeout, rx).await;
        waiting.answered = answer.is_ok();
        match answer {
            Ok(Ok(Reply::Error { message })) => Err(RequestError::Failed(message)),
            Ok(Ok(Reply::Refused { status, message })) => Err(RequestError::Refused(status, message)),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(RequestError::Abandoned),
            Err(_) => Err(RequestError::Timeout(timeout)),
        }
    }

    /// Sends `request` to process 0 of the running generation and waits for its reply.
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Reply, RequestError> {
        let ready = self.ready()?;
        let conn = ready.conns.first().copied().ok_or_else(|| RequestError::NotReady("no process 0".into()))?;
        self.request_to(conn, ready.generation, request, timeout).await
    }

    /// Applies a catalog change: sequences `command` through the computation and, once every
    /// worker has it, records the change with `update` and persists the catalog. `check` runs
    /// first, under the same lock, and may refuse the change.
    pub async fn change_catalog<E: From<RequestError>>(
        &self,
        check: impl FnOnce(&Catalog) -> Result<Command, E>,
        update: impl FnOnce(&mut Catalog),
    ) -> Result<(), E> {
        let _serial = self.commands.lock().await;
        let command = check(&self.catalog())?;
        let ready = self.ready()?;
        let conn = ready.conns.first().copied().ok_or_else(|| RequestError::NotReady("no process 0".into()))?;
        let reply = self.request_to(conn, ready.generation, Request::Command(command), COMMAND_TIMEOUT).await?;
        if let Reply::Applied { seq } = reply {
            let mut inner = self.lock();
            if inner.replayed == ready.generation {
                inner.after = inner.after.max(seq);
            }
        }
        let mut catalog = self.catalog();
        update(&mut catalog);
        if let Err(e) = store::write_json_atomic(&self.catalog_file, &*catalog) {
            tracing::error!(file = %self.catalog_file.display(), "cannot persist the catalog: {e}");
        }
        Ok(())
    }

    async fn replay(self: Arc<Self>, generation: u64) {
        let _serial = self.commands.lock().await;
        let commands = self.catalog().replay();
        let conn = {
            let inner = self.lock();
            match inner.membership.running() {
                Some((g, conns, _)) if g == generation => conns.first().copied(),
                _ => None,
            }
        };
        let mut after = 0;
        let count = commands.len();
        let mut ok = conn.is_some();
        let dataflows: Vec<String> = self.catalog().dataflows.iter().map(|d| d.plan.name.clone()).collect();
        let mut recovered_at = 0;
        if let Some(conn) = conn {
            // The catalog first, then every worker replays its log into the dataflows.
            for command in commands.into_iter().chain(std::iter::once(Command::Recover)) {
                match self.request_to(conn, generation, Request::Command(command), COMMAND_TIMEOUT).await {
                    Ok(Reply::Applied { seq }) => after = seq,
                    other => {
                        tracing::warn!(generation, "catalog replay stopped: {other:?}");
                        ok = false;
                        break;
                    }
                }
            }
        }
        if ok {
            // Serve once every dataflow is complete through the epoch at which the last worker
            // thread finished its replay.
            match self.replay_epoch(generation, after).await {
                Some(epoch) => {
                    recovered_at = epoch;
                    ok = self.wait_recovered(generation, &dataflows, recovered_at, after).await;
                }
                None => ok = false,
            }
        }
        let mut inner = self.lock();
        if inner.replaying == Some(generation) {
            inner.replaying = None;
        }
        if ok {
            inner.replayed = generation;
            inner.after = after;
            inner.recovered_at = recovered_at;
            tracing::info!(generation, commands = count, "catalog replayed; the cluster serves");
        }
    }

    /// The newest epoch at which any worker thread of `generation` finished its log replay
    /// (each answers once it has run `Recover`); `None` if a process does not answer.
    async fn replay_epoch(&self, generation: u64, after: u64) -> Option<u64> {
        let conns = match self.lock().membership.running() {
            Some((g, conns, _)) if g == generation => conns,
            _ => return None,
        };
        let mut newest = 0;
        for conn in conns {
            match self.request_to(conn, generation, Request::Recovered { after }, REPLAY_TIMEOUT).await {
                Ok(Reply::Recovered { epoch }) => newest = newest.max(epoch),
                other => {
                    tracing::warn!(generation, "a worker did not report its replay: {other:?}");
                    return None;
                }
            }
        }
        Some(newest)
    }

    /// Waits until every dataflow is complete through `epoch` on every process of `generation`
    /// (the workers' log replays are done); false if the generation ends first.
    async fn wait_recovered(&self, generation: u64, dataflows: &[String], epoch: u64, after: u64) -> bool {
        let started = Instant::now();
        let mut reported = false;
        loop {
            let ready = {
                let inner = self.lock();
                match inner.membership.running() {
                    Some((g, conns, threads)) if g == generation => {
                        Ready { generation, conns, threads, after, recovered_at: epoch }
                    }
                    _ => return false,
                }
            };
            if dataflows.iter().all(|d| self.newest_complete(&ready, d).is_some_and(|c| c >= epoch)) {
                tracing::info!(
                    generation,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "the workers replayed their logs"
                );
                return true;
            }
            if !reported && started.elapsed() > Duration::from_secs(5) {
                tracing::info!(generation, "waiting for the workers to replay their logs");
                reported = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets how often checkpoints are taken.
    pub fn set_checkpoint_interval(&self, every: Duration) {
        self.lock().checkpoint_interval = every;
    }

    /// Asks the running cluster for a checkpoint (each process reports when it wrote its part).
    pub async fn checkpoint(&self) {
        if self.ready().is_err() {
            return;
        }
        match self.request(Request::Command(Command::Checkpoint { epoch: 0 }), Duration::from_secs(5)).await {
            Ok(_) => {}
            Err(e) => tracing::debug!("checkpoint not started: {e}"),
        }
    }

    /// Takes a checkpoint and waits (at most `timeout`) until every process has it: for a clean
    /// shutdown.
    pub async fn final_checkpoint(&self, timeout: Duration) {
        if self.ready().is_err() {
            return;
        }
        let before = self.lock().committed;
        let deadline = Instant::now() + timeout;
        self.checkpoint().await;
        while Instant::now() < deadline {
            let committed = self.lock().committed;
            if committed > before {
                tracing::info!(epoch = committed, "checkpoint on shutdown committed");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!("no checkpoint on shutdown within {timeout:?}; the next start replays the ingest logs");
    }

    /// Process `index` wrote its part of the checkpoint at `epoch`; once every process of the
    /// running generation has, the checkpoint is committed and every process is told, so that
    /// it can delete what the checkpoint covers.
    fn checkpointed(&self, index: usize, generation: u64, epoch: u64) {
        let mut inner = self.lock();
        inner.checkpoints.entry(index).or_default().insert(epoch);
        let Some((g, conns, _)) = inner.membership.running() else { return };
        if g != generation || epoch <= inner.committed {
            return;
        }
        let everyone = (0..conns.len()).all(|i| inner.checkpoints.get(&i).is_some_and(|s| s.contains(&epoch)));
        if !everyone {
            return;
        }
        inner.committed = epoch;
        for set in inner.checkpoints.values_mut() {
            set.retain(|e| *e >= epoch);
        }
        for conn in conns {
            if let Some(tx) = inner.conns.get(&conn) {
                let _ = tx.send(Out::Msg(CoordMsg::CheckpointCommitted { epoch }));
            }
        }
        tracing::info!(generation, epoch, "checkpoint committed");
    }

    /// Advances the membership's clock; called every few tens of milliseconds.
    pub fn tick(self: &Arc<Self>) {
        self.with_membership(|m| ((), m.tick(Instant::now())));
        // A replay that failed (its generation ended) is retried by the next generation; one
        // that failed while the generation still runs is retried here.
        let retry = {
            let inner = self.lock();
            match inner.membership.running() {
                Some((g, _, _)) if inner.replayed < g && inner.replaying.is_none() => Some(g),
                _ => None,
            }
        };
        if let Some(generation) = retry {
            self.lock().replaying = Some(generation);
            let shared = Arc::clone(self);
            tokio::spawn(async move { shared.replay(generation).await });
        }
    }
}

/// How long a worker may take to replay its log after a restart.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a catalog command may take to reach every worker.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

fn apply(inner: &mut Inner, actions: Vec<Action>) {
    for action in actions {
        match action {
            Action::Send(conn, CoordMsg::Form(mut formation)) => {
                // Every process restores the newest checkpoint that all of them have.
                let processes = formation.addresses.len();
                let common = (0..processes)
                    .map(|i| inner.checkpoints.get(&i).cloned().unwrap_or_default())
                    .reduce(|a, b| a.intersection(&b).copied().collect())
                    .unwrap_or_default();
                formation.restore = common.last().copied();
                formation.checkpoint_interval_ms = inner.checkpoint_interval.as_millis() as u64;
                if formation.index == 0 {
                    match formation.restore {
                        Some(epoch) => {
                            tracing::info!(generation = formation.generation, epoch, "the generation restores a checkpoint")
                        }
                        None if inner.checkpoints.values().any(|s| !s.is_empty()) => tracing::warn!(
                            generation = formation.generation,
                            "no checkpoint is common to every worker (a worker has a new data dir?): the logs are replayed from their start, and what older, deleted segments held is gone"
                        ),
                        None => {}
                    }
                }
                if let Some(tx) = inner.conns.get(&conn) {
                    let _ = tx.send(Out::Msg(CoordMsg::Form(formation)));
                }
            }
            Action::Send(conn, msg) => {
                if let Some(tx) = inner.conns.get(&conn) {
                    let _ = tx.send(Out::Msg(msg));
                }
            }
            Action::Close(conn) => {
                if let Some(tx) = inner.conns.remove(&conn) {
                    let _ = tx.send(Out::Close);
                }
            }
        }
    }
}

/// Accepts worker connections forever.
pub async fn serve_control(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move { handle_conn(shared, stream, peer).await });
            }
            Err(e) => {
                tracing::warn!("accepting a control connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn read_frame(rd: &mut OwnedReadHalf) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match rd.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = body_len(prefix)?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    Ok(body)
}

async fn write_frame(wr: &mut OwnedWriteHalf, msg: CoordMsg) -> Result<(), FrameError> {
    let framed = encode_coord(msg)?;
    let write = async {
        wr.write_all(&framed.head).await?;
        if let Some(body) = &framed.body {
            wr.write_all(body.as_bytes()).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(FrameError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

async fn refuse(wr: &mut OwnedWriteHalf, peer: SocketAddr, reason: String) {
    refuse_with(wr, peer, reason, None).await
}

/// Refuses a worker's connection; `retry_after` tells it to try again (see
/// [`CoordMsg::Refused`]).
async fn refuse_with(wr: &mut OwnedWriteHalf, peer: SocketAddr, reason: String, retry_after: Option<Duration>) {
    tracing::warn!(%peer, "refused a control connection: {reason}");
    let retry_after_ms = retry_after.map(|d| d.as_millis() as u64);
    let _ = write_frame(wr, CoordMsg::Refused { reason, retry_after_ms }).await;
    let _ = wr.shutdown().await;
}

async fn handle_conn(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let body = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd)).await {
        Err(_) => return refuse(&mut wr, peer, format!("no registration within {HANDSHAKE_TIMEOUT:?}")).await,
        Ok(Err(FrameError::Closed)) => return,
        Ok(Err(e)) => return refuse(&mut wr, peer, format!("bad handshake: {e}")).await,
        Ok(Ok(body)) => body,
    };
    let register = match parse_handshake(&body) {
        Ok(r) => r,
        Err(reason) => return refuse(&mut wr, peer, reason).await,
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    let registered = {
        let mut inner = shared.lock();
        let conn = inner.next_conn;
        inner.next_conn += 1;
        let (result, actions) = inner.membership.register(conn, &register, Instant::now());
        match result {
            Ok(index) => {
                let timing = inner.membership.timing();
                let _ = tx.send(Out::Msg(CoordMsg::Welcome {
                    index,
                    heartbeat_interval_ms: timing.heartbeat_interval.as_millis() as u64,
                    heartbeat_timeout_ms: timing.heartbeat_timeout.as_millis() as u64,
                }));
                inner.conns.insert(conn, tx);
                inner.checkpoints.insert(index, register.checkpoints.iter().copied().collect());
                apply(&mut inner, actions);
                if let Some(p) = inner.membership.take_dirty() {
                    shared.persist(&p);
                }
                Ok((conn, index))
            }
            Err(reason) => Err(reason),
        }
    };
    let (conn, index) = match registered {
        Ok(r) => r,
        Err(refusal) => {
            let retry_after = refusal.retry.then_some(REFUSED_RETRY_AFTER);
            return refuse_with(&mut wr, peer, refusal.reason, retry_after).await;
        }
    };

    // Frames from the worker arrive through a channel, so that a half-read frame is never lost
    // to a cancelled read. Replies go straight to their waiters from here (one wake-up less per
    // read); everything else to the loop below.
    let (in_tx, mut in_rx) = mpsc::channel::<Result<WorkerMsg, FrameError>>(64);
    let replies = Arc::clone(&shared);
    let reader = tokio::spawn(async move {
        loop {
            let msg = read_frame(&mut rd).await.and_then(|body| decode::<WorkerMsg>(&body));
            if let Ok(WorkerMsg::Reply { id, reply }) = msg {
                if let Some((_, _, waiter)) = replies.lock().pending.remove(&id) {
                    let _ = waiter.send(reply);
                }
                continue;
            }
            let end = msg.is_err();
            if in_tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });

    let reason = loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Msg(msg)) => {
                    if let Err(e) = write_frame(&mut wr, msg).await {
                        break format!("writing to the worker: {e}");
                    }
                }
                Some(Out::Close) | None => break "closed by the coordinator".to_string(),
            },
            frame = in_rx.recv() => match frame {
                Some(Ok(msg)) => match msg {
                    WorkerMsg::Frontiers { generation, frontiers } => {
                        shared.lock().frontiers.insert(conn, (generation, frontiers.into_iter().collect()));
                    }
                    WorkerMsg::Stats(stats) => shared.ops.record_worker(index, stats),
                    msg @ WorkerMsg::Heartbeat { .. } => {
                        if let WorkerMsg::Heartbeat { checkpoints, .. } = &msg {
                            shared.lock().checkpoints.insert(index, checkpoints.iter().copied().collect());
                        }
                        shared.with_membership(|m| ((), m.on_message(conn, &msg, Instant::now())));
                    }
                    WorkerMsg::Checkpointed { generation, epoch } => shared.checkpointed(index, generation, epoch),
                    msg => shared.with_membership(|m| ((), m.on_message(conn, &msg, Instant::now()))),
                },
                Some(Err(FrameError::Closed)) | None => break "connection closed".to_string(),
                Some(Err(e)) => break e.to_string(),
            },
        }
    };
    reader.abort();
    let _ = wr.shutdown().await;
    tracing::info!(%peer, index, "control connection ended: {reason}");
    shared.with_membership(|m| ((), m.disconnected(conn, &reason, Instant::now())));
    let mut inner = shared.lock();
    inner.conns.remove(&conn);
    inner.frontiers.remove(&conn);
    // Requests to this connection get no reply now: their waiters learn it at once.
    inner.pending.retain(|_, (c, _, _)| *c != conn);
}
