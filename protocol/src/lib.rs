//! The wire contract between the sundial coordinator and its worker processes.
//!
//! This crate has no timely and no async runtime in it, so that the coordinator, the worker and
//! the client all agree on one definition of every message.
//!
//! # Transport
//!
//! The control connection is one TCP stream per worker process, opened by the worker. Every
//! message is a *frame*: a 4-byte big-endian length followed by that many bytes of JSON (one
//! [`WorkerMsg`] or [`CoordMsg`]). Frames larger than [`MAX_FRAME_BYTES`] are a protocol error
//! and end the connection. JSON keeps the control plane debuggable. The one bulky payload, the
//! body of an ingest request sent through the coordinator, is not in the JSON: the frame gives
//! its length (`body_bytes`), and its raw bytes follow the frame ([`encode_coord`],
//! [`read_coord`]; the supervisor passes bodies to its computation the same way,
//! [`child::write_request`]).
//!
//! # Stages
//!
//! 1. **Handshake.** The worker's first frame must be [`WorkerMsg::Register`], carrying
//!    [`MAGIC`] and [`PROTOCOL_VERSION`]. The coordinator answers [`CoordMsg::Welcome`] with the
//!    worker's process index, or [`CoordMsg::Refused`] with a reason and closes the connection.
//!    Refusals: another protocol version, a worker id that is already connected, a thread count
//!    that differs from the cluster's, or a cluster that already has all its workers.
//! 2. **Membership.** The worker sends [`WorkerMsg::Heartbeat`] every `heartbeat_interval_ms`;
//!    the coordinator sends [`CoordMsg::Ping`] at the same rate. Either side treats silence for
//!    the heartbeat timeout, or a closed stream, as the loss of the other.
//! 3. **Formation.** When every expected worker is connected, the coordinator sends every worker
//!    a [`CoordMsg::Form`] for a new generation, with the full address list. Each worker starts
//!    (or restarts) its timely computation for that generation and replies
//!    [`WorkerMsg::Started`] once the mesh between processes is connected, or
//!    [`WorkerMsg::Failed`]. A worker that had a computation of an older generation ends it
//!    first. A generation ends with the loss of any of its processes: the coordinator sends
//!    [`CoordMsg::Stop`] to the others, and forms generation + 1 when all workers are back.
//! 4. **Computation.** Requests ([`CoordMsg::Request`]) go to the process that serves them (the
//!    diagnostic exchange check goes to process 0, whose worker 0 injects it into the dataflow);
//!    each request is answered by exactly one [`WorkerMsg::Reply`] with the same id, unless the
//!    generation ends first.
//!
//! A coordinator that restarts learns the running generation back from the `running` field of
//! each worker's `Register`, so the computation survives the coordinator's absence.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The version of this protocol; both sides must speak the same one.
pub const PROTOCOL_VERSION: u32 = 4;

/// The magic string at the start of every handshake, so that a stray client is told apart from
/// a worker of another version.
pub const MAGIC: &str = "sundial";

/// The largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 256 << 20;

/// What a worker process tells the coordinator when it connects.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Register {
    /// Always [`MAGIC`].
    pub magic: String,
    /// The sender's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The stable identity kept in the worker's data dir.
    pub worker_id: String,
    /// The host name the worker runs on (for display).
    pub host: String,
    /// The address other processes reach this worker's timely computation at (`host:port`).
    pub data_addr: String,
    /// Timely worker threads in this process.
    pub threads: usize,
    /// The supervisor's process id (for display and for tests that look at the process table).
    pub pid: u32,
    /// The computation this worker still runs from before it (re)connected, if any.
    pub running: Option<Running>,
    /// Where the worker takes ingest requests over HTTP (`host:port`), if it does.
    #[serde(default)]
    pub ingest_addr: Option<String>,
    /// Where the worker takes NDJSON over its raw TCP line port, if it does.
    #[serde(default)]
    pub lines_addr: Option<String>,
    /// The complete checkpoints in the worker's data dir (their epochs).
    #[serde(default)]
    pub checkpoints: Vec<u64>,
}

/// A generation a worker is currently running.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Running {
    /// The generation's number.
    pub generation: u64,
    /// This worker's process index in it.
    pub index: usize,
    /// Whether the mesh is connected and the computation started.
    pub started: bool,
}

