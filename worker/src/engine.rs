//! One timely worker thread of the computation: applies the sequenced catalog commands, runs
//! the feature dataflows, ingests its share of events, advances epochs, publishes what key reads
//! need ([`ReadView`]), and serves exports and reads the views do not cover yet.
//!
//! Jobs arrive from the computation's request thread on a channel. A job that names a command
//! sequence number (`after`) waits until this worker has applied that many commands, so a read
//! or an ingest never overtakes the command that created its dataflow or source.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use differential_dataflow::trace::TraceReader;
use timely::dataflow::ProbeHandle;
use timely::progress::Antichain;
use timely::worker::Worker;

use sundial_dataflows::control::{collect_commands, control_probe, control_stream, ControlInput, Seq};
use sundial_dataflows::diagnostic::{exchange_check, CheckCounts};
use sundial_dataflows::features::{
    assemble, render, Epoch, Layout, Rendered, Report, StateSnapshot, Watermarks, SNAPSHOT_VERSION,
};
use sundial_dataflows::read::{read_from, ReadError, Snapshot};
use sundial_dataflows::row::{parse_body, Row};
use sundial_protocol::child::FromChild;
use sundial_protocol::plan::SourcePlan;
use sundial_protocol::stats::{DataflowGauges, SourceGauges};
use sundial_protocol::value::Key;
use sundial_protocol::{CheckReport, Command, IngestOutcome, KeyResult, Reply, MAX_LISTED_ERRORS};

use crate::checkpoint::{self, ProcessCheckpoint};
use crate::log::{Fsync, Log, Record};

/// How often epochs advance when nothing is ingested.
pub const TICK: Duration = Duration::from_millis(20);
/// How long an epoch stays readable (by `as_of`) after it completed, before it may be compacted
/// away. Counted from completion, not from ingest: under a backlog an ingest reply's epoch
/// completes seconds after the reply, and stays readable this long from then on.
pub const HISTORY: Duration = Duration::from_secs(5);
/// A dataflow whose newest complete epoch is this far (ms) behind the input's is catching up: it
/// favours throughput over the latency of reads (see the compaction in `after_step`).
pub const BACKLOG_MS: u64 = 100;
/// Slots (panes, sessions) a worker reads for one page of an export at most, so that a page's
/// reply stays a few megabytes whatever the number of windows per key.
pub const PAGE_SLOTS: usize = 50_000;
/// Late events kept per source on each worker, for `GET /v1/sources/{source}/late`.
pub const LATE_KEPT: usize = 100;

/// Work for a worker thread.
pub enum Job {
    /// Sequence a command (worker 0 only); reply `Applied` or the check's report.
    Sequence {
        /// The request id.
        id: u64,
        /// The command.
        command: Command,
    },
    /// Ingest a body into this worker's partition.
    Ingest {
        /// The request id.
        id: u64,
        /// Commands to apply first.
        after: u64,
        /// The source.
        source: String,
        /// CSV with a header.
        csv: bool,
        /// The text.
        body: String,
        /// Number of its first line.
        first_line: u64,
        /// Enter at this epoch or later.
        min_epoch: Epoch,
        /// The producer's batch id.
        batch: Option<String>,
        /// The body already parsed (off the worker thread) against a source's schema; used
        /// when that schema is still the source's when the job runs, else the body is parsed.
        parsed: Option<Parsed>,
    },
    /// A part of a request answered by several workers of this process.
    Part {
        /// Commands to apply first.
        after: u64,
        /// What to do.
        part: PartJob,
        /// Where the answer goes.
        gather: Arc<Gather>,
    },
    /// A read somewhere in the cluster waits for this epoch to complete: move this partition's
    /// epoch past it now (not beyond the clock) instead of at the next tick.
    Advance {
        /// The epoch the read waits for.
        past: Epoch,
    },
}

/// An ingest body parsed by the request's router, and the schema it was parsed against.
pub struct Parsed {
    /// The schema.
    pub plan: Arc<SourcePlan>,
    /// Good lines, by line number.
    pub rows: Vec<(u64, Row)>,
    /// Bad lines.
    pub errors: Vec<sundial_dataflows::row::LineError>,
}

/// The per-worker part of a gathered request.
pub enum PartJob {
    /// This worker's complete frontier of a dataflow.
    Frontier {
        /// The dataflow.
        dataflow: String,
    },
    /// Read keys (or all keys) at an epoch.
    Read {
        /// The dataflow.
        dataflow: String,
        /// The epoch.
        as_of: Epoch,
        /// The keys this worker owns, or all.
        keys: Option<Vec<Key>>,
        /// When to give up waiting for `as_of`.
        deadline: Instant,
        /// For exports: one page of keys.
        page: Option<sundial_protocol::Page>,
    },
    /// The epoch this thread's log replay ended at, once it has run.
    Recovered,
    /// Late events kept for a source.
    Late {
        /// The source.
        source: String,
    },
}

/// Collects the parts of one request from several workers and replies once all are in.
pub struct Gather {
    id: u64,
    /// For a page of an export: the most keys to answer with.
    limit: Option<usize>,
    state: Mutex<GatherState>,
}

struct GatherState {
    /// Parts still to come.
    remaining: usize,
    /// The merged answer so far.
    reply: Option<Reply>,
    /// For pages: the smallest last key among parts that stopped early. Keys after it may be
    /// missing from that part, so the page ends there.
    cut: Option<Key>,
}

impl Gather {
    /// A gather for request `id` expecting `parts` answers.
    pub fn new(id: u64, parts: usize) -> Arc<Gather> {
        Arc::new(Gather {
            id,
            limit: None,
            state: Mutex::new(GatherState { remaining: parts, reply: None, cut: None }),
        })
    }

    /// A gather for one page of an export: the parts' keys are merged in key order and cut at
    /// `limit`.
    pub fn page(id: u64, parts: usize, limit: usize) -> Arc<Gather> {
        Arc::new(Gather {
            id,
            limit: Some(limit),
            state: Mutex::new(GatherState { remaining: parts, reply: None, cut: None }),
        })
    }

