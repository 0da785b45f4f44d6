//! The trace of the features arrangement: differential's batches, merged off the worker thread.
//!
//! Differential's `Spine` merges its batches on the worker thread, in fueled pieces whose fuel
//! counts the updates a merge *writes*. The features arrangement retracts each slot's previous
//! accumulators when it changes, so its merges mostly cancel history: they read far more than they
//! write and a piece runs long on little fuel (4 ms on average, up to 30 ms, about one per ingest
//! batch under 100k events/s). Reads and epoch advances queued on the worker thread waited for
//! them, and merges were the largest single cost of an end-to-end ingest.
//!
//! [`BgSpine`] keeps the same batches (`OrdValBatch`, behind an `Arc`: [`Shared`]) in a list,
//! oldest first, and merges [`FAN_IN`] neighbours of one size class at once ([`MergeMany`]), so
//! that each update is copied about `log_8` rather than `log_2` times. A merge of more than a
//! few thousand updates runs on a merge thread (threads are kept a while for the next merge);
//! until its result comes in, readers see its inputs, which hold the same updates. The result is
//! swapped in the next time the trace is touched (each insertion, each compaction request, each
//! read), and the inputs are dropped on a merge thread too. Nothing waits for a merge unless the
//! merge threads fall so far behind that a read would go through more than [`MAX_PIECES`]
//! batches: then the worker thread (never a read) waits for the smallest merge in flight.
//!
//! As in differential's spine, only batches the physical compaction frontier has passed are
//! merged (readers may still ask for a cut at any later frontier), and a merge advances times to
//! the logical compaction frontier at its start.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use differential_dataflow::lattice::Lattice;
use differential_dataflow::trace::cursor::{Cursor, Navigable};
use differential_dataflow::trace::implementations::ord_neu::layers::UpdsBuilder;
use differential_dataflow::trace::implementations::ord_neu::val_batch::OrdValStorage;
use differential_dataflow::trace::implementations::ord_neu::{OrdValBatch, Upds, Vals};
use differential_dataflow::trace::implementations::spine_fueled::{Merger, SpineBatch};
use differential_dataflow::trace::implementations::{BatchContainer, Layout};
use differential_dataflow::trace::{Description, ExertionLogic, Span, Trace, TraceReader};
use timely::order::PartialOrder;
use timely::progress::{frontier::AntichainRef, Antichain, Timestamp};

/// Merges of fewer updates than this run on the worker thread: handing them to a merge thread
/// would cost about as much.
pub const INLINE_MERGE_UPDATES: usize = 4096;

/// With more batches than this to read through (the inputs of a merge in flight count one each),
/// the worker thread waits for merges in flight rather than let reads seek through ever more
/// batches. Twice what the list holds at its fullest in an end-to-end ingest: up to seven
/// pieces per size class, and eight inputs per merge in flight, make about 60 at two million
/// updates per thread.
pub const MAX_PIECES: usize = 128;

/// How many neighbouring batches of one size class merge into one: each update is copied about
/// `log_8` times over its life instead of `log_2` with pairwise merges (merges were the largest
/// cost of an end-to-end ingest), for at most seven batches per size class to read through.
/// (Eight took the merge threads' share of an end-to-end ingest from about 9% of the machine to
/// about 4.5%, against four.)
pub const FAN_IN: usize = 8;

/// A batch shared between the worker thread and the merges running off it.
pub struct Shared<B>(Arc<B>);

impl<B> Clone for Shared<B> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<B> Shared<B> {
    /// Whether this is the only reference to the batch.
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self.0) == 1
    }
}

impl<B> Deref for Shared<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.0
    }
}

impl<B> From<B> for Shared<B> {
    fn from(batch: B) -> Self {
        Shared(Arc::new(batch))
    }
}

type SpanOf<B> = Span<<B as SpineBatch>::Time, Shared<B>>;

/// The updates a span holds.
fn updates<B: SpineBatch>(span: &SpanOf<B>) -> usize {
    span.inner.as_ref().map_or(0, |b| b.len())
}

/// One element of the list: a span, or neighbouring spans being merged into one.
enum Piece<B: SpineBatch> {
    Ready(SpanOf<B>),
    Merging(Box<InFlight<B>>),
}

/// A merge queued for, or running on, a merge thread.
struct InFlight<B: SpineBatch> {
    /// The neighbouring spans merged, oldest first; each has a batch (spans without updates are
    /// fused at once).
    inputs: Vec<SpanOf<B>>,
    /// The merged span's description.
    desc: Description<B::Time>,
    /// The merged batch (`None`: everything cancelled).
    result: Receiver<Option<B>>,
}

impl<B: SpineBatch> InFlight<B> {
    fn batches(&self) -> Vec<Shared<B>> {
        self.inputs.iter().filter_map(|s| s.inner.clone()).collect()
    }

    fn updates(&self) -> usize {
        self.inputs.iter().map(updates).sum()
    }
}