/// The order to start one generation's timely computation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Formation {
    /// The generation this computation belongs to.
    pub generation: u64,
    /// The receiving process's index, `0..addresses.len()`.
    pub index: usize,
    /// Timely data address of every process, by index.
    pub addresses: Vec<String>,
    /// Worker threads per process (the same in every process).
    pub threads: usize,
    /// A random value shared by the processes of this generation; the mesh handshake checks it
    /// so that a process of another cluster or generation cannot join.
    pub token: u64,
    /// Restore the checkpoint at this epoch (every process has it complete) before replaying
    /// the ingest logs after it; `None` replays the logs from their start.
    #[serde(default)]
    pub restore: Option<u64>,
    /// How often the cluster takes a checkpoint (set by the coordinator).
    #[serde(default)]
    pub checkpoint_interval_ms: u64,
}

/// The state of a worker's computation, as reported in heartbeats.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ComputationState {
    /// No computation runs.
    Idle,
    /// The computation is connecting to its peers.
    Starting,
    /// The computation runs.
    Running,
}

/// Messages from a worker process to the coordinator.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    /// The handshake; must be the first frame.
    Register(Register),
    /// Liveness, with what the worker is doing.
    Heartbeat {
        /// The generation of the worker's computation (0 when none ever ran).
        generation: u64,
        /// What the computation is doing.
        state: ComputationState,
        /// The computation child's process id, if one runs.
        computation_pid: Option<u32>,
        /// The complete checkpoints in the worker's data dir (their epochs), as now.
        #[serde(default)]
        checkpoints: Vec<u64>,
    },
    /// The computation of `generation` has connected to all peers and runs.
    Started {
        /// The generation that started.
        generation: u64,
        /// The computation child's process id.
        computation_pid: u32,
    },
    /// The computation of `generation` could not start or has died.
    Failed {
        /// The generation that failed.
        generation: u64,
        /// What happened, for the log and the cluster status.
        reason: String,
    },
    /// The newest epoch complete on every worker thread of this process, per dataflow, sent when
    /// it changes; the coordinator answers reads without `as_of` from it.
    Frontiers {
        /// The generation of the computation.
        generation: u64,
        /// (dataflow, newest complete epoch).
        frontiers: Vec<(String, u64)>,
    },
    /// The answer to [`CoordMsg::Request`] `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// The answer.
        reply: Reply,
    },
    /// What the worker has done and holds, sent every second for metrics and the status page.
    Stats(stats::WorkerStats),
    /// Every thread of this process has written its part of the checkpoint at `epoch`.
    Checkpointed {
        /// The generation.
        generation: u64,
        /// The checkpoint's epoch.
        epoch: u64,
    },
}

/// Messages from the coordinator to a worker process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordMsg {
    /// The handshake succeeded.
    Welcome {
        /// The index this worker holds in the cluster.
        index: usize,
        /// How often the worker should send heartbeats.
        heartbeat_interval_ms: u64,
        /// After how much silence either side gives the other up.
        heartbeat_timeout_ms: u64,
    },
    /// The handshake failed; the connection is closed after this frame.
    Refused {
        /// Why, in words for the operator.
        reason: String,
        /// Set when the refusal may pass by itself, and when to try again: the worker id is
        /// still connected, which is also what a restarted worker sees until the coordinator
        /// has noticed that its previous process's connection closed.
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    /// Liveness of the coordinator.
    Ping,
    /// Start the computation of a new generation (ending any older one first).
    Form(Formation),
    /// End the computation of `generation`.
    Stop {
        /// The generation to end.
        generation: u64,
        /// Why, for the log.
        reason: String,
    },
    /// Every process has the checkpoint at `epoch` complete: older checkpoints, and log
    /// segments it covers, can go.
    CheckpointCommitted {
        /// The checkpoint's epoch.
        epoch: u64,
    },
    /// A request for the running computation.
    Request {
        /// Identifies the reply.
        id: u64,
        /// The generation the request is meant for; a worker running another one fails it.
        generation: u64,
        /// What to do.
        request: Request,
        /// For an ingest request framed by [`encode_coord`]: the length of its body, which
        /// follows the frame as raw UTF-8 (see [`child::ToChild::Request`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body_bytes: Option<usize>,
    },
}