    fn complete(&self, part: Reply) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Reply::Read { results, more: true, .. } = &part {
            if let Some(last) = results.last() {
                if state.cut.as_ref().is_none_or(|c| last.key < *c) {
                    state.cut = Some(last.key.clone());
                }
            }
        }
        state.reply = Some(match (state.reply.take(), part) {
            (None, p) => p,
            (Some(Reply::Error { message }), _) | (_, Reply::Error { message }) => Reply::Error { message },
            (Some(Reply::Recovered { epoch: a }), Reply::Recovered { epoch: b }) => {
                Reply::Recovered { epoch: a.max(b) }
            }
            (Some(Reply::Frontier { complete: a }), Reply::Frontier { complete: b }) => {
                Reply::Frontier { complete: a.zip(b).map(|(a, b)| a.min(b)) }
            }
            (Some(Reply::Read { watermark, mut results, more }), Reply::Read { results: extra, more: more2, .. }) => {
                results.extend(extra);
                Reply::Read { watermark, results, more: more || more2 }
            }
            (Some(Reply::Late { mut lines }), Reply::Late { lines: more }) => {
                lines.extend(more);
                Reply::Late { lines }
            }
            (Some(_), other) => other,
        });
        state.remaining = state.remaining.saturating_sub(1);
        if state.remaining > 0 {
            return;
        }
        let cut = state.cut.take();
        if let (Some(limit), Some(Reply::Read { results, more, .. })) = (self.limit, state.reply.as_mut()) {
            results.sort_by(|a, b| a.key.cmp(&b.key));
            if let Some(cut) = &cut {
                let keep = results.partition_point(|r| r.key <= *cut);
                if keep < results.len() {
                    results.truncate(keep);
                    *more = true;
                }
            }
            if results.len() > limit {
                results.truncate(limit);
                *more = true;
            }
        }
        if let Some(reply) = state.reply.take() {
            crate::computation::tell(&FromChild::Reply { id: self.id, reply });
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct SourceRt {
    plan: SourcePlan,
    max_ts: Option<i64>,
    last_event: Option<Instant>,
    watermark: Option<i64>,
    late: VecDeque<String>,
}

struct DataflowRt {
    rendered: Rendered,
    /// When this worker built it: a partition without events idles this long after.
    installed: Instant,
    /// When recent epochs completed, to compact only what completed [`HISTORY`] ago.
    completions: Completions,
    /// What its newest [`ReadView`] was taken at: commands applied, complete epoch, compaction.
    published: Option<(u64, Epoch, Epoch)>,
}

/// One worker thread's part of a dataflow as of its newest complete epoch, with what a key read
/// needs besides: readable off that thread. The computation's request thread answers key reads
/// from these (`computation::Router`), so that a read waits neither for the worker thread's
/// current step nor for a core while the worker thread runs ingest, and the worker thread can
/// run at a lower priority than the threads that answer reads.
pub struct ReadView {
    /// Commands the worker thread had applied.
    applied: u64,
    /// The newest epoch complete on the worker thread.
    complete: Epoch,
    /// The arrangement.
    snapshot: Snapshot,
    /// Watermarks and source times by epoch, back to the snapshot's compaction frontier.
    watermarks: Watermarks,
    /// The dataflow's layout.
    layout: Arc<Layout>,
}

impl ReadView {
    /// Whether a read at `as_of` that must follow the first `after` commands can be answered
    /// from this view (otherwise the worker thread answers it, waiting if it must).
    pub fn covers(&self, after: u64, as_of: Epoch) -> bool {
        after <= self.applied && self.snapshot.since() <= as_of && as_of <= self.complete
    }

    /// The newest epoch complete on its worker thread.
    pub fn complete(&self) -> Epoch {
        self.complete
    }

    /// Lets go of a reference to a view. When it is the last one and the view holds the last
    /// reference to a batch (one that merges have replaced since), the view is freed on a merge
    /// thread: freeing a batch's updates takes milliseconds, which neither the worker thread nor
    /// the thread answering reads should spend.
    pub fn let_go(view: Arc<ReadView>) {
        if let Some(view) = Arc::into_inner(view) {
            if view.snapshot.holds_last_reference() {
                sundial_dataflows::spine::drop_off_thread(view);
            }
        }
    }

    /// The watermark in force at `as_of`.
    pub fn watermark(&self, as_of: Epoch) -> Option<i64> {
        self.watermarks.at(as_of)
    }

    /// Adds the results of `keys` at `as_of` to `results` (keys with no live slot are left out).
    pub fn read(&self, keys: Vec<Key>, as_of: Epoch, results: &mut Vec<KeyResult>) -> Result<(), ReadError> {
        let (watermark, now) = (self.watermarks.at(as_of), self.watermarks.now_at(as_of));
        read_keys(&self.snapshot, &self.layout, keys, as_of, (watermark, now), results)
    }
}

/// Adds the results of `keys` at `as_of` in `snapshot` to `results` (keys with no live slot are
/// left out), with the watermark and source time in force at `as_of` (`marks`).
fn read_keys(
    snapshot: &Snapshot,
    layout: &Layout,
    keys: Vec<Key>,
    as_of: Epoch,
    marks: (Option<i64>, Option<i64>),
    results: &mut Vec<KeyResult>,
) -> Result<(), ReadError> {
    snapshot.read_keys(keys, as_of, |key, slots| {
        if !slots.is_empty() {
            results.push(KeyResult { features: assemble(layout, &slots, marks.0, marks.1), key });
        }
    })
}

/// When each recent epoch became the newest complete one: one entry per 10 ms at most (so an
/// epoch may count as complete up to 10 ms early), none older than the newest one at least
/// [`HISTORY`] old.
#[derive(Default)]
struct Completions(VecDeque<(Instant, Epoch)>);

impl Completions {
    /// `complete` is the newest complete epoch at `now`.
    fn record(&mut self, now: Instant, complete: Epoch) {
        match self.0.back_mut() {
            Some((at, e)) if now.duration_since(*at) < Duration::from_millis(10) => *e = (*e).max(complete),
            Some((_, e)) if *e >= complete => {}
            _ => self.0.push_back((now, complete)),
        }
        while self.0.get(1).is_some_and(|&(at, _)| now.duration_since(at) >= HISTORY) {
            self.0.pop_front();
        }
    }

    /// The newest epoch that was already complete [`HISTORY`] before `now` (0: none).
    fn aged(&self, now: Instant) -> Epoch {
        self.0.iter().take_while(|&&(at, _)| now.duration_since(at) >= HISTORY).last().map_or(0, |&(_, e)| e)
    }
}

/// Context shared by the worker threads of one computation.
pub struct Context {
    /// Generation, for check reports.
    pub generation: u64,
    /// Processes in the computation.
    pub processes: usize,
    /// Each worker thread's job receiver, taken by the thread at start (by local index).
    pub jobs: Mutex<Vec<Option<Receiver<Job>>>>,
    /// Each worker thread's handle, for unparking it when a job arrives.
    pub threads: Vec<std::sync::OnceLock<std::thread::Thread>>,
    /// Each local thread's gauges, refreshed every [`GAUGE_INTERVAL`].
    pub gauges: Mutex<Vec<ThreadGauges>>,
    /// The worker's data dir: ingest logs in `log/t{thread}`.
    pub data_dir: std::path::PathBuf,
    /// When log records are synced.
    pub fsync: Fsync,
    /// The batch ids this process has seen, shared by its threads.
    pub batches: Mutex<Batches>,
    /// Local threads that have replayed their logs. Ingest waits for all of them: a retried
    /// batch may have been logged by another thread than the one it reaches now.
    pub recovered: Arc<std::sync::atomic::AtomicUsize>,
    /// The checkpoint this generation starts from, and this process's part of it.
    pub restore: Option<ProcessCheckpoint>,
    /// Per checkpoint epoch, how far this process's threads are.
    pub checkpoints: Mutex<HashMap<Epoch, CheckpointProgress>>,
    /// The sources' schemas as the worker threads applied them, so that ingest bodies can be
    /// parsed before they reach a worker thread (which then only logs and feeds them).
    pub schemas: std::sync::RwLock<HashMap<String, Arc<SourcePlan>>>,
    /// Per dataflow, each local thread's newest [`ReadView`], which also says the newest epoch
    /// complete on that thread (reported to the coordinator).
    pub views: Mutex<HashMap<String, Vec<Option<Arc<ReadView>>>>>,
    /// The newest epoch of an ingest batch acknowledged by a thread of this process
    /// ([`sundial_protocol::Request::Acked`]).
    pub acked: std::sync::atomic::AtomicU64,
}

impl Context {
    /// Makes `view` local thread `local`'s view of `dataflow` (none: the dataflow is gone), and
    /// lets go of the one it replaces ([`ReadView::let_go`]).
    fn publish(&self, dataflow: &str, local: usize, view: Option<Arc<ReadView>>) {
        let Ok(mut views) = self.views.lock() else { return };
        let old = match views.get_mut(dataflow) {
            Some(slots) => slots.get_mut(local).and_then(|slot| std::mem::replace(slot, view)),
            None => {
                let mut slots = vec![None; self.threads.len()];
                if let Some(slot) = slots.get_mut(local) {
                    *slot = view;
                }
                views.insert(dataflow.to_string(), slots);
                None
            }
        };
        if views.get(dataflow).is_some_and(|slots| slots.iter().all(Option::is_none)) {
            views.remove(dataflow);
        }
        drop(views);
        if let Some(old) = old {
            ReadView::let_go(old);
        }
    }
}

/// How far the threads of a process are with one checkpoint.
#[derive(Debug, Default)]
pub struct CheckpointProgress {
    /// Threads that wrote their part.
    pub done: usize,
    /// A thread abandoned it.
    pub failed: bool,
}

/// How far ahead of worker 0's epoch a checkpoint's epoch is set, so that every worker applies
/// the request before its dataflows reach that epoch (one that comes too late is abandoned).
pub const CHECKPOINT_MARGIN_MS: u64 = 300;
/// A checkpoint not written within this long is abandoned.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);

/// A checkpoint this thread is taking.
struct PendingCheckpoint {
    epoch: Epoch,
    /// (name, catalog id) of the dataflows it holds.
    dataflows: Vec<(String, u64)>,
    started: Instant,
}

/// How long a batch id is remembered for answering retries.
pub const BATCH_MEMORY: Duration = Duration::from_secs(15 * 60);
/// How many batch ids are remembered at most.
pub const BATCH_IDS: usize = 200_000;

/// What is known of a batch id.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    /// Being ingested now.
    InFlight,
    /// Ingested with this outcome.
    Done(IngestOutcome),
}

/// Batch ids seen recently, to answer a producer's retry with the first attempt's outcome.
#[derive(Default)]
pub struct Batches {
    ids: HashMap<String, Seen>,
    order: VecDeque<(Instant, String)>,
}

impl Batches {
    /// Claims `id` for ingesting, or tells what is known of it.
    pub fn begin(&mut self, id: &str) -> Option<Seen> {
        if let Some(seen) = self.ids.get(id) {
            return Some(seen.clone());
        }
        self.ids.insert(id.to_string(), Seen::InFlight);
        self.order.push_back((Instant::now(), id.to_string()));
        self.forget_old();
        None
    }