impl<B: SpineBatch> Piece<B> {
    fn spans(&self, mut f: impl FnMut(&SpanOf<B>)) {
        match self {
            Piece::Ready(span) => f(span),
            Piece::Merging(m) => m.inputs.iter().for_each(f),
        }
    }
}

/// Merges neighbouring batches at once (oldest first), advancing times to `frontier`: two with
/// differential's merger, more with [`MergeMany`].
fn merge_all<B: MergeMany>(batches: &[Shared<B>], frontier: AntichainRef<B::Time>) -> Option<B> {
    match batches {
        [] => None,
        [b1, b2] => {
            let mut merger = B::Merger::new(b1, b2, frontier);
            let mut fuel = isize::MAX;
            merger.work(b1, b2, &mut fuel);
            merger.done()
        }
        many => {
            let refs: Vec<&B> = many.iter().map(|b| &**b).collect();
            B::merge_many(&refs, frontier)
        }
    }
}

/// A trace that merges its batches off the worker thread (see the module's documentation).
pub struct BgSpine<B: SpineBatch> {
    logical: Antichain<B::Time>,
    physical: Antichain<B::Time>,
    /// The upper bound of everything inserted.
    upper: Antichain<B::Time>,
    /// Spans the physical frontier has passed, oldest first, contiguous.
    pieces: Vec<Piece<B>>,
    /// Spans not yet passed by the physical frontier (not to be merged), after `pieces`.
    pending: VecDeque<SpanOf<B>>,
    /// Merges of fewer updates run inline.
    inline_updates: usize,
    /// Past this many pieces, wait for merges in flight.
    max_pieces: usize,
    /// How many neighbours of one size class merge into one.
    fan_in: usize,
    /// Merges started on a thread of their own, and inline, since the trace was made.
    started: (u64, u64),
}