/// Requests the coordinator makes of a running computation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Run the diagnostic exchange: every worker thread sends `records_per_pair` records to every
    /// worker thread, and worker 0 counts what each received from each. Process 0 only.
    Check {
        /// Records each worker sends to each worker.
        records_per_pair: u32,
    },
    /// Sequence a catalog command through the control dataflow. Process 0 only; answered with
    /// [`Reply::Applied`] once every worker has received it (each applies it before any later
    /// command or read).
    Command(Command),
    /// Ingest a batch of events (a share of one HTTP body) into this process's partitions.
    Ingest {
        /// Commands (of this generation's control sequence) to apply before serving this.
        after: u64,
        /// The source.
        source: String,
        /// CSV with a header (else NDJSON).
        csv: bool,
        /// The text.
        body: String,
        /// The number of the body's first line in the client's request.
        first_line: u64,
        /// The batch enters at this epoch or later, so that epochs of successive batches never
        /// go back (a read at a later reply's epoch sees the earlier batches too).
        min_epoch: u64,
        /// The producer's id for this batch: a retry with the same id is answered from the
        /// first attempt's outcome instead of being ingested twice.
        #[serde(default)]
        batch: Option<String>,
    },
    /// The newest epoch at which `dataflow` is complete on every worker of this process.
    Frontier {
        /// Commands (of this generation's control sequence) to apply before serving this.
        after: u64,
        /// The dataflow.
        dataflow: String,
    },
    /// Read a dataflow at an epoch: the given keys (those this process owns), or every key.
    Read {
        /// Commands (of this generation's control sequence) to apply before serving this.
        after: u64,
        /// The dataflow.
        dataflow: String,
        /// The epoch to read at; the read waits until it is complete.
        as_of: u64,
        /// The keys; `None` exports every key.
        keys: Option<Vec<value::Key>>,
        /// How long to wait for `as_of` to complete.
        timeout_ms: u64,
        /// For exports: one page of keys, in key order.
        #[serde(default)]
        page: Option<Page>,
    },
    /// Once every worker thread of this process has run `Recover`: the newest epoch at which
    /// one of them sent replayed events (reads at a later complete epoch see the whole replay).
    Recovered {
        /// Commands (of this generation's control sequence) to apply before serving this.
        after: u64,
    },
    /// The most recent late events of a source kept by this process.
    Late {
        /// Commands (of this generation's control sequence) to apply before serving this.
        after: u64,
        /// The source.
        source: String,
    },
    /// The newest epoch of an ingest batch this process has acknowledged, on any path (answered
    /// on arrival, without waiting for the worker threads).
    Acked,
}

/// A page of an export.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Page {
    /// Keys after this one (exclusive); `None` starts at the first key.
    pub start_after: Option<value::Key>,
    /// At most this many keys.
    pub limit: u32,
    /// Keep `as_of` readable (not compacted) for this long, for the next pages.
    pub hold_ms: u64,
}

/// One window of one feature in a read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WindowOut {
    /// Window start, ms (null for the global window).
    pub start: Option<i64>,
    /// Window end, ms, exclusive (null for the global window).
    pub end: Option<i64>,
    /// The feature's value.
    pub value: serde_json::Value,
    /// The watermark has passed the window's end.
    pub closed: bool,
}

/// The features of one key in a read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KeyResult {
    /// The key.
    pub key: value::Key,
    /// Per feature (in definition order), its retained windows.
    pub features: Vec<(String, Vec<WindowOut>)>,
}

/// A rejected line of an ingest batch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the request body.
    pub line: u64,
    /// Why.
    pub reason: String,
}

/// The outcome of an ingest batch.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Events accepted.
    pub accepted: u64,
    /// Lines rejected.
    pub rejected: u64,
    /// Events dropped as late.
    pub late: u64,
    /// The epoch at which the accepted events are visible.
    pub epoch: u64,
    /// The first rejected lines.
    pub errors: Vec<LineError>,
}

/// The format of an ingest body, from its `Content-Type`: `Ok(true)` for CSV, `Ok(false)` for
/// NDJSON (also when absent), or the reason it is not supported.
pub fn ingest_format(content_type: Option<&str>) -> Result<bool, String> {
    let media = content_type.unwrap_or("application/x-ndjson").split(';').next().unwrap_or_default();
    match media.trim().to_ascii_lowercase().as_str() {
        "text/csv" => Ok(true),
        "application/x-ndjson" | "application/json" | "application/jsonl" | "text/plain" | "" => Ok(false),
        other => Err(format!("content type {other:?} is not supported; send application/x-ndjson or text/csv")),
    }
}

/// The HTTP header carrying a producer's batch id (see [`Request::Ingest`]).
pub const BATCH_HEADER: &str = "x-sundial-batch";

/// Checks a batch id: 1 to 128 visible ASCII characters.
pub fn check_batch_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("batch id {id:?} must be 1 to 128 visible ASCII characters"));
    }
    Ok(())
}

/// The largest ingest body accepted over HTTP, by the coordinator and by workers.
pub const MAX_INGEST_BODY_BYTES: usize = 64 << 20;

/// How many rejected lines an ingest reply lists.
pub const MAX_LISTED_ERRORS: usize = 10;