    /// Records the outcome of `id`.
    pub fn done(&mut self, id: &str, outcome: IngestOutcome) {
        if self.ids.insert(id.to_string(), Seen::Done(outcome)).is_none() {
            self.order.push_back((Instant::now(), id.to_string()));
            self.forget_old();
        }
    }

    /// Forgets `id` (its ingest failed; a retry ingests it).
    pub fn abandon(&mut self, id: &str) {
        if self.ids.get(id) == Some(&Seen::InFlight) {
            self.ids.remove(id);
        }
    }

    /// The outcomes remembered, for a checkpoint.
    pub fn export(&self) -> Vec<(String, IngestOutcome)> {
        self.ids
            .iter()
            .filter_map(|(id, seen)| match seen {
                Seen::Done(outcome) => Some((id.clone(), outcome.clone())),
                Seen::InFlight => None,
            })
            .collect()
    }

    fn forget_old(&mut self) {
        while let Some((at, id)) = self.order.front() {
            if self.order.len() <= BATCH_IDS && at.elapsed() < BATCH_MEMORY {
                break;
            }
            self.ids.remove(id);
            self.order.pop_front();
        }
    }
}

/// How often worker threads refresh their gauges.
pub const GAUGE_INTERVAL: Duration = Duration::from_millis(500);

/// What one worker thread holds, for metrics.
#[derive(Clone, Debug, Default)]
pub struct ThreadGauges {
    /// Per source: (agreed watermark, largest accepted event time).
    pub sources: HashMap<String, (Option<i64>, Option<i64>)>,
    /// Per dataflow: the size of its state on this thread.
    pub dataflows: HashMap<String, sundial_dataflows::features::StateSize>,
}

impl Context {
    /// The gauges of this process: watermarks and event times at their largest over the threads
    /// (the watermark is agreed, so they differ only while it travels), state sizes summed.
    pub fn process_gauges(&self) -> (Vec<SourceGauges>, Vec<DataflowGauges>) {
        let Ok(threads) = self.gauges.lock() else { return (Vec::new(), Vec::new()) };
        let mut sources: BTreeMap<&str, SourceGauges> = BTreeMap::new();
        let mut dataflows: BTreeMap<&str, DataflowGauges> = BTreeMap::new();
        for thread in threads.iter() {
            for (name, (watermark, max_ts)) in &thread.sources {
                let g =
                    sources.entry(name).or_insert_with(|| SourceGauges { name: name.clone(), ..Default::default() });
                g.watermark_ms = g.watermark_ms.max(*watermark);
                g.max_event_time_ms = g.max_event_time_ms.max(*max_ts);
            }
            for (name, size) in &thread.dataflows {
                let g = dataflows
                    .entry(name)
                    .or_insert_with(|| DataflowGauges { name: name.clone(), ..Default::default() });
                g.live_slots += size.live_slots;
                g.arrangement_updates += size.arrangement_updates;
                g.state_bytes += size.bytes;
            }
        }
        (sources.into_values().collect(), dataflows.into_values().collect())
    }
}

struct Engine {
    index: usize,
    peers: usize,
    /// Worker 0 sequences commands; the others have closed their control input.
    control: Option<ControlInput>,
    control_probe: ProbeHandle<Seq>,
    commands: sundial_dataflows::control::CommandLog,
    check_counts: CheckCounts,
    applied: u64,
    /// Worker 0: sequenced commands waiting for the control probe: (seq, request id, check).
    sequenced: Vec<(Seq, u64, Option<u32>)>,
    sources: HashMap<String, SourceRt>,
    dataflows: HashMap<String, DataflowRt>,
    epoch: Epoch,
    deferred: VecDeque<Job>,
    /// Read holds of paged exports: dataflow → (epoch kept readable, until when).
    holds: HashMap<String, Vec<(Epoch, Instant)>>,
    /// Dataflows dropped since the last `after_step`, which removes their views.
    dropped: Vec<String>,
    /// When to refresh this thread's gauges next.
    next_gauges: Instant,
    /// This partition's ingest log, or why it cannot be opened.
    log: Result<Log, String>,
    /// Where the log lives.
    log_dir: std::path::PathBuf,
    /// The generation's `Recover` command has run: the log is replayed and ingest is taken.
    recovered: bool,
    /// The epoch after this thread's log replay (its replayed events are at earlier epochs).
    recovered_epoch: Epoch,
    /// The computation's shared context.
    ctx: Arc<Context>,
    /// Dataflows installed from now on start at this epoch or later (the newest checkpoint's),
    /// so that a checkpoint holds every dataflow installed before it and the log marks the
    /// rest after it.
    checkpoint_floor: Epoch,
    /// The checkpoint being taken.
    pending_checkpoint: Option<PendingCheckpoint>,
    /// Dataflows restored from the generation's checkpoint (catalog ids).
    restored: std::collections::HashSet<u64>,
}

/// Runs one worker thread forever.
pub fn run(worker: &mut Worker, ctx: Arc<Context>) -> ! {
    let ctx_handle = Arc::clone(&ctx);
    let ctx: &Context = &ctx_handle;
    let index = worker.index();
    let peers = worker.peers();
    let local = index % ctx.threads.len().max(1);
    let probe = control_probe();
    let (control, commands, check_counts) = worker.dataflow::<Seq, _, _>(|scope| {
        let (input, stream) = control_stream(scope);
        let counts = exchange_check(stream.clone(), index, peers, &probe);
        let commands = collect_commands(stream, &probe);
        (input, commands, counts)
    });
    // Key reads are answered off this thread (`ReadView`). It runs below the threads that answer
    // them, as does every thread it starts (merges, checkpoints): the policy is inherited from
    // the thread that started timely (`computation::run`).
    let jobs = ctx.jobs.lock().ok().and_then(|mut j| j.get_mut(local).and_then(Option::take));
    if let Some(slot) = ctx.threads.get(local) {
        let _ = slot.set(std::thread::current());
    }
    let control = if index == 0 {
        Some(control)
    } else {
        // Only worker 0 sequences commands; the others follow the broadcast.
        control.close();
        None
    };
    let mut engine = Engine {
        index,
        peers,
        control,
        control_probe: probe,
        commands,
        check_counts,
        applied: 0,
        sequenced: Vec::new(),
        sources: HashMap::new(),
        dataflows: HashMap::new(),
        epoch: unix_ms(),
        deferred: VecDeque::new(),
        holds: HashMap::new(),
        dropped: Vec::new(),
        next_gauges: Instant::now(),
        log: Err("not opened".into()),
        log_dir: ctx.data_dir.join("log").join(format!("t{local}")),
        recovered: false,
        recovered_epoch: 0,
        ctx: Arc::clone(&ctx_handle),
        checkpoint_floor: 0,
        pending_checkpoint: None,
        restored: std::collections::HashSet::new(),
    };
    engine.log = open_log(&engine.log_dir, ctx.fsync);
    loop {
        if let Some(jobs) = &jobs {
            while let Ok(job) = jobs.try_recv() {
                engine.deferred.push_back(job);
            }
        }
        engine.apply_commands(worker);
        engine.run_jobs();
        engine.tick(false);
        worker.step_or_park(Some(TICK));
        engine.after_step(ctx);
    }
}

impl Engine {
    fn apply_commands(&mut self, worker: &mut Worker) {
        loop {
            let next = self.commands.borrow().first_key_value().map(|(t, _)| *t);
            let Some(t) = next else { return };
            if self.control_probe.less_equal(&t) {
                return;
            }
            let cmds = self.commands.borrow_mut().remove(&t).unwrap_or_default();
            for cmd in cmds {
                self.apply(worker, cmd);
            }
            self.applied = t + 1;
        }
    }