impl<B> BgSpine<B>
where
    B: MergeMany + Send + Sync + 'static,
    B::Time: Send + Sync,
{
    /// An empty trace with the given limits (see [`INLINE_MERGE_UPDATES`], [`MAX_PIECES`],
    /// [`FAN_IN`]).
    pub fn with_limits(inline_updates: usize, max_pieces: usize, fan_in: usize) -> Self {
        let minimum = || Antichain::from_elem(<B::Time as Timestamp>::minimum());
        BgSpine {
            logical: minimum(),
            physical: minimum(),
            upper: minimum(),
            pieces: Vec::new(),
            pending: VecDeque::new(),
            inline_updates,
            max_pieces: max_pieces.max(2),
            fan_in: fan_in.max(2),
            started: (0, 0),
        }
    }

    /// The merges started so far: (on a thread of their own, inline).
    pub fn merges_started(&self) -> (u64, u64) {
        self.started
    }

    /// The merges running now.
    pub fn merges_in_flight(&self) -> usize {
        self.pieces.iter().filter(|p| matches!(p, Piece::Merging(_))).count()
    }

    /// The spans and merges the physical frontier has passed.
    pub fn pieces(&self) -> usize {
        self.pieces.len()
    }

    /// Waits for every merge in flight and takes its result.
    pub fn finish_merges(&mut self) {
        while let Some(i) = self.pieces.iter().position(|p| matches!(p, Piece::Merging(_))) {
            self.wait_for(i);
        }
    }

    /// Takes the results of merges that are done, moves spans the physical frontier has passed
    /// into the list, and starts the merges the list's sizes call for; with `may_wait`, waits
    /// for merges in flight while the list is longer than `max_pieces` batches.
    fn maintain(&mut self, may_wait: bool) {
        for i in 0..self.pieces.len() {
            let done = match &self.pieces[i] {
                Piece::Merging(m) => match m.result.try_recv() {
                    Ok(merged) => Some(merged),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(Self::merge_lost(m)),
                },
                Piece::Ready(_) => None,
            };
            if let Some(merged) = done {
                self.install(i, merged);
            }
        }
        while self.pending.front().is_some_and(|s| PartialOrder::less_equal(s.upper(), &self.physical)) {
            if let Some(span) = self.pending.pop_front() {
                self.pieces.push(Piece::Ready(span));
            }
        }
        self.start_merges();
        // Reads never wait here: only the worker thread's insertions and compaction requests.
        while may_wait && self.batches() > self.max_pieces {
            // The smallest merge in flight is likely the first done.
            let smallest = (0..self.pieces.len())
                .filter_map(|i| match &self.pieces[i] {
                    Piece::Merging(m) => Some((m.updates(), i)),
                    Piece::Ready(_) => None,
                })
                .min();
            let Some((_, i)) = smallest else { break };
            self.wait_for(i);
            self.start_merges();
        }
    }

    /// The batches a read goes through: one per piece, each input of a merge in flight.
    fn batches(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Ready(_) => 1,
                Piece::Merging(m) => m.inputs.len(),
            })
            .sum()
    }

    /// A merge whose thread ended without an answer (it panicked): merged here instead. (A merge
    /// that panics for its inputs will panic here too, ending the computation, which the
    /// supervisor then restarts from its checkpoint and log.)
    fn merge_lost(m: &InFlight<B>) -> Option<B> {
        tracing::error!("a merge thread ended without its result; merging on the worker thread");
        merge_all::<B>(&m.batches(), m.desc.since().borrow())
    }

    /// Blocks until the merge at `i` is done and takes its result.
    fn wait_for(&mut self, i: usize) {
        let merged = match &self.pieces[i] {
            Piece::Merging(m) => loop {
                match m.result.recv_timeout(Duration::from_millis(100)) {
                    Ok(merged) => break merged,
                    // Still queued or running: make sure a thread (or this one) will run it.
                    Err(RecvTimeoutError::Timeout) => drive_queue(),
                    Err(RecvTimeoutError::Disconnected) => break Self::merge_lost(m),
                }
            },
            Piece::Ready(_) => return,
        };
        self.install(i, merged);
    }

    /// Replaces the merge at `i` by its result.
    fn install(&mut self, i: usize, merged: Option<B>) {
        let Piece::Merging(m) = &self.pieces[i] else { return };
        let ready = Piece::Ready(Span::new(m.desc.clone(), merged.map(Shared::from)));
        let inputs = std::mem::replace(&mut self.pieces[i], ready);
        // The inputs are usually freed with this last reference to them: on a merge thread, so
        // that the worker thread does not spend its time dropping every update of them (if no
        // thread can be had, they are dropped here).
        drop_off_thread(inputs);
    }

    /// Fuses spans without updates into a neighbour, and merges neighbours whose sizes call for
    /// it. Each piece has a size class: its updates rounded up to a power of `fan_in`. Oldest
    /// first, classes do not grow; `fan_in` neighbours of one class merge into one (of the next
    /// class, unless updates cancelled), so that each update is copied about `log_fan_in` times
    /// over its life and the list holds fewer than `fan_in` pieces per class (plus merges in
    /// flight). A piece larger than its older neighbour's class merges with it.
    fn start_merges(&mut self) {
        let mut i = 0;
        while i < self.pieces.len() {
            let Some(take) = self.merge_at(i) else {
                i += 1;
                continue;
            };
            let inputs: Vec<SpanOf<B>> = self
                .pieces
                .drain(i..i + take)
                .map(|p| match p {
                    Piece::Ready(span) => span,
                    Piece::Merging(_) => unreachable!("merge_at picks ready pieces only"),
                })
                .collect();
            let merged = self.begin_merge(inputs);
            self.pieces.insert(i, merged);
            // The piece at `i` may now merge with the one before it (when it is done).
            i = i.saturating_sub(1);
        }
    }

    /// How many pieces from `i` on to merge now, if any.
    fn merge_at(&self, i: usize) -> Option<usize> {
        let ready = |j: usize| match self.pieces.get(j) {
            Some(Piece::Ready(span)) => Some(updates(span)),
            _ => None,
        };
        let first = ready(i)?;
        let next = ready(i + 1)?;
        if first == 0 || next == 0 {
            return Some(2);
        }
        let class = |n: usize| self.class(n);
        if class(next) > class(first) {
            return Some(2);
        }
        let run = (i..i + self.fan_in).take_while(|&j| ready(j).is_some_and(|n| n > 0 && class(n) == class(first)));
        (run.count() == self.fan_in).then_some(self.fan_in)
    }

    /// The size class of a piece of `n` updates: `n` rounded up to a power of `fan_in` (itself
    /// rounded up to a power of two).
    fn class(&self, n: usize) -> u32 {
        let bits = n.next_power_of_two().trailing_zeros();
        let per_class = self.fan_in.next_power_of_two().trailing_zeros().max(1);
        bits.div_ceil(per_class)
    }

    /// Merges neighbouring spans (oldest first): at once when at most one has updates or all
    /// are small, otherwise on a merge thread.
    fn begin_merge(&mut self, inputs: Vec<SpanOf<B>>) -> Piece<B> {
        let (Some(first), Some(last)) = (inputs.first(), inputs.last()) else {
            unreachable!("merges take two spans or more")
        };
        let mut since = self.logical.clone();
        for span in &inputs {
            since = since.join(span.desc.since());
        }
        let desc = Description::new(first.lower().clone(), last.upper().clone(), since);
        let batches: Vec<Shared<B>> = inputs.iter().filter_map(|s| s.inner.clone()).collect();
        if batches.len() <= 1 {
            // Nothing to merge: the span with updates keeps them as they are.
            return Piece::Ready(Span::new(desc, batches.into_iter().next()));
        }
        if batches.iter().map(|b| b.len()).sum::<usize>() >= self.inline_updates {
            let (tx, rx) = mpsc::channel();
            let frontier = desc.since().clone();
            let sources = batches.clone();
            let merge = move || {
                // The receiver is gone when the trace was dropped meanwhile: nothing to tell.
                let _ = tx.send(merge_all::<B>(&sources, frontier.borrow()));
            };
            match run_off_thread(Box::new(merge)) {
                Ok(()) => {
                    self.started.0 += 1;
                    return Piece::Merging(Box::new(InFlight { inputs, desc, result: rx }));
                }
                Err((e, _)) => tracing::warn!(error = %e, "cannot start a merge thread; merging on the worker thread"),
            }
        }
        self.started.1 += 1;
        let merged = merge_all::<B>(&batches, desc.since().borrow());
        Piece::Ready(Span::new(desc, merged.map(Shared::from)))
    }
}