impl IngestOutcome {
    /// Adds another share's outcome.
    pub fn merge(&mut self, other: IngestOutcome) {
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.late += other.late;
        self.epoch = self.epoch.max(other.epoch);
        self.errors.extend(other.errors);
        self.errors.sort_by_key(|e| e.line);
        self.errors.truncate(MAX_LISTED_ERRORS);
    }
}

/// Replies of a computation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The result of [`Request::Check`].
    Check(CheckReport),
    /// The request could not be served.
    Error {
        /// Why.
        message: String,
    },
    /// The request was refused for a reason with its own HTTP status (507: the ingest log
    /// cannot be written).
    Refused {
        /// The HTTP status to answer.
        status: u16,
        /// Why.
        message: String,
    },
    /// A command was received by every worker.
    Applied {
        /// Commands sequenced so far in this generation, this one included.
        seq: u64,
    },
    /// The result of an ingest batch.
    Ingested(IngestOutcome),
    /// The newest complete epoch (`None`: nothing complete yet).
    Frontier {
        /// The epoch.
        complete: Option<u64>,
    },
    /// The result of a read.
    Read {
        /// The watermark at the epoch read.
        watermark: Option<i64>,
        /// The keys that have data, in key order for exports and request order for keys.
        results: Vec<KeyResult>,
        /// For pages: keys remain after the last one returned.
        #[serde(default)]
        more: bool,
    },
    /// The answer to [`Request::Recovered`].
    Recovered {
        /// The epoch.
        epoch: u64,
    },
    /// Late events, as NDJSON lines.
    Late {
        /// The lines.
        lines: Vec<String>,
    },
    /// The answer to [`Request::Acked`].
    Acked {
        /// The epoch (0 before the first batch).
        epoch: u64,
    },
}

/// What the diagnostic exchange measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckReport {
    /// The generation that ran it.
    pub generation: u64,
    /// Worker processes in the cluster.
    pub processes: usize,
    /// Timely worker threads per process.
    pub threads: usize,
    /// Records each worker sent to each worker.
    pub records_per_pair: u32,
    /// `received[to][from]`: records that worker thread `to` received from worker thread `from`
    /// (global timely worker indices; worker `w` runs in process `w / threads`).
    pub received: Vec<Vec<u64>>,
}

impl CheckReport {
    /// True when every worker thread received exactly the expected records from every other.
    pub fn all_to_all(&self) -> bool {
        let peers = self.processes * self.threads;
        self.received.len() == peers
            && self
                .received
                .iter()
                .all(|row| row.len() == peers && row.iter().all(|&n| n == u64::from(self.records_per_pair)))
    }
}

/// Commands sequenced through the control dataflow, applied by every timely worker in the same
/// order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Command {
    /// Create (or replace the schema of) a source.
    CreateSource(plan::SourcePlan),
    /// Build the dataflow of a definition.
    InstallDataflow(plan::DataflowPlan),
    /// Drop a dataflow and free its state.
    DropDataflow {
        /// Its name.
        name: String,
    },
    /// Run the diagnostic exchange for request `id`.
    Check {
        /// The coordinator's request id.
        id: u64,
        /// Records each worker sends to each worker.
        records_per_pair: u32,
    },
    /// Take a checkpoint: every worker snapshots each dataflow's state as of `epoch` (worker 0
    /// chooses it when it sequences the command, a little ahead of its own epoch).
    Checkpoint {
        /// The epoch; 0 until worker 0 sets it.
        epoch: u64,
    },
    /// Recover after the catalog replay of a new generation: every worker thread replays its
    /// ingest log (after the checkpoint it restored) into the dataflows, then takes ingest.
    Recover,
}

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly before a frame began.
    #[error("connection closed")]
    Closed,
    /// Reading or writing failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The length prefix is over the limit (often: the peer does not speak this protocol).
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_BYTES} bytes (is the peer a sundial process?)")]
    TooLarge(usize),
    /// The frame is not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// An ingest body that follows its frame is over [`MAX_INGEST_BODY_BYTES`].
    #[error("an ingest body of {0} bytes is over the limit of {MAX_INGEST_BODY_BYTES} bytes")]
    BodyTooLarge(usize),
}

/// Encodes a message as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a frame's length prefix and returns the body length.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Takes an ingest request's body out, to be sent raw after its frame (escaping NDJSON into a
/// JSON string and back cost a millisecond per 250 kB on each side, while reads queued behind
/// it).
fn take_body(request: &mut Request) -> Result<Option<String>, FrameError> {
    let Request::Ingest { body, .. } = request else { return Ok(None) };
    if body.len() > MAX_INGEST_BODY_BYTES {
        return Err(FrameError::BodyTooLarge(body.len()));
    }
    Ok(Some(std::mem::take(body)))
}