    fn apply(&mut self, worker: &mut Worker, cmd: Command) {
        match cmd {
            Command::Check { .. } => {}
            Command::Checkpoint { epoch } => self.start_checkpoint(epoch),
            Command::Recover => {
                // Once per generation (a coordinator that restarts replays its catalog again).
                if !self.recovered {
                    self.recover(worker);
                    self.recovered = true;
                    self.recovered_epoch = self.epoch;
                    self.ctx.recovered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Command::CreateSource(plan) => {
                tracing::debug!(source = %plan.name, "source created");
                let name = plan.name.clone();
                if let Ok(mut schemas) = self.ctx.schemas.write() {
                    if schemas.get(&name).is_none_or(|s| **s != plan) {
                        schemas.insert(name.clone(), Arc::new(plan.clone()));
                    }
                }
                match self.sources.get_mut(&name) {
                    Some(existing) => existing.plan = plan,
                    None => {
                        self.sources.insert(
                            name,
                            SourceRt { plan, max_ts: None, last_event: None, watermark: None, late: VecDeque::new() },
                        );
                    }
                }
            }
            Command::InstallDataflow(plan) => {
                if self.dataflows.contains_key(&plan.name) {
                    return;
                }
                let name = plan.name.clone();
                let id = plan.id;
                // After a checkpoint was requested, a new dataflow starts at its epoch or later.
                if self.epoch < self.checkpoint_floor {
                    self.advance_to(self.checkpoint_floor);
                }
                let snapshot = if self.recovered { None } else { self.restore_snapshot(&plan) };
                if let Some(s) = &snapshot {
                    self.restored.insert(id);
                    if let Some(src) = self.sources.get_mut(&plan.source.name) {
                        src.max_ts = src.max_ts.max(s.partition_max(self.index as u32));
                    }
                }
                let mut rendered = worker.dataflow::<Epoch, _, _>(|scope| render(scope, plan, snapshot));
                rendered.rows.advance_to(self.epoch);
                rendered.reports.advance_to(self.epoch);
                // A dataflow installed now reads this partition's batches from now on; replays
                // after a restart follow the same mark. (During a generation's catalog replay the
                // marks are in the log already.)
                if self.recovered {
                    let mark = Record::Installed { dataflow: id, epoch: self.epoch };
                    match self.log.as_mut() {
                        Ok(log) => {
                            if let Err(e) = log.append(&mark, true) {
                                tracing::error!(dataflow = %name, "cannot mark the install in the ingest log: {e}");
                            }
                        }
                        Err(e) => tracing::error!(dataflow = %name, "cannot mark the install in the ingest log: {e}"),
                    }
                }
                if self.index == 0 {
                    tracing::info!(dataflow = %name, "dataflow installed");
                }
                self.dataflows.insert(
                    name,
                    DataflowRt {
                        rendered,
                        installed: Instant::now(),
                        completions: Completions::default(),
                        published: None,
                    },
                );
            }
            Command::DropDataflow { name } => {
                // Closing the inputs lets the dataflow drain and complete; dropping the trace
                // handle releases the arrangement. timely then removes the dataflow and frees
                // its operators' state.
                if let Some(df) = self.dataflows.remove(&name) {
                    self.dropped.push(name.clone());
                    let Rendered { rows, reports, trace, .. } = df.rendered;
                    drop((rows, reports, trace));
                    if self.index == 0 {
                        tracing::info!(dataflow = %name, "dataflow dropped");
                    }
                }
            }
        }
    }

    /// Runs the queued jobs: reads, other parts of gathered requests and epoch advances first
    /// (they are short and someone waits on each), then ingest and commands, in arrival order
    /// within each kind.
    fn run_jobs(&mut self) {
        let mut waiting = VecDeque::new();
        let (parts, rest): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|j| matches!(j, Job::Part { .. } | Job::Advance { .. }));
        for job in parts.into_iter().chain(rest) {
            if let Some(job) = self.run_job(job) {
                waiting.push_back(job);
            }
        }
        self.deferred = waiting;
    }

    /// Runs a job, or returns it when it must wait.
    fn run_job(&mut self, job: Job) -> Option<Job> {
        match job {
            Job::Sequence { id, command } => {
                let Some(control) = self.control.as_mut() else {
                    crate::computation::tell(&FromChild::Reply {
                        id,
                        reply: Reply::Error { message: "only worker 0 sequences commands".into() },
                    });
                    return None;
                };
                let seq = *control.time();
                let check = match &command {
                    Command::Check { records_per_pair, .. } => Some(*records_per_pair),
                    _ => None,
                };
                control.send(match command {
                    Command::Check { records_per_pair, .. } => Command::Check { id, records_per_pair },
                    Command::Checkpoint { .. } => Command::Checkpoint { epoch: self.epoch + CHECKPOINT_MARGIN_MS },
                    other => other,
                });
                control.advance_to(seq + 1);
                self.sequenced.push((seq, id, check));
                None
            }
            // Only once the log replay of this generation is done (an advance is a shortcut:
            // dropped, the read waits for the tick instead).
            // A read's epoch may be this very millisecond (a batch enters at its worker's clock):
            // up to a tick past the clock is allowed, or the read would wait for the next tick.
            Job::Advance { past } => {
                let next = past.saturating_add(1).min(unix_ms() + TICK.as_millis() as u64);
                if next > self.epoch && self.all_recovered() {
                    self.advance_to(next);
                }
                None
            }
            Job::Ingest { after, .. } | Job::Part { after, .. } if after > self.applied => Some(job),
            // Ingest waits for the log replay of a new generation.
            Job::Ingest { .. } if !self.all_recovered() => Some(job),
            Job::Ingest { id, source, csv, body, first_line, min_epoch, batch, parsed, .. } => {
                // At the clock, not at the last tick (up to a tick behind), and never below an
                // epoch this process has acknowledged on any thread: a read at this batch's epoch
                // then sees every batch acknowledged before it here, and (clocks agreeing) on the
                // other processes.
                let floor = min_epoch.max(self.ctx.acked.load(Ordering::SeqCst)).max(unix_ms());
                if self.epoch < floor {
                    self.advance_to(floor);
                }
                let reply = self.ingest(&source, csv, &body, first_line, batch.as_deref(), parsed);
                if let Reply::Ingested(outcome) = &reply {
                    // Before the reply leaves, so that `Request::Acked` answered after it counts it.
                    self.ctx.acked.fetch_max(outcome.epoch, Ordering::SeqCst);
                }
                crate::computation::tell(&FromChild::Reply { id, reply });
                None
            }
            Job::Part { part, gather, after } => match part {
                PartJob::Frontier { dataflow } => {
                    gather.complete(match self.dataflows.get(&dataflow) {
                        Some(df) => Reply::Frontier { complete: complete_epoch(&df.rendered.probe) },
                        None => unknown_dataflow(&dataflow),
                    });
                    None
                }
                PartJob::Recovered if !self.recovered => Some(Job::Part { after, part: PartJob::Recovered, gather }),
                PartJob::Recovered => {
                    gather.complete(Reply::Recovered { epoch: self.recovered_epoch });
                    None
                }
                PartJob::Late { source } => {
                    gather.complete(match self.sources.get(&source) {
                        Some(s) => Reply::Late { lines: s.late.iter().cloned().collect() },
                        None => Reply::Error { message: format!("unknown source {source:?}") },
                    });
                    None
                }
                PartJob::Read { dataflow, as_of, keys, deadline, page } => {
                    if let Some(p) = &page {
                        let until = Instant::now() + Duration::from_millis(p.hold_ms);
                        let holds = self.holds.entry(dataflow.clone()).or_default();
                        holds.retain(|(e, _)| *e != as_of);
                        holds.push((as_of, until));
                    }
                    let Some(df) = self.dataflows.get_mut(&dataflow) else {
                        gather.complete(unknown_dataflow(&dataflow));
                        return None;
                    };
                    if df.rendered.probe.less_equal(&as_of) {
                        if Instant::now() >= deadline {
                            gather.complete(Reply::Error {
                                message: format!(
                                    "epoch {as_of} did not complete in time (newest complete: {:?})",
                                    complete_epoch(&df.rendered.probe)
                                ),
                            });
                            return None;
                        }
                        return Some(Job::Part {
                            after,
                            part: PartJob::Read { dataflow, as_of, keys, deadline, page },
                            gather,
                        });
                    }
                    gather.complete(read(df, as_of, keys, page.as_ref()));
                    None
                }
            },
        }
    }

    fn ingest(
        &mut self,
        source: &str,
        csv: bool,
        body: &str,
        first_line: u64,
        batch: Option<&str>,
        parsed: Option<Parsed>,
    ) -> Reply {
        let Some(src) = self.sources.get(source) else {
            return Reply::Error { message: format!("unknown source {source:?}") };
        };
        if let Some(id) = batch {
            let seen = self.ctx.batches.lock().map(|mut b| b.begin(id)).unwrap_or(None);
            match seen {
                Some(Seen::Done(outcome)) => {
                    tracing::info!(batch = id, "answered a retried batch from its first attempt");
                    return Reply::Ingested(IngestOutcome { epoch: outcome.epoch.max(self.epoch), ..outcome });
                }
                Some(Seen::InFlight) => {
                    return Reply::Refused {
                        status: 409,
                        message: format!("batch {id:?} is being ingested by an earlier attempt; retry shortly"),
                    }
                }
                None => {}
            }
        }
        let (rows, errors) = match parsed {
            Some(p) if *p.plan == src.plan => (p.rows, p.errors),
            _ => parse_body(body, csv, &src.plan, first_line),
        };
        let mut outcome =
            IngestOutcome { rejected: errors.len() as u64, epoch: self.epoch, ..IngestOutcome::default() };
        outcome.errors = errors.into_iter().take(MAX_LISTED_ERRORS).collect();
        let mut accepted: Vec<Row> = Vec::with_capacity(rows.len());
        let mut late: Vec<Row> = Vec::new();
        for (_, row) in rows {
            if src.watermark.is_some_and(|w| row.time < w) {
                late.push(row);
            } else {
                accepted.push(row);
            }
        }
        outcome.accepted = accepted.len() as u64;
        outcome.late = late.len() as u64;

        // The accepted events reach the log before anything else sees them; if they cannot,
        // nothing of the batch is accepted.
        if !accepted.is_empty() {
            let logged = match self.log.as_mut() {
                Ok(log) => log
                    .append_batch(self.epoch, source, batch, &accepted, outcome.rejected, outcome.late)
                    .map_err(|e| e.to_string()),
                Err(_) => {
                    // The log could not be opened before (an unwritable data dir): try again.
                    self.log = open_log(&self.log_dir, self.log.as_ref().map_or(Fsync::Batch, |l| l.fsync()));
                    match self.log.as_mut() {
                        Ok(log) => log
                            .append_batch(self.epoch, source, batch, &accepted, outcome.rejected, outcome.late)
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.clone()),
                    }
                }
            };
            if let Err(e) = logged {
                if let Some(id) = batch {
                    if let Ok(mut b) = self.ctx.batches.lock() {
                        b.abandon(id);
                    }
                }
                tracing::error!(source, "refused an ingest batch: the ingest log cannot be written: {e}");
                return Reply::Refused {
                    status: 507,
                    message: format!("the ingest log cannot be written ({e}); nothing of this batch was accepted"),
                };
            }
        }

        let Some(src) = self.sources.get_mut(source) else {
            return Reply::Error { message: format!("unknown source {source:?}") };
        };
        for row in &late {
            if src.late.len() >= LATE_KEPT {
                src.late.pop_front();
            }
            src.late.push_back(row_json(&src.plan, row));
        }
        if let Some(max) = accepted.iter().map(|r| r.time).max() {
            src.max_ts = src.max_ts.max(Some(max));
            src.last_event = Some(Instant::now());
        }
        self.feed(source, accepted, None);
        if let Some(id) = batch {
            if let Ok(mut b) = self.ctx.batches.lock() {
                b.done(id, IngestOutcome { errors: Vec::new(), ..outcome.clone() });
            }
        }
        // The batch is complete at this epoch; move on so it becomes readable promptly.
        self.tick(true);
        Reply::Ingested(outcome)
    }