/// Batches that can be merged several at once.
pub trait MergeMany: SpineBatch {
    /// Merges `batches`, neighbours oldest first, advancing times to `frontier` and dropping
    /// what cancels (`None`: everything did).
    fn merge_many(batches: &[&Self], frontier: AntichainRef<Self::Time>) -> Option<Self>;
}

impl<L: Layout> MergeMany for OrdValBatch<L> {
    fn merge_many(batches: &[&Self], frontier: AntichainRef<Self::Time>) -> Option<Self> {
        let sources: Vec<&OrdValStorage<L>> = batches.iter().map(|b| &b.storage).collect();
        let keys = sources.iter().map(|s| s.keys.len()).sum::<usize>();
        let vals = sources.iter().map(|s| s.vals.vals.len()).sum::<usize>();
        let upds = sources.iter().map(|s| s.upds.times.len()).sum::<usize>();
        let mut result = OrdValStorage::<L> {
            keys: L::KeyContainer::with_capacity(keys),
            vals: Vals::with_capacity(keys + 1, vals),
            upds: Upds::with_capacity(vals + 1, upds),
        };
        let mut staging = UpdsBuilder::<L::TimeContainer, L::DiffContainer>::default();
        // Each source's next key, and (for the sources at the current key) next value.
        let mut key_at = vec![0usize; sources.len()];
        let mut at_key: Vec<usize> = Vec::with_capacity(sources.len());
        let mut val_at: Vec<(usize, usize)> = Vec::with_capacity(sources.len());
        let mut at_val: Vec<usize> = Vec::with_capacity(sources.len());
        loop {
            // The smallest next key, and the sources that have it.
            let next_keys = sources.iter().enumerate().filter_map(|(s, source)| Some((s, source.keys.get(key_at[s])?)));
            let Some(key) = smallest(next_keys, &mut at_key) else { break };
            // Its values, merged the same way.
            val_at.clear();
            val_at.extend(at_key.iter().map(|&s| sources[s].vals.bounds(key_at[s])));
            let values_before = result.vals.vals.len();
            loop {
                let next_vals = val_at
                    .iter()
                    .enumerate()
                    .filter(|(_, (lower, upper))| lower < upper)
                    .map(|(i, &(lower, _))| (i, sources[at_key[i]].vals.get_abs(lower)));
                let Some(val) = smallest(next_vals, &mut at_val) else { break };
                for &i in &at_val {
                    let source = sources[at_key[i]];
                    let (lower, upper) = source.upds.bounds(val_at[i].0);
                    for u in lower..upper {
                        let (time, diff) = source.upds.get_abs(u);
                        let mut time = L::TimeContainer::into_owned(time);
                        time.advance_by(frontier);
                        staging.push(time, L::DiffContainer::into_owned(diff));
                    }
                    val_at[i].0 += 1;
                }
                if staging.seal(&mut result.upds) {
                    result.vals.vals.push_ref(val);
                }
            }
            if result.vals.vals.len() > values_before {
                result.keys.push_ref(key);
                result.vals.offs.push_ref(result.vals.vals.len());
            }
            for &s in &at_key {
                key_at[s] += 1;
            }
        }
        let updates = staging.total();
        (updates > 0).then_some(OrdValBatch { storage: result, updates })
    }
}

/// The smallest of `items` (each with its position), and in `at` the positions that hold it.
fn smallest<T: Ord + Copy>(items: impl Iterator<Item = (usize, T)>, at: &mut Vec<usize>) -> Option<T> {
    at.clear();
    let mut min: Option<T> = None;
    for (i, item) in items {
        match min.map(|m| item.cmp(&m)) {
            Some(std::cmp::Ordering::Greater) => {}
            Some(std::cmp::Ordering::Equal) => at.push(i),
            _ => {
                min = Some(item);
                at.clear();
                at.push(i);
            }
        }
    }
    min
}

/// A merge to run off the worker thread.
type Job = Box<dyn FnOnce() + Send>;

/// The merge threads of this process: a queue of merges, and threads that take them. A thread
/// waits a while for the next merge before it ends: its allocator keeps the memory it freed, so
/// it does not fault in (and zero) fresh pages for every merge, as a new thread does.
struct Pool {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { queue: VecDeque::new(), threads: 0, idle: 0 });
static WORK: Condvar = Condvar::new();

/// How long a merge thread waits for another merge before it ends.
const IDLE_FOR: Duration = Duration::from_secs(10);

fn pool() -> MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// At most this many merge threads per process (merges beyond wait in the queue): twice the
/// cores, so that small merges need not wait for a large one, and no more. (Asked once: the
/// standard library reads the cgroup limits again on every call, and this is asked under the
/// pool's lock.)
fn max_threads() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| 2 * std::thread::available_parallelism().map_or(2, |n| n.get()).max(1))
}