/// Reads the `len` bytes of raw body that follow `request`'s frame into it: only an ingest
/// request without a body in its frame has one, of at most [`MAX_INGEST_BODY_BYTES`] bytes of
/// UTF-8.
fn read_body<R: Read>(reader: &mut R, request: &mut Request, len: usize) -> Result<(), FrameError> {
    let Request::Ingest { body, .. } = request else {
        return Err(FrameError::Malformed("a body follows a request that is not an ingest".into()));
    };
    if !body.is_empty() {
        return Err(FrameError::Malformed("an ingest request has a body in its frame and another after it".into()));
    }
    if len > MAX_INGEST_BODY_BYTES {
        return Err(FrameError::BodyTooLarge(len));
    }
    let mut bytes = Vec::with_capacity(len);
    reader.take(len as u64).read_to_end(&mut bytes)?;
    if bytes.len() < len {
        return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    *body = String::from_utf8(bytes).map_err(|e| FrameError::Malformed(format!("an ingest body is not UTF-8: {e}")))?;
    Ok(())
}

/// A message that may carry an ingest request whose body travels raw after the frame: the
/// request, and the frame's record of the body's length.
trait WithBody {
    fn body_parts(&mut self) -> Option<(&mut Request, &mut Option<usize>)>;
}

impl WithBody for CoordMsg {
    fn body_parts(&mut self) -> Option<(&mut Request, &mut Option<usize>)> {
        match self {
            CoordMsg::Request { request, body_bytes, .. } => Some((request, body_bytes)),
            _ => None,
        }
    }
}

/// A frame, and the raw body of the ingest request it carries, to be written after it (not
/// copied into it).
#[derive(Debug)]
pub struct Framed {
    /// The frame, length prefix included.
    pub head: Vec<u8>,
    /// The body that follows it.
    pub body: Option<String>,
}

impl Framed {
    /// Writes the frame and the body after it, and flushes.
    pub fn write_to<W: Write>(&self, writer: &mut W) -> Result<(), FrameError> {
        writer.write_all(&self.head)?;
        if let Some(body) = &self.body {
            writer.write_all(body.as_bytes())?;
        }
        writer.flush()?;
        Ok(())
    }
}

/// Frames `msg`, taking the body of an ingest request it carries out of the frame.
fn encode_with_body<T: Serialize + WithBody>(mut msg: T) -> Result<Framed, FrameError> {
    let body = match msg.body_parts() {
        Some((request, body_bytes)) => {
            let body = take_body(request)?;
            *body_bytes = body.as_ref().map(String::len);
            body
        }
        None => None,
    };
    Ok(Framed { head: encode(&msg)?, body })
}

/// Reads one message framed by [`encode_with_body`] from a blocking reader.
fn read_with_body<R: Read, T: DeserializeOwned + WithBody>(reader: &mut R) -> Result<T, FrameError> {
    let mut msg = read_msg::<_, T>(reader)?;
    if let Some((request, body_bytes)) = msg.body_parts() {
        if let Some(len) = body_bytes.take() {
            read_body(reader, request, len)?;
        }
    }
    Ok(msg)
}

/// Frames a message to a worker: the body of an ingest request follows the frame raw.
pub fn encode_coord(msg: CoordMsg) -> Result<Framed, FrameError> {
    encode_with_body(msg)
}

/// Reads one message from the coordinator (framed by [`encode_coord`]) from a blocking reader.
pub fn read_coord<R: Read>(reader: &mut R) -> Result<CoordMsg, FrameError> {
    read_with_body(reader)
}

/// Writes one message as a frame to a blocking writer, and flushes it.
pub fn write_msg<W: Write, T: Serialize>(writer: &mut W, msg: &T) -> Result<(), FrameError> {
    let frame = encode(msg)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

/// Reads one message from a blocking reader. A stream that ends before the first byte of a frame
/// is [`FrameError::Closed`]; one that ends inside a frame is an i/o error.
pub fn read_msg<R: Read, T: DeserializeOwned>(reader: &mut R) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match reader.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len(prefix)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    decode(&body)
}

/// The part of a handshake that every version shares: used to explain why a `Register` that does
/// not parse was refused.
#[derive(Debug, Deserialize)]
struct HandshakeProbe {
    #[serde(rename = "type")]
    kind: Option<String>,
    magic: Option<String>,
    protocol_version: Option<u32>,
}

/// Validates the first frame of a connection. Returns the registration, or the reason to refuse
/// it in words for the peer and the log.
pub fn parse_handshake(body: &[u8]) -> Result<Register, String> {
    let probe: HandshakeProbe =
        serde_json::from_slice(body).map_err(|e| format!("handshake is not a sundial message ({e})"))?;
    if probe.kind.as_deref() != Some("register") {
        return Err(format!("the first message must be a registration, got {:?}", probe.kind.unwrap_or_default()));
    }
    if probe.magic.as_deref() != Some(MAGIC) {
        return Err("handshake has no sundial magic".to_string());
    }
    match probe.protocol_version {
        Some(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {v} is not supported; this coordinator speaks version {PROTOCOL_VERSION}"
            ))
        }
        None => return Err("handshake has no protocol version".to_string()),
    }
    match decode::<WorkerMsg>(body) {
        Ok(WorkerMsg::Register(reg)) => validate_register(reg),
        Ok(_) => Err("the first message must be a registration".to_string()),
        Err(e) => Err(format!("registration does not parse: {e}")),
    }
}