    /// The state of `plan`'s dataflow on this thread at the generation's checkpoint, if the
    /// checkpoint holds it. A checkpoint that holds it but cannot be read ends the computation:
    /// starting without it would answer wrong.
    fn restore_snapshot(&self, plan: &sundial_protocol::plan::DataflowPlan) -> Option<StateSnapshot> {
        let part = self.ctx.restore.as_ref()?;
        if !part.dataflows.contains(&plan.id) {
            return None;
        }
        let path = checkpoint::state_file(&self.ctx.data_dir, part.epoch, plan.id, self.index);
        let snapshot = checkpoint::read(&path).and_then(|bytes: Vec<u8>| {
            bincode::deserialize::<StateSnapshot>(&bytes).map_err(|e| format!("{}: {e}", path.display()))
        });
        match snapshot {
            Ok(s) if s.dataflow == plan.id && s.version == SNAPSHOT_VERSION => Some(s),
            Ok(s) => crate::computation::fail(&format!(
                "{}: holds dataflow {} (snapshot version {}), expected dataflow {} (version {SNAPSHOT_VERSION})",
                path.display(),
                s.dataflow,
                s.version,
                plan.id
            )),
            Err(e) => {
                let aside = checkpoint::set_aside(&self.ctx.data_dir, part.epoch).map_or_else(
                    |e| format!("it could not be set aside: {e}"),
                    |p| format!("it was set aside as {}", p.display()),
                );
                crate::computation::fail(&format!(
                    "cannot restore dataflow {:?} from the checkpoint at epoch {}: {e}; {aside}, and the next generation falls back to an older checkpoint",
                    plan.name, part.epoch
                ))
            }
        }
    }