/// Queues `job` for a merge thread, starting one when none is idle and the pool has room.
/// Gives the job back when no thread runs and none can be started.
fn run_off_thread(job: Job) -> Result<(), (std::io::Error, Job)> {
    let mut pool = pool();
    pool.queue.push_back(job);
    match staff(&mut pool) {
        Ok(()) => Ok(()),
        Err(e) => match pool.queue.pop_back() {
            Some(job) => Err((e, job)),
            None => Ok(()),
        },
    }
}

/// Drops `value` on a merge thread (freeing a large batch takes milliseconds, which a thread
/// that answers reads should not spend); here when no merge thread can be started.
pub fn drop_off_thread<T: Send + 'static>(value: T) {
    if let Err((_, job)) = run_off_thread(Box::new(move || drop(value))) {
        job();
    }
}

/// Sees that the queued jobs will be taken: wakes an idle thread while idle threads cover the
/// queue (a woken thread counts as idle until it takes its job), otherwise starts a thread if
/// the pool has room. Fails only when no thread runs and none can be started.
fn staff(pool: &mut Pool) -> std::io::Result<()> {
    if pool.idle >= pool.queue.len() {
        WORK.notify_one();
        return Ok(());
    }
    if pool.threads >= max_threads() {
        return Ok(());
    }
    match spawn_merge_thread(pool) {
        Err(e) if pool.threads == 0 => Err(e),
        // The threads there are will take the jobs.
        _ => Ok(()),
    }
}

/// Makes sure queued jobs get run: starts a thread when jobs wait with none idle; when no
/// thread runs and none can be started, runs them here. (For a worker thread waiting on a
/// merge, which must not wait for ever.)
fn drive_queue() {
    let mut pool = pool();
    if pool.queue.is_empty() || staff(&mut pool).is_ok() {
        return;
    }
    let stranded: Vec<Job> = pool.queue.drain(..).collect();
    drop(pool);
    tracing::warn!(jobs = stranded.len(), "no merge thread can be started; merging on the worker thread");
    stranded.into_iter().for_each(|job| job());
}

fn spawn_merge_thread(pool: &mut Pool) -> std::io::Result<()> {
    std::thread::Builder::new().name("sundial:merge".into()).spawn(merge_thread)?;
    pool.threads += 1;
    Ok(())
}

/// Counts a merge thread out when it ends, also by a panic; then starts another if merges are
/// left waiting with no idle thread to take them.
struct Leaving;

impl Drop for Leaving {
    fn drop(&mut self) {
        let mut pool = pool();
        pool.threads -= 1;
        if !pool.queue.is_empty() {
            if let Err(e) = staff(&mut pool) {
                tracing::error!(error = %e, "cannot start a merge thread; queued merges wait for the next one");
            }
        }
    }
}

fn merge_thread() {
    let _leaving = Leaving;
    crate::priority::run_in_background();
    loop {
        let job = {
            let mut pool = pool();
            loop {
                if let Some(job) = pool.queue.pop_front() {
                    break job;
                }
                pool.idle += 1;
                let (guard, waited) =
                    WORK.wait_timeout(pool, IDLE_FOR).unwrap_or_else(|poisoned| poisoned.into_inner());
                pool = guard;
                pool.idle -= 1;
                if waited.timed_out() && pool.queue.is_empty() {
                    return;
                }
            }
        };
        job();
    }
}

impl<B> TraceReader for BgSpine<B>
where
    B: MergeMany + Send + Sync + 'static,
    B::Time: Send + Sync,
{
    type Time = B::Time;
    type Batch = Shared<B>;

    fn spans_through(&mut self, upper: AntichainRef<B::Time>) -> Option<Vec<SpanOf<B>>> {
        self.maintain(false);
        if upper.less_equal(&<B::Time as Timestamp>::minimum()) {
            return Some(Vec::new());
        }
        // A cut before the physical frontier may fall inside a merged batch.
        if !PartialOrder::less_equal(&self.physical.borrow(), &upper) {
            return None;
        }
        let mut spans = Vec::new();
        for piece in &self.pieces {
            piece.spans(|span| {
                if span.inner.is_some() {
                    spans.push(span.clone());
                }
            });
        }
        for span in &self.pending {
            let through = PartialOrder::less_equal(&span.upper().borrow(), &upper);
            let from = PartialOrder::less_equal(&span.lower().borrow(), &upper);
            if span.inner.is_some() && from && !through && upper != span.lower().borrow() {
                // `upper` cuts through a batch: not a bound this trace ever reported.
                return None;
            }
            if through && span.inner.is_some() {
                spans.push(span.clone());
            }
        }
        Some(spans)
    }

    fn set_logical_compaction(&mut self, frontier: AntichainRef<B::Time>) {
        self.logical = frontier.to_owned();
    }

    fn get_logical_compaction(&mut self) -> AntichainRef<'_, B::Time> {
        self.logical.borrow()
    }

    fn set_physical_compaction(&mut self, frontier: AntichainRef<'_, B::Time>) {
        self.physical = frontier.to_owned();
        self.maintain(true);
    }

    fn get_physical_compaction(&mut self) -> AntichainRef<'_, B::Time> {
        self.physical.borrow()
    }

    fn map_spans<F: FnMut(&SpanOf<B>)>(&self, mut f: F) {
        for piece in &self.pieces {
            piece.spans(&mut f);
        }
        self.pending.iter().for_each(f);
    }
}