fn validate_register(reg: Register) -> Result<Register, String> {
    if reg.worker_id.is_empty() || reg.worker_id.len() > 128 {
        return Err("worker id must be 1 to 128 characters".to_string());
    }
    if reg.threads == 0 || reg.threads > 1024 {
        return Err(format!("thread count {} is out of range 1..=1024", reg.threads));
    }
    if reg.data_addr.is_empty() || reg.data_addr.len() > 256 {
        return Err("data address must be 1 to 256 characters".to_string());
    }
    Ok(reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register() -> Register {
        Register {
            magic: MAGIC.into(),
            protocol_version: PROTOCOL_VERSION,
            worker_id: "w-1".into(),
            host: "h".into(),
            data_addr: "127.0.0.1:1".into(),
            threads: 2,
            pid: 7,
            running: None,
            ingest_addr: None,
            lines_addr: None,
            checkpoints: vec![5],
        }
    }

    fn ingest(body: &str) -> Request {
        Request::Ingest {
            after: 3,
            source: "tx".into(),
            csv: false,
            body: body.into(),
            first_line: 1,
            min_epoch: 9,
            batch: Some("b".into()),
        }
    }

    /// Ingest bodies cross the supervisor's pipe as raw bytes after their frame; everything else
    /// as before. Several messages in a row, as on the pipe.
    #[test]
    fn ingest_bodies_follow_their_frame_raw() {
        use child::{read_to_child, write_request, ToChild};
        let body = "{\"a\": \"x\\\"y\"}\n{\"a\": \"ü\"}\n";
        let read = Request::Read { after: 1, dataflow: "d".into(), as_of: 5, keys: None, timeout_ms: 10, page: None };
        let mut pipe = Vec::new();
        write_request(&mut pipe, 1, ingest(body)).unwrap();
        write_request(&mut pipe, 2, read.clone()).unwrap();
        write_request(&mut pipe, 3, ingest("")).unwrap();
        // The body is not in the JSON frame.
        let frame_len = u32::from_be_bytes(pipe[..4].try_into().unwrap()) as usize;
        assert!(!String::from_utf8_lossy(&pipe[4..4 + frame_len]).contains("ü"));
        assert_eq!(&pipe[4 + frame_len..4 + frame_len + body.len()], body.as_bytes());
        let mut reader = pipe.as_slice();
        for (id, want) in [(1, ingest(body)), (2, read), (3, ingest(""))] {
            let got = read_to_child(&mut reader).unwrap();
            assert_eq!(got, ToChild::Request { id, request: want, body_bytes: None });
        }
        assert!(matches!(read_to_child(&mut reader), Err(FrameError::Closed)));

        // A cut body, a body that is not UTF-8, a body after a request that takes none, a
        // length over the limit: errors, no panic.
        let mut cut = Vec::new();
        write_request(&mut cut, 1, ingest(body)).unwrap();
        cut.truncate(cut.len() - 1);
        assert!(matches!(read_to_child(&mut cut.as_slice()), Err(FrameError::Io(_))));
        let head =
            |request: Request, len: usize| encode(&ToChild::Request { id: 1, request, body_bytes: Some(len) }).unwrap();
        let mut bad = head(ingest(""), 2);
        bad.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(read_to_child(&mut bad.as_slice()), Err(FrameError::Malformed(m)) if m.contains("UTF-8")));
        let mut stray = head(Request::Recovered { after: 0 }, 1);
        stray.push(b'x');
        assert!(
            matches!(read_to_child(&mut stray.as_slice()), Err(FrameError::Malformed(m)) if m.contains("not an ingest"))
        );
        let huge = head(ingest(""), MAX_INGEST_BODY_BYTES + 1);
        assert!(matches!(read_to_child(&mut huge.as_slice()), Err(FrameError::BodyTooLarge(_))));
        let mut twice = head(ingest("{}"), 2);
        twice.extend_from_slice(b"{}");
        assert!(matches!(read_to_child(&mut twice.as_slice()), Err(FrameError::Malformed(m)) if m.contains("another")));
    }

    /// The same for requests from the coordinator to a worker.
    #[test]
    fn ingest_bodies_from_the_coordinator_follow_their_frame_raw() {
        let body = "{\"a\": \"x\\\"y\"}\n{\"a\": \"ü\"}\n";
        let request = |id, request| CoordMsg::Request { id, generation: 4, request, body_bytes: None };
        let read = Request::Read { after: 1, dataflow: "d".into(), as_of: 5, keys: None, timeout_ms: 10, page: None };
        let msgs = [request(1, ingest(body)), CoordMsg::Ping, request(2, read), request(3, ingest(""))];
        let mut wire = Vec::new();
        for msg in msgs.clone() {
            encode_coord(msg).unwrap().write_to(&mut wire).unwrap();
        }
        let frame_len = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
        assert_eq!(&wire[4 + frame_len..4 + frame_len + body.len()], body.as_bytes());
        let mut reader = wire.as_slice();
        for want in msgs {
            assert_eq!(read_coord(&mut reader).unwrap(), want);
        }
        assert!(matches!(read_coord(&mut reader), Err(FrameError::Closed)));
        let mut cut = Vec::new();
        encode_coord(request(1, ingest(body))).unwrap().write_to(&mut cut).unwrap();
        cut.truncate(cut.len() - 1);
        assert!(matches!(read_coord(&mut cut.as_slice()), Err(FrameError::Io(_))));
        let mut stray = encode(&CoordMsg::Request {
            id: 1,
            generation: 1,
            request: Request::Recovered { after: 0 },
            body_bytes: Some(1),
        })
        .unwrap();
        stray.push(b'x');
        assert!(
            matches!(read_coord(&mut stray.as_slice()), Err(FrameError::Malformed(m)) if m.contains("not an ingest"))
        );
    }

    /// Commands cross timely processes as bincode, which has no field names: every field must
    /// be written (a `skip_serializing_if` would break the other end).
    #[test]
    fn commands_survive_bincode() {
        use plan::{Agg, AggParams, DataflowPlan, FeaturePlan, Field, FieldType, SourcePlan, TimeUnit, Window};
        let source = SourcePlan {
            name: "s".into(),
            fields: vec![Field { name: "t".into(), ty: FieldType::I64 }],
            time: 0,
            time_unit: TimeUnit::Ms,
            allowed_lateness_ms: 0,
            idle_timeout_ms: 1,
        };
        for params in [AggParams::default(), AggParams { k: 3, quantiles: vec![0.5], half_life_ms: 9, precision: 12 }] {
            for id in [0, 7] {
                let plan = DataflowPlan {
                    name: "d".into(),
                    id,
                    source: source.clone(),
                    key: vec![0],
                    filter: None,
                    retention_ms: None,
                    features: vec![FeaturePlan {
                        params: params.clone(),
                        name: "f".into(),
                        agg: Agg::Count,
                        field: None,
                        window: Window::Sliding { size_ms: 60, tile_ms: 6 },
                    }],
                };
                for command in [Command::InstallDataflow(plan), Command::Checkpoint { epoch: 5 }, Command::Recover] {
                    let bytes = bincode::serialize(&command).unwrap();
                    assert_eq!(bincode::deserialize::<Command>(&bytes).unwrap(), command);
                }
            }
        }
    }

    #[test]
    fn frames_round_trip() -> Result<(), FrameError> {
        let msg = WorkerMsg::Register(register());
        let frame = encode(&msg)?;
        let back: WorkerMsg = read_msg(&mut &frame[..])?;
        assert_eq!(back, msg);
        Ok(())
    }

    #[test]
    fn empty_stream_is_closed_and_torn_frame_is_an_error() {
        assert!(matches!(read_msg::<_, WorkerMsg>(&mut &[][..]), Err(FrameError::Closed)));
        assert!(matches!(read_msg::<_, WorkerMsg>(&mut &[0, 0][..]), Err(FrameError::Io(_))));
        assert!(matches!(read_msg::<_, WorkerMsg>(&mut &[0, 0, 0, 9, b'{'][..]), Err(FrameError::Io(_))));
    }

    #[test]
    fn oversized_prefix_is_refused() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(read_msg::<_, WorkerMsg>(&mut &bytes[..]), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn handshake_names_what_is_wrong() -> Result<(), FrameError> {
        let ok = encode(&WorkerMsg::Register(register()))?;
        assert!(parse_handshake(&ok[4..]).is_ok());

        let mut other = register();
        other.protocol_version = 99;
        let frame = encode(&WorkerMsg::Register(other))?;
        let err = parse_handshake(&frame[4..]).err().unwrap_or_default();
        assert!(err.contains("protocol version 99"), "{err}");

        let err = parse_handshake(b"GET / HTTP/1.1").err().unwrap_or_default();
        assert!(err.contains("not a sundial message"), "{err}");

        let hb = encode(&WorkerMsg::Heartbeat {
            generation: 0,
            state: ComputationState::Idle,
            computation_pid: None,
            checkpoints: Vec::new(),
        })?;
        let err = parse_handshake(&hb[4..]).err().unwrap_or_default();
        assert!(err.contains("must be a registration"), "{err}");

        let mut zero = register();
        zero.threads = 0;
        let frame = encode(&WorkerMsg::Register(zero))?;
        let err = parse_handshake(&frame[4..]).err().unwrap_or_default();
        assert!(err.contains("thread count 0"), "{err}");
        Ok(())
    }

    #[test]
    fn check_report_all_to_all() {
        let mut report = CheckReport {
            generation: 1,
            processes: 2,
            threads: 1,
            records_per_pair: 3,
            received: vec![vec![3, 3], vec![3, 3]],
        };
        assert!(report.all_to_all());
        report.received[1][0] = 0;
        assert!(!report.all_to_all());
    }
}

pub mod plan;
pub mod stats;
pub mod value;

/// The pipe protocol between a worker supervisor and the computation child it spawns for one
/// generation: frames as above, on the child's stdin (supervisor to child) and stdout (child to
/// supervisor). The child exits as soon as its stdin closes, so it never outlives its supervisor.
pub mod child {
    use std::io::{Read, Write};

    use serde::{Deserialize, Serialize};

    use crate::{encode_with_body, read_with_body, Formation, FrameError, Reply, Request, WithBody};

    /// Supervisor to computation.
    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum ToChild {
        /// The first message: the generation to run.
        Form(Formation),
        /// A request to serve; answered with [`FromChild::Reply`].
        Request {
            /// Identifies the reply.
            id: u64,
            /// What to do.
            request: Request,
            /// For an ingest request written by [`write_request`]: the length of its body, which
            /// follows the frame as raw UTF-8 (the request's own `body` is empty). Escaping a
            /// body of NDJSON into a JSON string and back cost the supervisor and the
            /// computation a millisecond per 250 kB, while reads waited behind it.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            body_bytes: Option<usize>,
        },
    }

    impl WithBody for ToChild {
        fn body_parts(&mut self) -> Option<(&mut Request, &mut Option<usize>)> {
            match self {
                ToChild::Request { request, body_bytes, .. } => Some((request, body_bytes)),
                ToChild::Form(_) => None,
            }
        }
    }

    /// Writes request `id` to the computation: an ingest body as raw bytes after the frame.
    pub fn write_request<W: Write>(writer: &mut W, id: u64, request: Request) -> Result<(), FrameError> {
        encode_with_body(ToChild::Request { id, request, body_bytes: None })?.write_to(writer)
    }

    /// Reads one message from the supervisor, with the raw body of an ingest request.
    pub fn read_to_child<R: Read>(reader: &mut R) -> Result<ToChild, FrameError> {
        read_with_body(reader)
    }

    /// Computation to supervisor.
    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum FromChild {
        /// The mesh is connected and the timely workers run.
        Started,
        /// The newest epoch complete on every worker thread, per dataflow (when it changes).
        Frontiers {
            /// (dataflow, newest complete epoch).
            frontiers: Vec<(String, u64)>,
        },
        /// What the worker threads hold, sent every second.
        Stats {
            /// Per source (as agreed in the dataflows).
            sources: Vec<crate::stats::SourceGauges>,
            /// Per dataflow, summed over this process's worker threads.
            dataflows: Vec<crate::stats::DataflowGauges>,
        },
        /// Every thread wrote its part of the checkpoint at `epoch`.
        Checkpointed {
            /// The checkpoint's epoch.
            epoch: u64,
        },
        /// The computation could not start; it exits after this.
        Failed {
            /// Why.
            reason: String,
        },
        /// The computation could not bind its data address (another socket holds the port);
        /// it exits after this.
        BindFailed {
            /// Why.
            reason: String,
        },
        /// The answer to a request.
        Reply {
            /// The request's id.
            id: u64,
            /// The answer.
            reply: Reply,
        },
    }
}