    /// Asks every dataflow for its state as of `epoch` (0: worker 0 has not set it; ignored).
    fn start_checkpoint(&mut self, epoch: Epoch) {
        if epoch == 0 {
            return;
        }
        if let Some(old) = self.pending_checkpoint.take() {
            self.checkpoint_failed(old.epoch, "a newer checkpoint started");
        }
        self.checkpoint_floor = self.checkpoint_floor.max(epoch);
        let mut dataflows = Vec::new();
        for (name, df) in &self.dataflows {
            let mut cell = df.rendered.checkpoint.borrow_mut();
            cell.requested = Some(epoch);
            cell.result = None;
            dataflows.push((name.clone(), df.rendered.layout.plan.id));
        }
        dataflows.sort();
        self.pending_checkpoint = Some(PendingCheckpoint { epoch, dataflows, started: Instant::now() });
    }

    fn checkpoint_failed(&mut self, epoch: Epoch, why: &str) {
        tracing::info!(epoch, partition = self.index, "checkpoint abandoned: {why}");
        if let Ok(mut progress) = self.ctx.checkpoints.lock() {
            let entry = progress.entry(epoch).or_default();
            entry.failed = true;
            entry.done += 1;
            if entry.done >= self.ctx.threads.len() {
                progress.remove(&epoch);
            }
        }
        for df in self.dataflows.values() {
            let mut cell = df.rendered.checkpoint.borrow_mut();
            cell.requested = None;
            cell.result = None;
        }
    }

    /// Writes this thread's part of the pending checkpoint once every dataflow's snapshot is in;
    /// the last thread of the process writes `COMPLETE` and tells the supervisor.
    fn poll_checkpoint(&mut self) {
        let Some(pending) = &self.pending_checkpoint else { return };
        let epoch = pending.epoch;
        let mut snapshots = Vec::new();
        let mut problem = None;
        for (name, id) in &pending.dataflows {
            let Some(df) = self.dataflows.get(name).filter(|df| df.rendered.layout.plan.id == *id) else {
                problem = Some(format!("dataflow {name:?} was dropped"));
                break;
            };
            let result = df.rendered.checkpoint.borrow_mut().result.take();
            match result {
                None if pending.started.elapsed() > CHECKPOINT_TIMEOUT => {
                    problem = Some(format!("dataflow {name:?} did not reach epoch {epoch} in time"));
                    break;
                }
                None => {
                    // Not yet: put back what was taken so far.
                    for (name, _, bytes) in snapshots {
                        if let Some(df) = self.dataflows.get(&name) {
                            df.rendered.checkpoint.borrow_mut().result = Some((epoch, Ok(bytes)));
                        }
                    }
                    return;
                }
                Some((e, Ok(bytes))) if e == epoch => snapshots.push((name.clone(), *id, bytes)),
                Some((_, Ok(_))) => {
                    problem = Some(format!("dataflow {name:?} answered another checkpoint"));
                    break;
                }
                Some((_, Err(e))) => {
                    problem = Some(format!("dataflow {name:?}: {e}"));
                    break;
                }
            }
        }
        self.pending_checkpoint = None;
        if let Some(why) = problem {
            self.checkpoint_failed(epoch, &why);
            return;
        }
        // The files are written by a thread of their own, so that the dataflows go on meanwhile.
        let ctx = Arc::clone(&self.ctx);
        let index = self.index;
        let spawned = std::thread::Builder::new().name("sundial:checkpoint".into()).spawn(move || {
            write_checkpoint(&ctx, epoch, index, snapshots);
        });
        if let Err(e) = spawned {
            tracing::warn!(epoch, "cannot start the checkpoint writer: {e}");
            if let Ok(mut progress) = self.ctx.checkpoints.lock() {
                progress.entry(epoch).or_default().failed = true;
            }
        }
    }