impl<B> Trace for BgSpine<B>
where
    B: MergeMany + Send + Sync + 'static,
    B::Time: Send + Sync,
{
    fn new(
        _info: timely::dataflow::operators::generic::OperatorInfo,
        _logging: Option<differential_dataflow::logging::Logger>,
        _activator: Option<timely::scheduling::activate::Activator>,
    ) -> Self {
        Self::with_limits(INLINE_MERGE_UPDATES, MAX_PIECES, FAN_IN)
    }

    /// Takes in finished merges (merges need no fuel here: they run on their own).
    fn exert(&mut self) {
        self.maintain(true);
    }

    /// Ignored: merges run as soon as the sizes call for them, not on fuel.
    fn set_exert_logic(&mut self, _logic: ExertionLogic) {}

    fn insert(&mut self, span: SpanOf<B>) {
        // The arrange operator hands over contiguous, non-empty intervals; anything else is a
        // bug that would make reads wrong.
        assert!(span.lower() != span.upper(), "an empty interval inserted into a trace");
        assert_eq!(span.lower(), &self.upper, "a span inserted out of order into a trace");
        self.upper.clone_from(span.upper());
        self.pending.push_back(span);
        self.maintain(true);
    }

    fn close(&mut self) {
        if !self.upper.is_empty() {
            self.insert(Span::empty(self.upper.clone(), Antichain::new()));
        }
    }
}

impl<B: Navigable> Navigable for Shared<B> {
    type Cursor = SharedCursor<B::Cursor>;
    fn cursor(&self) -> Self::Cursor {
        SharedCursor(self.0.cursor())
    }
}

/// A batch's cursor, over the shared batch.
pub struct SharedCursor<C>(C);

impl<C: Cursor> Cursor for SharedCursor<C> {
    type Storage = Shared<C::Storage>;

    type Key<'a> = C::Key<'a>;
    type ValOwn = C::ValOwn;
    type Val<'a> = C::Val<'a>;
    type Time = C::Time;
    type TimeGat<'a> = C::TimeGat<'a>;
    type Diff = C::Diff;
    type DiffGat<'a> = C::DiffGat<'a>;
    type KeyContainer = C::KeyContainer;
    type ValContainer = C::ValContainer;
    type TimeContainer = C::TimeContainer;
    type DiffContainer = C::DiffContainer;