    /// Every local thread has replayed its log (so every batch id logged here is known).
    fn all_recovered(&self) -> bool {
        self.recovered && self.ctx.recovered.load(std::sync::atomic::Ordering::SeqCst) >= self.ctx.threads.len()
    }

    /// Sends rows of `source` into the dataflows reading it (only those in `only`, if given).
    fn feed(&mut self, source: &str, rows: Vec<Row>, only: Option<&std::collections::HashSet<u64>>) {
        if rows.is_empty() {
            return;
        }
        let readers: Vec<&mut DataflowRt> = self
            .dataflows
            .values_mut()
            .filter(|df| df.rendered.layout.plan.source.name == source)
            .filter(|df| only.is_none_or(|ids| ids.contains(&df.rendered.layout.plan.id)))
            .collect();
        let batch = Arc::new(rows);
        for df in readers {
            df.rendered.rows.send(Arc::clone(&batch));
        }
    }

    /// Replays this partition's ingest log into the dataflows: each batch goes to the dataflows
    /// that were installed before it (as the log's install marks say), in the log's order, and
    /// its batch id is remembered for retries. Steps the worker every so many events, so that
    /// the dataflows digest the replay as it goes.
    fn recover(&mut self, worker: &mut Worker) {
        let dir = self.log_dir.clone();
        if let Err(e) = &self.log {
            tracing::error!(dir = %dir.display(), "cannot replay the ingest log: {e}");
            return;
        }
        let started = Instant::now();
        let from = self.ctx.restore.as_ref().map_or(0, |r| r.epoch);
        let mut feeding = self.restored.clone();
        let (mut batches, mut events, mut since_step) = (0u64, 0u64, 0usize);
        let result = crate::log::replay(&dir, from, |record| match record {
            Record::Installed { dataflow, .. } => {
                feeding.insert(dataflow);
            }
            Record::Batch { epoch, source, batch, rows, rejected, late } => {
                batches += 1;
                events += rows.len() as u64;
                since_step += rows.len();
                if let Some(id) = batch {
                    let outcome =
                        IngestOutcome { accepted: rows.len() as u64, rejected, late, epoch, errors: Vec::new() };
                    if let Ok(mut b) = self.ctx.batches.lock() {
                        b.done(&id, outcome);
                    }
                }
                if let Some(src) = self.sources.get_mut(&source) {
                    if let Some(max) = rows.iter().map(|r| r.time).max() {
                        src.max_ts = src.max_ts.max(Some(max));
                        src.last_event = Some(Instant::now());
                    }
                }
                self.feed(&source, rows, Some(&feeding));
                if since_step >= 65_536 {
                    since_step = 0;
                    self.tick(true);
                    worker.step();
                }
            }
        });
        match result {
            Ok(problems) => {
                for p in problems {
                    tracing::error!("ingest log replay: {p}");
                }
            }
            Err(e) => tracing::error!(dir = %dir.display(), "ingest log replay failed: {e}"),
        }
        self.tick(true);
        if batches > 0 {
            tracing::info!(
                partition = self.index,
                batches,
                events,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "replayed the ingest log"
            );
        }
    }

    /// Advances every dataflow's inputs to the current wall-clock epoch (at least one past the
    /// current one when `force`), sending this partition's report for the epoch being closed.
    fn tick(&mut self, force: bool) {
        let now = unix_ms();
        let next = if force { now.max(self.epoch + 1) } else { now };
        if next < self.epoch + TICK.as_millis() as u64 && !force {
            return;
        }
        self.advance_to(next);
    }

    /// Advances every dataflow's inputs to `next`, sending this partition's report for the epoch
    /// being closed.
    fn advance_to(&mut self, next: Epoch) {
        for df in self.dataflows.values_mut() {
            let source = self.sources.get(&df.rendered.layout.plan.source.name);
            let report = Report {
                partition: self.index as u32,
                max_ts: source.and_then(|s| s.max_ts),
                idle: source.is_none_or(|s| {
                    let since = s.last_event.unwrap_or(df.installed);
                    since.elapsed() >= Duration::from_millis(s.plan.idle_timeout_ms)
                }),
            };
            df.rendered.reports.send(report);
            df.rendered.rows.advance_to(next);
            df.rendered.reports.advance_to(next);
        }
        self.epoch = next;
    }

    fn after_step(&mut self, ctx: &Context) {
        self.poll_checkpoint();
        // Worker 0: answer sequenced commands once every worker has received them.
        if !self.sequenced.is_empty() {
            let probe = &self.control_probe;
            let counts = &self.check_counts;
            let peers = self.peers;
            let generation = ctx.generation;
            let processes = ctx.processes;
            self.sequenced.retain(|&(seq, id, check)| {
                if probe.less_equal(&seq) {
                    return true;
                }
                let reply = match check {
                    Some(records_per_pair) => {
                        let received = counts.borrow_mut().remove(&id).unwrap_or_else(|| vec![vec![0; peers]; peers]);
                        Reply::Check(CheckReport {
                            generation,
                            processes,
                            threads: peers / processes.max(1),
                            records_per_pair,
                            received,
                        })
                    }
                    None => Reply::Applied { seq: seq + 1 },
                };
                crate::computation::tell(&FromChild::Reply { id, reply });
                false
            });
        }
        let local = self.index % ctx.threads.len().max(1);
        if !self.dropped.is_empty() {
            for name in self.dropped.drain(..) {
                ctx.publish(&name, local, None);
            }
        }
        if Instant::now() >= self.next_gauges {
            self.next_gauges = Instant::now() + GAUGE_INTERVAL;
            let gauges = ThreadGauges {
                sources: self.sources.iter().map(|(name, s)| (name.clone(), (s.watermark, s.max_ts))).collect(),
                dataflows: self.dataflows.iter().map(|(name, df)| (name.clone(), df.rendered.state_size())).collect(),
            };
            if let Ok(mut all) = ctx.gauges.lock() {
                if let Some(slot) = all.get_mut(local) {
                    *slot = gauges;
                }
            }
        }
        // Watermarks agreed in the dataflows are what ingest checks lateness against.
        for df in self.dataflows.values_mut() {
            let name = &df.rendered.layout.plan.source.name;
            let current = df.rendered.watermarks.borrow().current;
            if let Some(source) = self.sources.get_mut(name) {
                source.watermark = source.watermark.max(current);
            }
            // Keep epochs readable for HISTORY after they complete, and the epochs of exports in
            // progress and of reads waiting for theirs; let the rest compact. The compaction
            // frontier never goes back.
            if let Some(complete) = complete_epoch(&df.rendered.probe) {
                let holds = self.holds.entry(df.rendered.layout.plan.name.clone()).or_default();
                let now = Instant::now();
                holds.retain(|(_, until)| *until > now);
                let name = &df.rendered.layout.plan.name;
                // Reads waiting for their epoch to complete hold it readable: under a backlog
                // the newest complete epoch can pass a waiting read's by more than the history.
                let waiting = self.deferred.iter().filter_map(|job| match job {
                    Job::Part { part: PartJob::Read { dataflow, as_of, .. }, .. } if dataflow == name => Some(*as_of),
                    _ => None,
                });
                let held = holds.iter().map(|(e, _)| *e).chain(waiting).min().unwrap_or(u64::MAX);
                let current = df.rendered.trace.get_logical_compaction().iter().next().copied().unwrap_or(0);
                df.completions.record(now, complete);
                let since = df.completions.aged(now).min(held).max(current);
                // Times before `since` may be merged together. While the dataflow keeps up,
                // batches may merge up to what is complete (a read accumulates updates by time,
                // not by batch, and looks through fewer batches when they merge as they come)
                // and the aggregate applies epochs in slices, so that reads wait less. Under a
                // backlog, batches wait until their times compact, so that each merge cancels
                // the history it folds instead of copying every version again, and epochs are
                // applied whole: throughput first.
                let behind = self.epoch.saturating_sub(complete) > BACKLOG_MS;
                let merge_to = if behind { since } else { complete.max(since) };
                df.rendered.catching_up.set(behind);
                df.rendered.trace.set_logical_compaction(Antichain::from_elem(since).borrow());
                df.rendered.trace.set_physical_compaction(Antichain::from_elem(merge_to).borrow());
                df.rendered.watermarks.borrow_mut().compact(since);
                // The view is also this thread's frontier: a read at the newest reported epoch
                // finds a view that covers it.
                if df.published != Some((self.applied, complete, since)) {
                    df.published = Some((self.applied, complete, since));
                    let view = Arc::new(ReadView {
                        applied: self.applied,
                        complete,
                        snapshot: Snapshot::of(&mut df.rendered.trace),
                        watermarks: df.rendered.watermarks.borrow().clone(),
                        layout: Arc::clone(&df.rendered.layout),
                    });
                    ctx.publish(name, local, Some(view));
                }
            }
        }
    }
}

/// Writes one thread's part of the checkpoint at `epoch`; the last thread of the process to
/// finish writes `COMPLETE` and tells the supervisor.
fn write_checkpoint(ctx: &Context, epoch: Epoch, index: usize, snapshots: Vec<(String, u64, Vec<u8>)>) {
    let started = Instant::now();
    let mut failed = false;
    for (name, id, bytes) in &snapshots {
        let path = checkpoint::state_file(&ctx.data_dir, epoch, *id, index);
        if let Err(e) = checkpoint::write(&path, bytes) {
            tracing::warn!(epoch, dataflow = %name, "checkpoint abandoned: writing {}: {e}", path.display());
            failed = true;
            break;
        }
    }
    if !failed {
        let bytes: usize = snapshots.iter().map(|(_, _, b)| b.len()).sum();
        tracing::debug!(
            epoch,
            partition = index,
            bytes,
            write_ms = started.elapsed().as_millis() as u64,
            "checkpoint part written"
        );
    }
    let threads = ctx.threads.len();
    let finished = match ctx.checkpoints.lock() {
        Ok(mut progress) => {
            let entry = progress.entry(epoch).or_default();
            entry.done += 1;
            entry.failed |= failed;
            let finished = entry.done == threads && !entry.failed;
            if entry.done == threads {
                progress.remove(&epoch);
            }
            finished
        }
        Err(_) => false,
    };
    if finished {
        let dataflows = snapshots.iter().map(|(_, id, _)| *id).collect();
        let batches = ctx.batches.lock().map(|b| b.export()).unwrap_or_default();
        let part = ProcessCheckpoint { epoch, threads, dataflows, batches };
        match checkpoint::write_complete(&ctx.data_dir, &part) {
            Ok(()) => crate::computation::tell(&FromChild::Checkpointed { epoch }),
            Err(e) => tracing::warn!(epoch, "cannot complete the checkpoint: {e}"),
        }
    }
}

/// Opens a partition's log, reporting a cut tail.
fn open_log(dir: &std::path::Path, fsync: Fsync) -> Result<Log, String> {
    match Log::open(dir, fsync) {
        Ok((log, cut)) => {
            if let Some(cut) = cut {
                tracing::warn!("ingest log: {cut}");
            }
            Ok(log)
        }
        Err(e) => {
            tracing::error!("{e}");
            Err(e.to_string())
        }
    }
}

fn unknown_dataflow(name: &str) -> Reply {
    Reply::Error { message: format!("unknown dataflow {name:?}") }
}

/// The newest epoch through which the probe's dataflow is complete.
fn complete_epoch(probe: &ProbeHandle<Epoch>) -> Option<Epoch> {
    probe.with_frontier(|f| match f.iter().next() {
        Some(&t) => t.checked_sub(1),
        None => Some(u64::MAX),
    })
}

fn read(df: &mut DataflowRt, as_of: Epoch, keys: Option<Vec<Key>>, page: Option<&sundial_protocol::Page>) -> Reply {
    let (watermark, now) = {
        let marks = df.rendered.watermarks.borrow();
        (marks.at(as_of), marks.now_at(as_of))
    };
    let layout = Arc::clone(&df.rendered.layout);
    let mut results = Vec::new();
    let mut more_keys = false;
    let outcome = match keys {
        Some(keys) => {
            read_keys(&Snapshot::of(&mut df.rendered.trace), &layout, keys, as_of, (watermark, now), &mut results)
        }
        None => {
            let (start, limit) = match page {
                Some(p) => (p.start_after.as_ref(), p.limit as usize),
                None => (None, usize::MAX),
            };
            read_from(&mut df.rendered.trace, as_of, start, limit, PAGE_SLOTS, |key, slots| {
                results.push(KeyResult { key: key.clone(), features: assemble(&layout, &slots, watermark, now) });
            })
            .map(|more| {
                more_keys = more;
            })
        }
    };
    match outcome {
        Ok(()) => Reply::Read { watermark, results, more: more_keys },
        Err(e) => Reply::Error { message: e.to_string() },
    }
}

/// A row as the JSON object it came from (for the late-event log).
fn row_json(source: &SourcePlan, row: &Row) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        source.fields.iter().zip(row.values.iter()).map(|(f, d)| (f.name.clone(), d.to_json())).collect();
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_stay_readable_for_the_history_after_they_complete() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c = Completions::default();
        c.record(at(0), 100);
        assert_eq!(c.aged(at(0)), 0, "nothing is old enough yet");
        // A backlog: epoch 100 completes, then the dataflow catches up to 5,000 a second later.
        c.record(at(1_000), 5_000);
        c.record(at(1_005), 5_004);
        assert_eq!(c.aged(at(4_999)), 0);
        assert_eq!(c.aged(at(5_000)), 100, "epoch 100 completed 5 s ago");
        c.record(at(6_000), 9_000);
        // Epoch 5,004 (recorded with 5,000, 5 ms apart) completed 5 s ago; 9,000 just now.
        assert_eq!(c.aged(at(6_000)), 5_004);
        assert_eq!(c.0.len(), 2, "entries older than the newest aged one are dropped");
        // An epoch from an ingest reply at 7,000 completed at 6,000: still readable at 10,999.
        c.record(at(10_999), 9_000);
        assert!(c.aged(at(10_999)) < 7_000);
        assert!(c.aged(at(11_000)) >= 9_000);
    }
}