    fn key_valid(&self, storage: &Self::Storage) -> bool {
        self.0.key_valid(storage)
    }
    fn val_valid(&self, storage: &Self::Storage) -> bool {
        self.0.val_valid(storage)
    }
    fn key<'a>(&self, storage: &'a Self::Storage) -> Self::Key<'a> {
        self.0.key(storage)
    }
    fn val<'a>(&self, storage: &'a Self::Storage) -> Self::Val<'a> {
        self.0.val(storage)
    }
    fn get_key<'a>(&self, storage: &'a Self::Storage) -> Option<Self::Key<'a>> {
        self.0.get_key(storage)
    }
    fn get_val<'a>(&self, storage: &'a Self::Storage) -> Option<Self::Val<'a>> {
        self.0.get_val(storage)
    }
    fn map_times<L: FnMut(Self::TimeGat<'_>, Self::DiffGat<'_>)>(&mut self, storage: &Self::Storage, logic: L) {
        self.0.map_times(storage, logic)
    }
    fn step_key(&mut self, storage: &Self::Storage) {
        self.0.step_key(storage)
    }
    fn seek_key(&mut self, storage: &Self::Storage, key: Self::Key<'_>) {
        self.0.seek_key(storage, key)
    }
    fn step_val(&mut self, storage: &Self::Storage) {
        self.0.step_val(storage)
    }
    fn seek_val(&mut self, storage: &Self::Storage, val: Self::Val<'_>) {
        self.0.seek_val(storage, val)
    }
    fn rewind_keys(&mut self, storage: &Self::Storage) {
        self.0.rewind_keys(storage)
    }
    fn rewind_vals(&mut self, storage: &Self::Storage) {
        self.0.rewind_vals(storage)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use differential_dataflow::trace::cursor::cursor_list;
    use differential_dataflow::trace::implementations::ord_neu::{OrdValBatch, VecOrdValBuilder};
    use differential_dataflow::trace::implementations::Vector;
    use differential_dataflow::trace::Builder;
    use proptest::prelude::*;

    use super::*;

    type Upd = ((u64, u64), u64, isize);
    type Batch = OrdValBatch<Vector<Upd>>;
    type Spine = BgSpine<Batch>;

    /// A span over `[lower, upper)` with `updates` (consolidated here).
    fn span(lower: u64, upper: u64, mut updates: Vec<Upd>) -> SpanOf<Batch> {
        differential_dataflow::consolidation::consolidate_updates(&mut updates);
        let mut builder = VecOrdValBuilder::<u64, u64, u64, isize>::default();
        builder.push(&mut updates);
        let desc = Description::new(Antichain::from_elem(lower), Antichain::from_elem(upper), Antichain::from_elem(0));
        Span::new(desc, builder.done().map(Shared::from))
    }

    /// Every (key, value) with a non-zero count at `as_of`, read through a cursor over all
    /// batches.
    fn read(spine: &mut Spine, as_of: u64) -> BTreeMap<(u64, u64), isize> {
        let batches = spine.batches_through(Antichain::new().borrow()).unwrap_or_default();
        let (mut cursor, storage) = cursor_list(batches);
        let mut out = BTreeMap::new();
        while let Some(k) = cursor.get_key(&storage) {
            while let Some(v) = cursor.get_val(&storage) {
                let mut count = 0;
                cursor.map_times(&storage, |t, r| {
                    if *t <= as_of {
                        count += *r;
                    }
                });
                if count != 0 {
                    out.insert((*k, *v), count);
                }
                cursor.step_val(&storage);
            }
            cursor.step_key(&storage);
        }
        out
    }

    fn total_updates(spine: &Spine) -> usize {
        let mut n = 0;
        spine.map_spans(|s| n += updates(s));
        n
    }

    #[test]
    fn a_large_merge_runs_off_the_worker_thread_and_is_swapped_in() {
        let mut spine = Spine::with_limits(INLINE_MERGE_UPDATES, MAX_PIECES, 2);
        let first: Vec<Upd> = (0..5000).map(|k| ((k, 1), 0, 1)).collect();
        // The second epoch retracts every first value and inserts another.
        let second: Vec<Upd> = (0..5000).flat_map(|k| [((k, 1), 1, -1), ((k, 2), 1, 1)]).collect();
        spine.insert(span(0, 1, first));
        spine.insert(span(1, 2, second));
        assert_eq!(spine.merges_started(), (0, 0), "nothing merges before the physical frontier passes");
        spine.set_logical_compaction(Antichain::from_elem(2).borrow());
        spine.set_physical_compaction(Antichain::from_elem(2).borrow());
        // Started on a thread; its result is only taken when the trace is next touched.
        assert_eq!(spine.merges_started(), (1, 0));
        assert_eq!(spine.merges_in_flight(), 1);
        // Meanwhile readers see both inputs.
        assert_eq!(total_updates(&spine), 15_000);
        let expected: BTreeMap<_, _> = (0..5000).map(|k| ((k, 2), 1)).collect();
        spine.finish_merges();
        assert_eq!(spine.merges_in_flight(), 0);
        assert_eq!(spine.pieces(), 1);
        // Compacted to epoch 2: the first values cancelled away.
        assert_eq!(total_updates(&spine), 5000);
        assert_eq!(read(&mut spine, 2), expected);
    }

    #[test]
    fn small_merges_run_inline_and_empty_spans_fuse() {
        let mut spine = Spine::with_limits(INLINE_MERGE_UPDATES, MAX_PIECES, 2);
        for e in 0..100u64 {
            let updates = if e % 10 == 0 { vec![((e, 0), e, 1)] } else { Vec::new() };
            spine.insert(span(e, e + 1, updates));
            spine.set_physical_compaction(Antichain::from_elem(e + 1).borrow());
        }
        assert_eq!(spine.merges_started().0, 0, "no thread for merges of a few updates");
        assert!(spine.merges_started().1 > 0);
        assert!(spine.pieces() <= 4, "{} pieces", spine.pieces());
        let expected: BTreeMap<_, _> = (0..10).map(|i| ((i * 10, 0), 1)).collect();
        assert_eq!(read(&mut spine, 100), expected);
        // The whole interval is still described, in order.
        let mut upper = Antichain::from_elem(0);
        spine.read_upper(&mut upper);
        assert_eq!(upper, Antichain::from_elem(100));
    }

    #[test]
    fn four_neighbours_of_one_class_merge_into_one() {
        let mut spine = Spine::with_limits(usize::MAX, MAX_PIECES, 4);
        // Four epochs of 10 updates each (one size class); the second retracts five keys of
        // the first, which cancel once compacted.
        let epochs: [Vec<Upd>; 4] = [
            (0..10).map(|k| ((k, 0), 0, 1)).collect(),
            (0..5).map(|k| ((k, 0), 1, -1)).chain((10..15).map(|k| ((k, 0), 1, 1))).collect(),
            (15..25).map(|k| ((k, 0), 2, 1)).collect(),
            (25..35).map(|k| ((k, 0), 3, 1)).collect(),
        ];
        for (e, updates) in epochs.into_iter().enumerate() {
            spine.insert(span(e as u64, e as u64 + 1, updates));
        }
        spine.set_logical_compaction(Antichain::from_elem(4).borrow());
        spine.set_physical_compaction(Antichain::from_elem(4).borrow());
        assert_eq!(spine.pieces(), 1, "four of one class are merged in one go");
        assert_eq!(spine.merges_started(), (0, 1));
        assert_eq!(total_updates(&spine), 30, "the retracted keys cancelled");
        let expected: BTreeMap<_, _> = (5..35).map(|k| ((k, 0), 1)).collect();
        assert_eq!(read(&mut spine, 4), expected);
    }

    #[test]
    fn spans_not_yet_passed_by_the_physical_frontier_stay_apart() {
        let mut spine = Spine::with_limits(0, MAX_PIECES, 2);
        spine.insert(span(0, 1, vec![((1, 1), 0, 1)]));
        spine.insert(span(1, 2, vec![((1, 1), 1, 1)]));
        spine.set_physical_compaction(Antichain::from_elem(1).borrow());
        spine.insert(span(2, 3, vec![((1, 1), 2, 1)]));
        assert_eq!(spine.merges_started(), (0, 0));
        // A cut at 2 takes the first two spans.
        let spans = spine.spans_through(Antichain::from_elem(2).borrow()).unwrap_or_default();
        assert_eq!(spans.len(), 2);
        // A cut before the physical frontier cannot be given.
        spine.set_physical_compaction(Antichain::from_elem(3).borrow());
        assert!(spine.spans_through(Antichain::from_elem(2).borrow()).is_none());
    }

    #[test]
    fn the_merge_threads_run_every_queued_job_and_stay_within_their_number() {
        let (tx, rx) = mpsc::channel();
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for i in 0..64 {
            let (tx, running) = (tx.clone(), Arc::clone(&running));
            let job = Box::new(move || {
                let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                std::thread::sleep(Duration::from_millis(2));
                running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                let _ = tx.send((i, now));
            });
            assert!(run_off_thread(job).is_ok());
        }
        let mut seen: Vec<(usize, usize)> =
            (0..64).filter_map(|_| rx.recv_timeout(Duration::from_secs(30)).ok()).collect();
        seen.sort();
        assert_eq!(seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(), (0..64).collect::<Vec<_>>());
        // Other tests' merges share the pool, so this bounds the jobs of this test only.
        assert!(seen.iter().all(|(_, now)| *now <= max_threads()), "{seen:?}");
    }

    #[test]
    fn queued_jobs_run_side_by_side_while_the_pool_has_room() {
        // Each job waits for the other to have started: they finish only if both run at once.
        let (a_tx, a_rx) = mpsc::channel::<()>();
        let (b_tx, b_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<bool>();
        let done_b = done_tx.clone();
        let first = Box::new(move || {
            let _ = a_tx.send(());
            let _ = done_tx.send(b_rx.recv_timeout(Duration::from_secs(10)).is_ok());
        });
        let second = Box::new(move || {
            let _ = b_tx.send(());
            let _ = done_b.send(a_rx.recv_timeout(Duration::from_secs(10)).is_ok());
        });
        assert!(run_off_thread(first).is_ok());
        assert!(run_off_thread(second).is_ok());
        for _ in 0..2 {
            assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)).ok(), Some(true));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Reads at any epoch the logical frontier still allows equal a model's, while merges
        /// run on threads (any merge of 16+ updates) and frontiers lag behind the inserts.
        #[test]
        fn reads_equal_the_model_while_merges_run(
            epochs in prop::collection::vec(prop::collection::vec((0u64..40, 0u64..4, prop::bool::ANY), 0..300), 1..40),
            physical_lag in 0u64..4,
            logical_lag in 0u64..6,
            max_pieces in 2usize..12,
            fan_in in 2usize..6,
        ) {
            let mut spine = Spine::with_limits(16, max_pieces, fan_in);
            let mut model: Vec<Upd> = Vec::new();
            for (e, changes) in epochs.iter().enumerate() {
                let e = e as u64;
                let updates: Vec<Upd> = changes.iter().map(|&(k, v, up)| ((k, v), e, if up { 1 } else { -1 })).collect();
                model.extend(updates.iter().cloned());
                spine.insert(span(e, e + 1, updates));
                spine.set_physical_compaction(Antichain::from_elem((e + 1).saturating_sub(physical_lag)).borrow());
                let since = (e + 1).saturating_sub(logical_lag);
                spine.set_logical_compaction(Antichain::from_elem(since).borrow());
                // Past the limit only when nothing is in flight (halving sizes, all merged).
                prop_assert!(spine.batches() <= max_pieces.max(2) || spine.merges_in_flight() == 0);
                for as_of in since..=e {
                    let mut expected = BTreeMap::new();
                    for ((k, v), t, r) in &model {
                        if *t <= as_of {
                            *expected.entry((*k, *v)).or_insert(0) += r;
                        }
                    }
                    expected.retain(|_, c| *c != 0);
                    prop_assert_eq!(read(&mut spine, as_of), expected);
                }
            }
        }
    }
}
