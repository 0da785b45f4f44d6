//! A dataflow definition rendered as a timely/differential dataflow.
//!
//! ```text
//! rows (this worker's ingest partition) ──filter, key, project──▶ exchange by key hash ─┐
//! partition reports (max event time, idle) ──▶ broadcast ───────────────────────────────┤
//!                                                                                        ▼
//!                         WindowAggregate: panes / sessions / global, per epoch in order
//!                                                                                        │
//!              ((key, slot), epoch, ±1) ──▶ arrangement by key (pipeline: already sharded)
//! ```
//!
//! Times are *epochs* (wall-clock milliseconds at which a batch entered). The aggregate stashes
//! what arrives for an epoch and applies it only once the frontiers of both inputs have passed
//! that epoch, in epoch order; so the arrangement at epoch `e` reflects exactly the events that
//! entered at epochs `<= e`, and a read at `e` is one consistent snapshot.
//!
//! **Panes.** Features are grouped by the length of their panes: a tumbling window is one pane,
//! a hopping window of size S and hop H is S/H panes of length H. An event updates one pane per
//! group, not S/H windows; a read merges the panes of each window. **Sessions** of one gap share
//! a group; an event that bridges two sessions merges them. **Global** features share a group.
//!
//! **Arrangement.** The operator keeps the live accumulators (the only way to maintain min, max,
//! first, last and distinct under eviction) and, per epoch, emits a replacement for each slot it
//! changed: the old slot retracted, the new one inserted. Differential consolidates them, so the
//! arrangement holds one record per live (key, slot) plus the history since the compaction
//! frontier, and can be read at any epoch in that range.
//!
//! **Watermark.** Every worker reports, per epoch, the largest event time its partition has seen
//! and whether it is idle; the reports are broadcast, so every worker computes the same watermark
//! for every epoch: `max(previous, min over active partitions - allowed_lateness)`. Windows close
//! when the watermark passes their end, and are evicted (retracted) once their end is more than
//! `retention` behind it.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::operators::arrange::arrangement::arrange_core;
use differential_dataflow::operators::arrange::TraceAgent;
use hashbrown::hash_map::EntryRef;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange as ExchangePact, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle, Scope};

use sundial_protocol::plan::{DataflowPlan, FieldType, Window};
use sundial_protocol::value::{Datum, Key};
use sundial_protocol::WindowOut;

use crate::acc::Acc;
use crate::batcher::{epoch_in_order, SlotBatcher};
use crate::eval;
use crate::row::Row;

/// The time of data dataflows: wall-clock milliseconds at which a batch entered.
pub type Epoch = u64;

/// A partition's state, reported every epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The reporting worker.
    pub partition: u32,
    /// The largest event time it has accepted.
    pub max_ts: Option<i64>,
    /// No events for the source's idle timeout (for a partition without events: none since the
    /// dataflow started on it, for that long).
    pub idle: bool,
}

/// An event on its way to the worker that owns its key: the key, the event time, and the values
/// of the fields the features aggregate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ev {
    /// The key (its hash routes the event: computed there, not sent along).
    pub key: Key,
    /// Event time, ms.
    pub time: i64,
    /// One value per input of the layout (inline up to two: no allocation per event).
    pub values: Values,
}

/// One, two or more values: the first two inline, more in a shared block (no allocation for the
/// usual one or two). The variant lives in a spare value of the first element's tag, so it takes
/// two elements' room. Encoded as a sequence, like a `Vec<T>`.
///
/// Three or more are behind an `Arc`, copied on write: a slot's copies (the arrangement's
/// batches, their merges, the values retracted and inserted for a change) share one block
/// instead of allocating, copying and freeing one each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Inline<T> {
    /// One.
    One(T),
    /// Two.
    Two([T; 2]),
    /// Three or more (or none).
    Many(Arc<[T]>),
}

/// The accumulators of one slot, one per feature of its group (a slot is cloned for every
/// change and kept by the arrangement: inline, this saves an allocation per change and a
/// pointer and heap block per retained group). 64 bytes.
pub type Accs = Inline<Acc>;

/// The values of an event's inputs. 48 bytes.
pub type Values = Inline<Datum>;

impl<T> Default for Inline<T> {
    fn default() -> Inline<T> {
        Inline::Many(Arc::new([]))
    }
}

impl<T> std::ops::Deref for Inline<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Inline::One(a) => std::slice::from_ref(a),
            Inline::Two(both) => both,
            Inline::Many(all) => all,
        }
    }
}

impl<T: Clone> std::ops::DerefMut for Inline<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Inline::One(a) => std::slice::from_mut(a),
            Inline::Two(both) => both,
            // Copied first if another holder shares the block.
            Inline::Many(all) => Arc::make_mut(all),
        }
    }
}

impl<T> FromIterator<T> for Inline<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Inline<T> {
        let mut it = iter.into_iter();
        match (it.next(), it.next()) {
            (Some(a), None) => Inline::One(a),
            (Some(a), Some(b)) => match it.next() {
                None => Inline::Two([a, b]),
                Some(c) => {
                    let mut all = vec![a, b, c];
                    all.extend(it);
                    Inline::Many(all.into())
                }
            },
            _ => Inline::default(),
        }
    }
}

impl<T: Serialize> Serialize for Inline<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Inline<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Inline<T>, D::Error> {
        /// Reads a sequence into place: no vector for the usual one or two (events crossing
        /// processes are decoded here, one by one).
        struct Seq<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Seq<T> {
            type Value = Inline<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Inline<T>, A::Error> {
                // Collected as any iterator is (`FromIterator`), stopping at the first error.
                let mut error = None;
                let all = std::iter::from_fn(|| {
                    seq.next_element().unwrap_or_else(|e| {
                        error = Some(e);
                        None
                    })
                })
                .collect();
                error.map_or(Ok(all), Err)
            }
        }
        deserializer.deserialize_seq(Seq(std::marker::PhantomData))
    }
}

/// A maintained partial aggregate: one pane, session or global group of one key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slot {
    /// The group (index into [`Layout::groups`]).
    pub group: u32,
    /// Start of the pane or session (`i64::MIN` for the global group).
    pub start: i64,
    /// End (exclusive) of the pane, or of the session (last event + gap).
    pub end: i64,
    /// One accumulator per feature of the group.
    pub accs: Accs,
}

/// How a group's slots are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// Aligned panes of this length.
    Pane(u64),
    /// Sessions with this gap.
    Session(u64),
    /// One slot per key.
    Global,
}

/// Features sharing a slot structure.
#[derive(Clone, Debug)]
pub struct Group {
    /// How slots are formed.
    pub kind: GroupKind,
    /// The features, as indices into the plan's features.
    pub features: Vec<usize>,
    /// For each feature of the group, its input (index into [`Ev::values`]), if it has a field.
    pub inputs: Vec<Option<usize>>,
    /// How long after a slot's start the last window using it ends (pane groups), or 0.
    pub span_ms: u64,
}

/// The static shape of a rendered dataflow: which fields are projected and how features group.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The plan.
    pub plan: DataflowPlan,
    /// Source field index of each projected input.
    pub inputs: Vec<usize>,
    /// The groups.
    pub groups: Vec<Group>,
}

impl Layout {
    /// Groups the features of `plan`.
    pub fn new(plan: DataflowPlan) -> Layout {
        let mut inputs: Vec<usize> = Vec::new();
        let mut groups: Vec<Group> = Vec::new();
        for (i, f) in plan.features.iter().enumerate() {
            let input = f.field.map(|field| match inputs.iter().position(|&x| x == field) {
                Some(p) => p,
                None => {
                    inputs.push(field);
                    inputs.len() - 1
                }
            });
            let kind = match f.window {
                Window::Tumbling { size_ms } => GroupKind::Pane(size_ms),
                Window::Hopping { hop_ms, .. } => GroupKind::Pane(hop_ms),
                Window::Sliding { tile_ms, .. } => GroupKind::Pane(tile_ms),
                Window::Cumulate { step_ms, .. } => GroupKind::Pane(step_ms),
                Window::Session { gap_ms } => GroupKind::Session(gap_ms),
                Window::Global => GroupKind::Global,
            };
            let span = match f.window {
                Window::Tumbling { size_ms } | Window::Hopping { size_ms, .. } | Window::Sliding { size_ms, .. } => {
                    size_ms
                }
                Window::Cumulate { max_ms, .. } => max_ms,
                _ => 0,
            };
            match groups.iter_mut().find(|g| g.kind == kind) {
                Some(g) => {
                    g.features.push(i);
                    g.inputs.push(input);
                    g.span_ms = g.span_ms.max(span);
                }
                None => groups.push(Group { kind, features: vec![i], inputs: vec![input], span_ms: span }),
            }
        }
        Layout { plan, inputs, groups }
    }

    fn empty_accs(&self, group: &Group) -> Accs {
        let source = &self.plan.source;
        group
            .features
            .iter()
            .map(|&f| {
                let feature = &self.plan.features[f];
                Acc::with_params(feature.agg, feature.field.map(|i| source.fields[i].ty), &feature.params)
            })
            .collect()
    }

    /// Prepares a row for aggregation; `None` when the filter rejects it or a key field is null.
    pub fn prepare(&self, row: &Row) -> Option<Ev> {
        if let Some(filter) = &self.plan.filter {
            if !eval::matches(filter, row) {
                return None;
            }
        }
        let key = match self.plan.key.as_slice() {
            [one] => Key::One(row.values[*one].clone()),
            many => Key::Many(many.iter().map(|&i| row.values[i].clone()).collect()),
        };
        if key.parts().contains(&Datum::Null) {
            return None;
        }
        // Built in place for the usual one or two inputs (no collecting through an iterator).
        let values = match self.inputs.as_slice() {
            [a] => Values::One(row.values[*a].clone()),
            [a, b] => Values::Two([row.values[*a].clone(), row.values[*b].clone()]),
            many => Values::Many(many.iter().map(|&i| row.values[i].clone()).collect()),
        };
        Some(Ev { key, time: row.time, values })
    }

    /// The types of the key fields.
    pub fn key_types(&self) -> Vec<FieldType> {
        self.plan.key.iter().map(|&i| self.plan.source.fields[i].ty).collect()
    }
}

/// A batch of rows of one source, shared by the dataflows that read it.
pub type RowBatch = Arc<Vec<Row>>;

/// The arrangement a dataflow maintains: key → slots, at epochs (differential's batches, merged
/// off the worker thread: [`crate::spine`]).
pub type SlotSpine = crate::spine::BgSpine<SlotBatch>;
/// One batch of it.
pub type SlotBatch = differential_dataflow::trace::implementations::ord_neu::OrdValBatch<
    differential_dataflow::trace::implementations::Vector<((Key, Slot), Epoch, isize)>,
>;
/// A handle on it.
pub type SlotTrace = TraceAgent<SlotSpine>;

/// The watermark, and the source's largest event time ("now" of sliding windows), of each
/// completed epoch (on this worker; every worker computes the same).
#[derive(Clone, Debug, Default)]
pub struct Watermarks {
    /// Epoch → watermark in force after it, for epochs where it changed.
    pub history: BTreeMap<Epoch, i64>,
    /// The newest.
    pub current: Option<i64>,
    /// Epoch → the largest event time any partition reported, for epochs where it changed.
    pub latest: BTreeMap<Epoch, i64>,
    /// The newest of those.
    pub latest_current: Option<i64>,
}

impl Watermarks {
    /// The watermark in force at `epoch`.
    pub fn at(&self, epoch: Epoch) -> Option<i64> {
        self.history.range(..=epoch).next_back().map(|(_, w)| *w)
    }

    /// The source's largest event time at `epoch`.
    pub fn now_at(&self, epoch: Epoch) -> Option<i64> {
        self.latest.range(..=epoch).next_back().map(|(_, t)| *t)
    }

    /// Forgets history before `epoch` (keeping the values in force at it).
    pub fn compact(&mut self, epoch: Epoch) {
        if let Some(w) = self.at(epoch) {
            self.history = self.history.split_off(&epoch);
            self.history.entry(epoch).or_insert(w);
        }
        if let Some(t) = self.now_at(epoch) {
            self.latest = self.latest.split_off(&epoch);
            self.latest.entry(epoch).or_insert(t);
        }
    }
}

/// Counters a dataflow keeps about itself.
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    /// Live slots in the aggregate's state.
    pub live_slots: u64,
    /// Events that reached a pane group after the pane was evicted by retention (counted once
    /// per group; dropped there: no read shows an evicted window).
    pub reopened: u64,
    /// Of the live slots, those the aggregate holds in memory (the others, in closed panes, only
    /// the arrangement holds).
    pub hot_slots: u64,
    /// Slots of closed panes read back from the arrangement because an event reached them.
    pub read_back: u64,
}

/// What a rendered dataflow gives the worker.
pub struct Rendered {
    /// Rows of this worker's ingest partition, in batches shared by every dataflow that reads
    /// the source (each gets the batch, not a copy of its rows).
    pub rows: InputHandle<Epoch, CapacityContainerBuilder<Vec<RowBatch>>>,
    /// This partition's reports.
    pub reports: InputHandle<Epoch, CapacityContainerBuilder<Vec<Report>>>,
    /// The maintained arrangement.
    pub trace: SlotTrace,
    /// Passed an epoch once the arrangement is complete through it.
    pub probe: ProbeHandle<Epoch>,
    /// Watermarks by epoch.
    pub watermarks: Rc<RefCell<Watermarks>>,
    /// Counters.
    pub stats: Rc<Cell<Stats>>,
    /// The layout.
    pub layout: Arc<Layout>,
    /// Checkpoint requests and their snapshots.
    pub checkpoint: Rc<RefCell<CheckpointCell>>,
    /// Set by whoever feeds the dataflow while it is behind its input: the aggregate then
    /// applies whole epochs instead of slices (throughput before the latency of reads).
    pub catching_up: Rc<Cell<bool>>,
}

/// The size of a rendered dataflow's state on one worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateSize {
    /// Live slots in the aggregate's state.
    pub live_slots: u64,
    /// Updates held by the arrangement's batches.
    pub arrangement_updates: u64,
    /// Bytes of the arrangement and of the slots the aggregate holds in memory, at the
    /// in-memory sizes of their types (keys' heap parts not counted).
    pub bytes: u64,
}

impl Rendered {
    /// The size of this dataflow's state on this worker: the arrangement's own batch lengths and
    /// the aggregate's live slots, each at the in-memory size of one record. Cheap (it walks the
    /// batch list, not the data), so it can run every second.
    pub fn state_size(&self) -> StateSize {
        use differential_dataflow::trace::implementations::spine_fueled::SpineBatch;
        use differential_dataflow::trace::TraceReader;
        let mut updates = 0u64;
        self.trace.map_spans(|span| updates += span.inner.as_ref().map_or(0, |b| b.len() as u64));
        let stats = self.stats.get();
        let (live_slots, hot_slots) = (stats.live_slots, stats.hot_slots);
        let groups = self.layout.groups.len().max(1);
        let features: usize = self.layout.groups.iter().map(|g| g.features.len()).sum();
        let accs = (features.div_ceil(groups) * std::mem::size_of::<Acc>()) as u64;
        let update = (std::mem::size_of::<(Key, Slot, Epoch, isize)>() as u64) + accs;
        // A hash-map entry: key, accumulators' vector, flag, and one control byte.
        let slot = (std::mem::size_of::<(Key, Live)>() as u64) + 1 + accs;
        StateSize { live_slots, arrangement_updates: updates, bytes: updates * update + hot_slots * slot }
    }
}

/// A checkpoint request to a dataflow's aggregate, and its answer.
#[derive(Debug, Default)]
pub struct CheckpointCell {
    /// Snapshot the state as it is when every epoch before this one is applied, and none after.
    pub requested: Option<Epoch>,
    /// The snapshot (bincode of [`StateSnapshot`]), or why it could not be taken (the
    /// aggregate had already applied an epoch at or after the requested one).
    pub result: Option<(Epoch, Result<Vec<u8>, String>)>,
}

/// The format version of [`StateSnapshot`].
pub const SNAPSHOT_VERSION: u32 = 1;

/// [`StateSnapshot`] borrowing the live state (same field order and encoding).
#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    dataflow: u64,
    watermark: Option<i64>,
    partitions: Vec<(u32, Option<i64>, bool)>,
    groups: Vec<GroupRef<'a>>,
    stats: (u64, u64),
}

/// [`GroupSnapshot`] borrowing the live state (same variants in the same order).
#[derive(Serialize)]
enum GroupRef<'a> {
    Panes(PanesRef<'a>),
    Sessions(SessionsRef<'a>),
    Global(SlotsRef<'a>),
}

/// Pane start → slots, encoded as the sequence of pairs `GroupSnapshot::Panes` holds (bincode
/// writes a map and a sequence of pairs alike): the live panes' slots, and those of closed panes
/// read back from the arrangement (`frozen`; a slot live again in `live` is not in it).
struct PanesRef<'a> {
    live: &'a BTreeMap<i64, Pane>,
    frozen: BTreeMap<i64, KeyedAccs>,
}
/// The slots of one pane: live ones and ones read back.
struct PaneRef<'a>(Option<&'a SlotMap>, Option<&'a KeyedAccs>);
/// Key → accumulators.
struct SlotsRef<'a>(&'a SlotMap);
/// Key → sessions.
struct SessionsRef<'a>(&'a SessionMap);
/// One key's sessions as (start, end, accumulators).
struct SessionListRef<'a>(&'a [Session]);

impl Serialize for PanesRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let starts: std::collections::BTreeSet<i64> = self.live.keys().chain(self.frozen.keys()).copied().collect();
        let mut map = serializer.serialize_map(Some(starts.len()))?;
        for start in starts {
            let pane = PaneRef(self.live.get(&start).map(|p| &p.slots), self.frozen.get(&start));
            map.serialize_entry(&start, &pane)?;
        }
        map.end()
    }
}

impl Serialize for PaneRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let len = self.0.map_or(0, |m| m.len()) + self.1.map_or(0, |v| v.len());
        let mut map = serializer.serialize_map(Some(len))?;
        for (key, live) in self.0.into_iter().flatten() {
            map.serialize_entry(key, &live.accs)?;
        }
        for (key, accs) in self.1.into_iter().flatten() {
            map.serialize_entry(key, accs)?;
        }
        map.end()
    }
}

impl Serialize for SlotsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(key, live)| (key, &live.accs)))
    }
}

impl Serialize for SessionsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(key, sessions)| (key, SessionListRef(sessions))))
    }
}

impl Serialize for SessionListRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|s| (s.start, s.end, &s.accs)))
    }
}

/// The state of one worker's aggregate of one dataflow: every live slot, the partitions'
/// reports and the watermark. Restoring it (and emitting its slots) rebuilds the arrangement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateSnapshot {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The dataflow's catalog id.
    pub dataflow: u64,
    /// The watermark.
    pub watermark: Option<i64>,
    /// Per partition: the largest event time reported, and whether it was idle.
    pub partitions: Vec<(u32, Option<i64>, bool)>,
    /// Per group of the layout, its slots.
    pub groups: Vec<GroupSnapshot>,
    /// Live slots and reopened slots, as counted.
    pub stats: (u64, u64),
}

/// The accumulators of one slot, by key.
pub type KeyedAccs = Vec<(Key, Accs)>;
/// One session: start, end, accumulators.
pub type SavedSession = (i64, i64, Accs);

/// The slots of one group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GroupSnapshot {
    /// Pane start → slots of keys.
    Panes(Vec<(i64, KeyedAccs)>),
    /// Key → its sessions.
    Sessions(Vec<(Key, Vec<SavedSession>)>),
    /// Key → its global slot.
    Global(KeyedAccs),
}

impl StateSnapshot {
    /// The largest event time partition `partition` reported.
    pub fn partition_max(&self, partition: u32) -> Option<i64> {
        self.partitions.iter().find(|(p, _, _)| *p == partition).and_then(|(_, m, _)| *m)
    }
}

/// Builds the dataflow of `plan` in `scope`, starting from `restore` if given (the state of
/// this worker at a checkpoint); the caller checks that it belongs to this plan.
pub fn render(scope: Scope<'_, Epoch>, plan: DataflowPlan, restore: Option<StateSnapshot>) -> Rendered {
    render_with(scope, plan, restore, Tuning::default())
}

/// How the aggregate trades memory for latency. Tests shrink both, to exercise the paths that
/// read closed panes back.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// How long a closed pane stays in memory before it may leave. Ingest checks lateness
    /// against the watermark of the epochs complete when a batch enters, and the aggregate closes
    /// panes by the watermark of the epochs applied before it, which runs ahead by the pipeline's
    /// delay: the events of that gap reach panes just closed, and reading those back one by one
    /// costs more than keeping the panes a moment longer.
    pub freeze_after: std::time::Duration,
    /// At most this many slots of closed panes evicted by retention are read back and retracted
    /// per epoch (the rest wait for the next epochs), so that an eviction does not hold up
    /// ingest and reads. Reads leave evicted windows out from the moment the watermark passes.
    pub evict_per_epoch: usize,
    /// Closed panes leave memory only in groups that retain at least this many panes (retention
    /// plus the longest window): with fewer, the memory saved is small and every eviction reads
    /// the arrangement.
    pub freeze_min_panes: u64,
    /// The aggregate applies at most this many events per activation and activates itself again
    /// for the rest of an epoch, so that one big batch does not keep the worker thread (and the
    /// reads queued for it) waiting for milliseconds.
    pub slice_events: usize,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            freeze_after: std::time::Duration::from_millis(100),
            evict_per_epoch: 256,
            freeze_min_panes: 8,
            slice_events: 1024,
        }
    }
}

/// [`render`] with `tuning`.
pub fn render_with(
    scope: Scope<'_, Epoch>,
    plan: DataflowPlan,
    restore: Option<StateSnapshot>,
    tuning: Tuning,
) -> Rendered {
    let layout = Arc::new(Layout::new(plan));
    let name = layout.plan.name.clone();
    let (rows, row_stream) = scope.new_input::<Vec<RowBatch>>();
    let (reports, report_stream) = scope.new_input::<Vec<Report>>();
    let watermarks = Rc::new(RefCell::new(Watermarks::default()));
    let stats = Rc::new(Cell::new(Stats::default()));
    let checkpoint = Rc::new(RefCell::new(CheckpointCell::default()));

    let prep = Arc::clone(&layout);
    // Each input container's batches become one container of events, given whole to the
    // exchange, which sorts them to their workers (no flat_map stage pushing them one by one
    // through a builder first).
    let events = row_stream.unary::<CapacityContainerBuilder<Vec<Ev>>, _, _, _>(
        Pipeline,
        &format!("Prepare({name})"),
        move |_, _| {
            let mut prepared: Vec<Ev> = Vec::new();
            move |input, output| {
                input.for_each(|cap, batches| {
                    for batch in batches.drain(..) {
                        prepared.extend(batch.iter().filter_map(|row| prep.prepare(row)));
                    }
                    if !prepared.is_empty() {
                        output.session(&cap).give_container(&mut prepared);
                    }
                });
            }
        },
    );
    // The aggregate reads closed panes back from the arrangement it feeds (made below).
    let feeding: Rc<RefCell<Option<SlotTrace>>> = Rc::new(RefCell::new(None));
    let mut store = TraceStore { trace: Rc::clone(&feeding), upper: timely::progress::Antichain::new() };
    let mut state = AggregateState::new(Arc::clone(&layout));
    state.tuning = tuning;
    let mut restored = Vec::new();
    if let Some(snapshot) = restore {
        state.restore(snapshot);
        state.emit_all(&mut restored);
        stats.set(state.stats);
        let mut marks = watermarks.borrow_mut();
        if let Some(w) = state.watermark {
            marks.history.insert(0, w);
            marks.current = Some(w);
        }
        if let Some(t) = state.latest() {
            marks.latest.insert(0, t);
            marks.latest_current = Some(t);
        }
        drop(marks);
    }
    let (wm_out, stats_out, ckpt) = (Rc::clone(&watermarks), Rc::clone(&stats), Rc::clone(&checkpoint));
    let (activations, slice_events) = (scope, tuning.slice_events.max(1));
    let catching_up = Rc::new(Cell::new(false));
    let behind = Rc::clone(&catching_up);
    let updates = events.binary_frontier::<_, CapacityContainerBuilder<Vec<((Key, Slot), Epoch, isize)>>, _, _, _, _>(
        report_stream.broadcast(),
        ExchangePact::new(|ev: &Ev| ev.key.hash64()),
        Pipeline,
        &format!("WindowAggregate({name})"),
        move |capability, info| {
            let mut pending_events: BTreeMap<Epoch, Vec<Vec<Ev>>> = BTreeMap::new();
            let mut pending_reports: BTreeMap<Epoch, Vec<Report>> = BTreeMap::new();
            let mut caps: BTreeMap<Epoch, Capability<Epoch>> = BTreeMap::new();
            let mut out: Vec<((Key, Slot), isize)> = Vec::new();
            // A restored state enters the arrangement at the first epoch.
            let mut initial = (!restored.is_empty()).then_some((capability, restored));
            let mut last_applied: Option<Epoch> = None;
            let mut current: Option<Current> = None;
            let activator = activations.activator_for(Rc::clone(&info.address));
            move |(events, events_frontier), (reports, reports_frontier), output| {
                let port = output.output_index();
                if let Some((cap, slots)) = initial.take() {
                    let t = *cap.time();
                    output.session(&cap).give_iterator(slots.into_iter().map(|(d, r)| (d, t, r)));
                }
                let mut cell = ckpt.borrow_mut();
                if let Some(c) = cell.requested {
                    // Applied, or being applied in slices.
                    if last_applied.max(current.as_ref().map(|cur| cur.epoch)).is_some_and(|e| e >= c) {
                        cell.requested = None;
                        cell.result = Some((c, Err(format!("epoch {c} was already applied"))));
                    }
                }
                events.for_each(|cap, data| {
                    if let Some(&t) = cap.least() {
                        caps.entry(t).or_insert_with(|| cap.delayed(&t, port));
                        pending_events.entry(t).or_default().push(std::mem::take(data));
                    }
                });
                reports.for_each(|cap, data| {
                    if let Some(&t) = cap.least() {
                        caps.entry(t).or_insert_with(|| cap.delayed(&t, port));
                        pending_reports.entry(t).or_default().append(data);
                    }
                });
                // Epochs are applied in order, each in slices of at most `slice_events` events
                // per activation (the operator activates itself again for the rest), so that
                // the worker thread serves exports and waiting reads between the slices.
                let mut budget = if behind.get() { usize::MAX } else { slice_events };
                loop {
                    if current.is_none() {
                        // A requested checkpoint is taken between epochs, once every epoch before
                        // it is applied (none waits, none can still come) and none after it begun.
                        if let Some(c) = cell.requested {
                            let all_before_applied = caps.first_key_value().is_none_or(|(&e, _)| e >= c);
                            if all_before_applied && !events_frontier.less_than(&c) && !reports_frontier.less_than(&c) {
                                cell.requested = None;
                                cell.result = Some((c, state.timed_snapshot(&mut store)));
                            }
                        }
                        let Some((&epoch, _)) = caps.first_key_value() else { break };
                        if events_frontier.less_equal(&epoch) || reports_frontier.less_equal(&epoch) {
                            break;
                        }
                        let Some((_, cap)) = caps.pop_first() else { break };
                        let events = pending_events.remove(&epoch).unwrap_or_default();
                        current = Some(Current { epoch, cap, events, chunk: 0, at: 0, work: state.begin_epoch() });
                    }
                    let Some(cur) = current.as_mut() else { break };
                    while budget > 0 && cur.chunk < cur.events.len() {
                        let chunk = &cur.events[cur.chunk];
                        let n = (chunk.len() - cur.at).min(budget);
                        state.absorb(cur.epoch, &chunk[cur.at..cur.at + n], &mut cur.work, &mut store);
                        cur.at += n;
                        budget -= n;
                        if cur.at == chunk.len() {
                            cur.chunk += 1;
                            cur.at = 0;
                        }
                    }
                    if budget > 0 && cur.chunk == cur.events.len() {
                        budget -= state.emit_touched(&mut cur.work, budget, &mut out);
                    }
                    if cur.chunk < cur.events.len() || cur.work.touched_left() {
                        activator.activate();
                        break;
                    }
                    let Some(Current { epoch, cap, work, .. }) = current.take() else { break };
                    let reps = pending_reports.remove(&epoch).unwrap_or_default();
                    state.finish_epoch(&reps, work, &mut out, &mut store);
                    last_applied = Some(epoch);
                    let mut marks = wm_out.borrow_mut();
                    if let Some(w) = state.watermark {
                        if marks.current != Some(w) {
                            marks.history.insert(epoch, w);
                            marks.current = Some(w);
                        }
                    }
                    if let Some(t) = state.latest() {
                        if marks.latest_current != Some(t) {
                            marks.latest.insert(epoch, t);
                            marks.latest_current = Some(t);
                        }
                    }
                    drop(marks);
                    stats_out.set(state.stats);
                    if !out.is_empty() {
                        // In order, as one container: the batcher makes it the batch as it is.
                        let mut changes = epoch_in_order(std::mem::take(&mut out), epoch);
                        output.session(&cap).give_container(&mut changes);
                    }
                    if budget == 0 {
                        activator.activate();
                        break;
                    }
                }
            }
        },
    );
    let arranged =
        arrange_core::<_, _, SlotBatcher, SlotSpine>(updates, Pipeline, &format!("Features({name})"), SlotBatcher::new);
    *feeding.borrow_mut() = Some(arranged.trace.clone());
    let probe = ProbeHandle::new();
    let _ = arranged.stream.clone().probe_with(&probe);
    Rendered { rows, reports, trace: arranged.trace, probe, watermarks, stats, layout, checkpoint, catching_up }
}

/// The epoch the aggregate is applying, in slices: its events, how far it has got, and what it
/// has changed so far.
struct Current {
    epoch: Epoch,
    cap: Capability<Epoch>,
    events: Vec<Vec<Ev>>,
    chunk: usize,
    at: usize,
    work: EpochWork,
}

struct Session {
    start: i64,
    end: i64,
    accs: Accs,
}

/// The live slots of one pane, the last epoch that changed any of them, and since when it has
/// been seen closed.
#[derive(Default)]
struct Pane {
    slots: SlotMap,
    changed: Epoch,
    closed_since: Option<std::time::Instant>,
}

/// A pane group's slots. Once a pane is closed (the watermark passed its end) and the
/// arrangement holds every change made to it, its slots leave memory: the arrangement is then
/// their only copy. An event that still reaches such a pane (it was accepted before the
/// watermark moved) reads its slot back; retention evicts closed panes by retracting what the
/// arrangement holds; snapshots read them from there.
#[derive(Default)]
struct Panes {
    /// Pane start → live slots.
    live: BTreeMap<i64, Pane>,
    /// Start of each closed pane that left memory → the keys of its slots, kept only when
    /// retention will need them to evict the pane (a key may repeat after a pane reopened).
    frozen: BTreeMap<i64, Vec<Key>>,
    /// Closed panes evicted by retention whose slots are still to be retracted (start, keys
    /// ascending), a few per epoch.
    evicting: std::collections::VecDeque<(i64, Vec<Key>)>,
    /// Slots of the last pane that left memory or was evicted: a new pane's map starts at that
    /// capacity instead of growing to it step by step.
    typical: usize,
}

/// Where the aggregate finds the slots of closed panes: the arrangement it feeds.
trait SlotStore {
    /// Every epoch before this one is in the store.
    fn upper(&mut self) -> Epoch;
    /// Calls `f` with the accumulators of each of `keys` (ascending) that has a slot of `group`
    /// starting at `start`.
    fn get(&mut self, keys: &[Key], group: u32, start: i64, f: &mut dyn FnMut(&Key, Accs));
    /// Calls `f` with every slot held.
    fn for_each(&mut self, f: &mut dyn FnMut(&Key, &Slot));
}

/// The feature arrangement as a [`SlotStore`], through a trace handle of its own whose
/// compaction frontiers follow the arrangement's upper (so that it never holds compaction back).
struct TraceStore {
    trace: Rc<RefCell<Option<SlotTrace>>>,
    upper: timely::progress::Antichain<Epoch>,
}

impl SlotStore for TraceStore {
    fn upper(&mut self) -> Epoch {
        use differential_dataflow::trace::TraceReader;
        let mut cell = self.trace.borrow_mut();
        let Some(trace) = cell.as_mut() else { return 0 };
        trace.read_upper(&mut self.upper);
        match self.upper.first() {
            Some(&upper) => {
                trace.set_logical_compaction(self.upper.borrow());
                trace.set_physical_compaction(self.upper.borrow());
                upper
            }
            // Complete: nothing more will be changed, nothing needs reading back.
            None => 0,
        }
    }

    fn get(&mut self, keys: &[Key], group: u32, start: i64, f: &mut dyn FnMut(&Key, Accs)) {
        use differential_dataflow::trace::cursor::{Cursor, Navigable};
        use differential_dataflow::trace::TraceReader;
        let mut cell = self.trace.borrow_mut();
        let Some(trace) = cell.as_mut() else { return };
        let Some(batches) = trace.batches_through(timely::progress::Antichain::new().borrow()) else { return };
        // Batch by batch (the cursor list's `seek_val` also seeks the cursors of batches that do
        // not hold the key, which panics), seeking straight to the slots of (group, start): a
        // key's slots order by group, then start, and retracted ones wait there until compacted.
        let probe = Slot { group, start, end: i64::MIN, accs: Accs::default() };
        let mut counts: BTreeMap<(usize, Slot), isize> = BTreeMap::new();
        for batch in &batches {
            let batch: &<SlotSpine as TraceReader>::Batch = batch;
            let mut cursor = batch.cursor();
            for (i, key) in keys.iter().enumerate() {
                cursor.seek_key(batch, key);
                if cursor.get_key(batch) != Some(key) {
                    continue;
                }
                cursor.seek_val(batch, &probe);
                while let Some(slot) = cursor.get_val(batch) {
                    if (slot.group, slot.start) != (group, start) {
                        break;
                    }
                    let mut count = 0isize;
                    cursor.map_times(batch, |_, r| count += *r);
                    *counts.entry((i, slot.clone())).or_default() += count;
                    cursor.step_val(batch);
                }
            }
        }
        for ((i, slot), count) in counts {
            if count > 0 {
                f(&keys[i], slot.accs);
            }
        }
    }

    fn for_each(&mut self, f: &mut dyn FnMut(&Key, &Slot)) {
        let mut cell = self.trace.borrow_mut();
        let Some(trace) = cell.as_mut() else { return };
        // Everything the trace holds now: no epoch is past the last one.
        let read = crate::read::read_all(trace, Epoch::MAX, |key, slots| slots.iter().for_each(|s| f(key, s)));
        if let Err(e) = read {
            tracing::error!(error = %e, "reading closed panes back for a snapshot");
        }
    }
}

/// No store: nothing leaves memory (tests of the aggregate alone).
#[cfg(test)]
struct NoStore;

#[cfg(test)]
impl SlotStore for NoStore {
    fn upper(&mut self) -> Epoch {
        0
    }
    fn get(&mut self, _: &[Key], _: u32, _: i64, _: &mut dyn FnMut(&Key, Accs)) {}
    fn for_each(&mut self, _: &mut dyn FnMut(&Key, &Slot)) {}
}

/// A live slot: its accumulators, and whether the current epoch already changed it.
struct Live {
    accs: Accs,
    touched: bool,
}

/// Slots changed in the current epoch: (start, key, value before the epoch if it existed).
type Touched = Vec<(i64, Key, Option<Accs>)>;

/// What the epoch being applied has changed so far, per group: the slots it touched (pane and
/// global groups) and each changed key's sessions before it (session groups).
struct EpochWork {
    touched: Vec<Touched>,
    before: Vec<HashMap<Key, Vec<Slot>>>,
}

impl EpochWork {
    /// Whether touched slots are still to be emitted.
    fn touched_left(&self) -> bool {
        self.touched.iter().any(|t| !t.is_empty())
    }
}

/// The accumulators of `key` in `slots` for an update, recording in `touched` the value the
/// slot had before its first change in this epoch (one clone per slot and epoch, none per event).
fn touch<'a>(
    slots: &'a mut SlotMap,
    key: &Key,
    start: i64,
    touched: &mut Touched,
    live_slots: &mut u64,
    empty: impl FnOnce() -> Accs,
) -> &'a mut Accs {
    match slots.entry_ref(key) {
        EntryRef::Occupied(entry) => {
            let live = entry.into_mut();
            if !live.touched {
                live.touched = true;
                touched.push((start, key.clone(), Some(live.accs.clone())));
            }
            &mut live.accs
        }
        EntryRef::Vacant(entry) => {
            *live_slots += 1;
            touched.push((start, key.clone(), None));
            &mut entry.insert(Live { accs: empty(), touched: true }).accs
        }
    }
}

/// Live slots by key (one lookup per event, and a key clone only for a new slot).
type SlotMap = hashbrown::HashMap<Key, Live, rustc_hash::FxBuildHasher>;

/// Each key's sessions (as [`SlotMap`]: one lookup per event).
type SessionMap = hashbrown::HashMap<Key, Vec<Session>, rustc_hash::FxBuildHasher>;

/// Removes `key` from the sessions ending at `end`.
fn unindex(by_end: &mut BTreeMap<i64, Vec<Key>>, end: i64, key: &Key) {
    if let Some(keys) = by_end.get_mut(&end) {
        if let Some(i) = keys.iter().position(|k| k == key) {
            keys.swap_remove(i);
        }
        if keys.is_empty() {
            by_end.remove(&end);
        }
    }
}

enum GroupState {
    Panes(Panes),
    Sessions { by_key: SessionMap, by_end: BTreeMap<i64, Vec<Key>> },
    Global(SlotMap),
}

/// The aggregate's state on one worker: live slots of every group, and the partitions' reports.
struct AggregateState {
    layout: Arc<Layout>,
    groups: Vec<GroupState>,
    partitions: HashMap<u32, (Option<i64>, bool)>,
    watermark: Option<i64>,
    stats: Stats,
    tuning: Tuning,
}

impl AggregateState {
    fn new(layout: Arc<Layout>) -> Self {
        let groups = layout
            .groups
            .iter()
            .map(|g| match g.kind {
                GroupKind::Pane(_) => GroupState::Panes(Panes::default()),
                GroupKind::Session(_) => {
                    GroupState::Sessions { by_key: SessionMap::default(), by_end: BTreeMap::new() }
                }
                GroupKind::Global => GroupState::Global(SlotMap::default()),
            })
            .collect();
        AggregateState {
            layout,
            groups,
            partitions: HashMap::new(),
            watermark: None,
            stats: Stats::default(),
            tuning: Tuning::default(),
        }
    }

    /// Applies epoch `epoch`'s events, then its watermark; pushes the slot updates to `out`.
    /// Closed panes that `store` holds leave memory.
    #[cfg(test)]
    fn apply_epoch(
        &mut self,
        epoch: Epoch,
        events: &[Vec<Ev>],
        reports: &[Report],
        out: &mut Vec<((Key, Slot), isize)>,
        store: &mut dyn SlotStore,
    ) {
        let mut work = self.begin_epoch();
        for chunk in events {
            self.absorb(epoch, chunk, &mut work, store);
        }
        self.finish_epoch(reports, work, out, store);
    }

    /// An epoch to be applied in parts: [`Self::absorb`] its events, in as many calls as suit,
    /// then [`Self::finish_epoch`].
    fn begin_epoch(&self) -> EpochWork {
        let groups = self.layout.groups.len();
        EpochWork { touched: vec![Vec::new(); groups], before: vec![HashMap::new(); groups] }
    }

    /// Applies some of the current epoch's events to the slots, recording in `work` what each
    /// changed slot held before the epoch.
    fn absorb(&mut self, epoch: Epoch, events: &[Ev], work: &mut EpochWork, store: &mut dyn SlotStore) {
        let layout = Arc::clone(&self.layout);
        for (g, group) in layout.groups.iter().enumerate() {
            let gid = g as u32;
            match (&mut self.groups[g], group.kind) {
                (GroupState::Panes(Panes { live: panes, frozen, typical, .. }), GroupKind::Pane(pane_ms)) => {
                    let pane = pane_ms as i64;
                    let evicted_before = match (self.watermark, layout.plan.retention_ms) {
                        (Some(w), Some(r)) => Some(w.saturating_sub(r as i64).saturating_sub(group.span_ms as i64)),
                        _ => None,
                    };
                    let touched = &mut work.touched[g];
                    let mut cached: Option<(i64, bool, &mut Pane)> = None;
                    for ev in events {
                        let start = ev.time.div_euclid(pane) * pane;
                        if evicted_before.is_some_and(|limit| start <= limit) {
                            // Its windows are evicted: no read shows them any more.
                            self.stats.reopened += 1;
                            continue;
                        }
                        // Events come mostly in time order: the pane of the previous event is
                        // the likely one.
                        if cached.as_ref().is_none_or(|(s, _, _)| *s != start) {
                            let pane = panes.entry(start).or_insert_with(|| Pane {
                                slots: SlotMap::with_capacity_and_hasher(*typical, Default::default()),
                                ..Pane::default()
                            });
                            pane.changed = epoch;
                            cached = Some((start, frozen.contains_key(&start), pane));
                        }
                        let Some((_, is_frozen, current)) = cached.as_mut() else { continue };
                        let accs = if *is_frozen && !current.slots.contains_key(&ev.key) {
                            // A closed pane that left memory: its slot (if the key has one) is
                            // read back and replaced like any other.
                            let mut old = None;
                            store.get(std::slice::from_ref(&ev.key), gid, start, &mut |_, accs| old = Some(accs));
                            match old {
                                Some(_) => self.stats.read_back += 1,
                                None => self.stats.live_slots += 1,
                            }
                            let accs = old.clone().unwrap_or_else(|| layout.empty_accs(group));
                            touched.push((start, ev.key.clone(), old));
                            &mut current
                                .slots
                                .entry(ev.key.clone())
                                .insert(Live { accs, touched: true })
                                .into_mut()
                                .accs
                        } else {
                            touch(&mut current.slots, &ev.key, start, touched, &mut self.stats.live_slots, || {
                                layout.empty_accs(group)
                            })
                        };
                        for (acc, input) in accs.iter_mut().zip(&group.inputs) {
                            acc.add(ev.time, input.map(|i| &ev.values[i]));
                        }
                    }
                }
                (GroupState::Sessions { by_key, by_end }, GroupKind::Session(gap_ms)) => {
                    let gap = gap_ms as i64;
                    let before = &mut work.before[g];
                    for ev in events {
                        // One lookup; the key is cloned only the first time the state meets it.
                        let sessions = by_key.entry_ref(&ev.key).or_default();
                        if !before.contains_key(&ev.key) {
                            let slots = sessions
                                .iter()
                                .map(|s| Slot { group: gid, start: s.start, end: s.end, accs: s.accs.clone() })
                                .collect();
                            before.insert(ev.key.clone(), slots);
                        }
                        // The event's own session [t, t + gap) absorbs every session it intersects.
                        let mut merged = Session { start: ev.time, end: ev.time + gap, accs: layout.empty_accs(group) };
                        for (acc, input) in merged.accs.iter_mut().zip(&group.inputs) {
                            acc.add(ev.time, input.map(|i| &ev.values[i]));
                        }
                        let mut kept = Vec::with_capacity(sessions.len() + 1);
                        for s in sessions.drain(..) {
                            if s.start < merged.end && merged.start < s.end {
                                merged.start = merged.start.min(s.start);
                                merged.end = merged.end.max(s.end);
                                for (a, b) in merged.accs.iter_mut().zip(s.accs.iter()) {
                                    a.merge(b);
                                }
                                unindex(by_end, s.end, &ev.key);
                            } else {
                                kept.push(s);
                            }
                        }
                        // One index entry per live session (not per event).
                        by_end.entry(merged.end).or_default().push(ev.key.clone());
                        kept.push(merged);
                        kept.sort_by_key(|s| s.start);
                        *sessions = kept;
                    }
                }
                (GroupState::Global(slots), GroupKind::Global) => {
                    let touched = &mut work.touched[g];
                    for ev in events {
                        let accs = touch(slots, &ev.key, i64::MIN, touched, &mut self.stats.live_slots, || {
                            layout.empty_accs(group)
                        });
                        for (acc, input) in accs.iter_mut().zip(&group.inputs) {
                            acc.add(ev.time, input.map(|i| &ev.values[i]));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Pushes to `out` the changes of up to `budget` of the pane and global slots the current
    /// epoch touched (and clears their marks); returns how many it took.
    fn emit_touched(&mut self, work: &mut EpochWork, budget: usize, out: &mut Vec<((Key, Slot), isize)>) -> usize {
        let layout = Arc::clone(&self.layout);
        let mut taken = 0;
        for (g, (group, touched)) in layout.groups.iter().zip(work.touched.iter_mut()).enumerate() {
            let gid = g as u32;
            while taken < budget {
                let Some((start, key, old)) = touched.pop() else { break };
                taken += 1;
                let (live, end) = match (&mut self.groups[g], group.kind) {
                    (GroupState::Panes(Panes { live: panes, .. }), GroupKind::Pane(pane_ms)) => {
                        (panes.get_mut(&start).and_then(|p| p.slots.get_mut(&key)), start + pane_ms as i64)
                    }
                    (GroupState::Global(slots), GroupKind::Global) => (slots.get_mut(&key), i64::MAX),
                    _ => (None, 0),
                };
                let Some(live) = live else { continue };
                live.touched = false;
                let new = live.accs.clone();
                if let Some(old) = old {
                    out.push(((key.clone(), Slot { group: gid, start, end, accs: old }), -1));
                }
                out.push(((key, Slot { group: gid, start, end, accs: new }), 1));
            }
        }
        taken
    }

    /// Ends the current epoch: pushes the changes of every slot it changed to `out`, then
    /// applies its watermark (evicting and freezing panes).
    fn finish_epoch(
        &mut self,
        reports: &[Report],
        mut work: EpochWork,
        out: &mut Vec<((Key, Slot), isize)>,
        store: &mut dyn SlotStore,
    ) {
        self.emit_touched(&mut work, usize::MAX, out);
        let layout = Arc::clone(&self.layout);
        for ((g, group), before) in layout.groups.iter().enumerate().zip(work.before) {
            let gid = g as u32;
            if let (GroupState::Sessions { by_key, .. }, GroupKind::Session(_)) = (&mut self.groups[g], group.kind) {
                for (key, old) in before {
                    for slot in old {
                        out.push(((key.clone(), slot), -1));
                    }
                    for s in by_key.get(&key).into_iter().flatten() {
                        out.push((
                            (key.clone(), Slot { group: gid, start: s.start, end: s.end, accs: s.accs.clone() }),
                            1,
                        ));
                    }
                }
            }
        }
        self.update_watermark(reports);
        self.evict(out, store);
        // Every epoch, whatever the groups: this also moves the store's own trace handle's
        // compaction frontiers along, which would otherwise hold the arrangement's back.
        let upper = store.upper();
        self.freeze(upper);
        self.stats.hot_slots = self
            .groups
            .iter()
            .map(|g| match g {
                GroupState::Panes(panes) => panes.live.values().map(|p| p.slots.len() as u64).sum(),
                GroupState::Sessions { by_key, .. } => by_key.len() as u64,
                GroupState::Global(slots) => slots.len() as u64,
            })
            .sum();
    }

    /// Takes out of memory the closed panes whose every change the store holds.
    fn freeze(&mut self, upper: Epoch) {
        let Some(w) = self.watermark else { return };
        let keep_keys = self.layout.plan.retention_ms.is_some();
        for (state, group) in self.groups.iter_mut().zip(&self.layout.groups) {
            let (GroupState::Panes(panes), GroupKind::Pane(pane_ms)) = (state, group.kind) else { continue };
            // Worth it only when many closed panes are retained: evicting a pane that left
            // memory costs a read of each of its slots from the arrangement.
            let retained = self.layout.plan.retention_ms.map(|r| r.saturating_add(group.span_ms));
            if retained.is_some_and(|r| r < self.tuning.freeze_min_panes.saturating_mul(pane_ms)) {
                continue;
            }
            let closed = panes.live.range_mut(..=w.saturating_sub(pane_ms as i64));
            let now = std::time::Instant::now();
            let mut ready = Vec::new();
            for (start, pane) in closed {
                let since = *pane.closed_since.get_or_insert(now);
                if pane.changed < upper && now.duration_since(since) >= self.tuning.freeze_after {
                    ready.push(*start);
                }
            }
            for start in ready {
                let Some(pane) = panes.live.remove(&start) else { continue };
                panes.typical = pane.slots.len();
                let keys = panes.frozen.entry(start).or_default();
                if keep_keys {
                    keys.extend(pane.slots.into_keys());
                }
            }
        }
    }

    /// The state as a snapshot, encoded.
    /// [`AggregateState::snapshot`], logging its size and how long it took (at debug level).
    fn timed_snapshot(&self, store: &mut dyn SlotStore) -> Result<Vec<u8>, String> {
        let started = std::time::Instant::now();
        let result = self.snapshot(store);
        if let Ok(bytes) = &result {
            tracing::debug!(
                dataflow = %self.layout.plan.name,
                bytes = bytes.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "state snapshot taken"
            );
        }
        result
    }

    fn snapshot(&self, store: &mut dyn SlotStore) -> Result<Vec<u8>, String> {
        // Slots of closed panes that left memory, read back from the store: those of panes
        // still retained, unless live again.
        let mut frozen: Vec<BTreeMap<i64, KeyedAccs>> = self.groups.iter().map(|_| BTreeMap::new()).collect();
        if self.groups.iter().any(|g| matches!(g, GroupState::Panes(p) if !p.frozen.is_empty())) {
            store.for_each(&mut |key, slot| {
                let Some(GroupState::Panes(panes)) = self.groups.get(slot.group as usize) else { return };
                if !panes.frozen.contains_key(&slot.start)
                    || panes.live.get(&slot.start).is_some_and(|p| p.slots.contains_key(key))
                {
                    return;
                }
                frozen[slot.group as usize].entry(slot.start).or_default().push((key.clone(), slot.accs.clone()));
            });
        }
        // Serialized straight from the live maps (no copy of the live state first); the
        // encoding is exactly that of `StateSnapshot`, which is what restores read.
        let snapshot = SnapshotRef {
            version: SNAPSHOT_VERSION,
            dataflow: self.layout.plan.id,
            watermark: self.watermark,
            partitions: self.partitions.iter().map(|(p, (m, idle))| (*p, *m, *idle)).collect(),
            groups: self
                .groups
                .iter()
                .enumerate()
                .map(|(g, state)| match state {
                    GroupState::Panes(panes) => {
                        GroupRef::Panes(PanesRef { live: &panes.live, frozen: std::mem::take(&mut frozen[g]) })
                    }
                    GroupState::Sessions { by_key, .. } => GroupRef::Sessions(SessionsRef(by_key)),
                    GroupState::Global(slots) => GroupRef::Global(SlotsRef(slots)),
                })
                .collect(),
            stats: (self.stats.live_slots, self.stats.reopened),
        };
        bincode::serialize(&snapshot).map_err(|e| e.to_string())
    }

    /// Takes the state of `snapshot` (whose groups match this layout's: the caller checked the
    /// dataflow id, and ids are never reused).
    fn restore(&mut self, snapshot: StateSnapshot) {
        self.watermark = snapshot.watermark;
        self.partitions = snapshot.partitions.into_iter().map(|(p, m, idle)| (p, (m, idle))).collect();
        self.stats = Stats {
            live_slots: snapshot.stats.0,
            reopened: snapshot.stats.1,
            hot_slots: snapshot.stats.0,
            read_back: 0,
        };
        for (state, group) in self.groups.iter_mut().zip(snapshot.groups) {
            match (state, group) {
                (GroupState::Panes(panes), GroupSnapshot::Panes(saved)) => {
                    // Everything restored is live; closed panes leave memory once the
                    // arrangement holds them.
                    for (start, slots) in saved {
                        let pane = panes.live.entry(start).or_default();
                        for (key, accs) in slots {
                            pane.slots.insert(key, Live { accs, touched: false });
                        }
                    }
                }
                (GroupState::Sessions { by_key, by_end }, GroupSnapshot::Sessions(saved)) => {
                    for (key, sessions) in saved {
                        for (_, end, _) in &sessions {
                            by_end.entry(*end).or_default().push(key.clone());
                        }
                        by_key.insert(
                            key,
                            sessions.into_iter().map(|(start, end, accs)| Session { start, end, accs }).collect(),
                        );
                    }
                }
                (GroupState::Global(slots), GroupSnapshot::Global(saved)) => {
                    for (key, accs) in saved {
                        slots.insert(key, Live { accs, touched: false });
                    }
                }
                _ => {}
            }
        }
    }

    /// Every live slot as an insertion, to rebuild the arrangement from a restored state.
    fn emit_all(&self, out: &mut Vec<((Key, Slot), isize)>) {
        for (g, (state, group)) in self.groups.iter().zip(&self.layout.groups).enumerate() {
            let gid = g as u32;
            match (state, group.kind) {
                (GroupState::Panes(panes), GroupKind::Pane(pane_ms)) => {
                    for (start, pane) in &panes.live {
                        let end = start + pane_ms as i64;
                        for (key, live) in &pane.slots {
                            out.push((
                                (key.clone(), Slot { group: gid, start: *start, end, accs: live.accs.clone() }),
                                1,
                            ));
                        }
                    }
                }
                (GroupState::Sessions { by_key, .. }, _) => {
                    for (key, sessions) in by_key {
                        for s in sessions {
                            out.push((
                                (key.clone(), Slot { group: gid, start: s.start, end: s.end, accs: s.accs.clone() }),
                                1,
                            ));
                        }
                    }
                }
                (GroupState::Global(slots), _) => {
                    for (key, live) in slots {
                        out.push((
                            (key.clone(), Slot { group: gid, start: i64::MIN, end: i64::MAX, accs: live.accs.clone() }),
                            1,
                        ));
                    }
                }
                _ => {}
            }
        }
    }

    /// The largest event time any partition has reported.
    fn latest(&self) -> Option<i64> {
        self.partitions.values().filter_map(|(m, _)| *m).max()
    }

    fn update_watermark(&mut self, reports: &[Report]) {
        for r in reports {
            let entry = self.partitions.entry(r.partition).or_insert((None, true));
            entry.0 = entry.0.max(r.max_ts);
            entry.1 = r.idle;
        }
        // A partition that is not idle but has seen no event yet holds the watermark back (its
        // first events may be the oldest), as a new Flink source split does until it idles.
        let active: Vec<Option<i64>> = self.partitions.values().filter(|(_, idle)| !idle).map(|(m, _)| *m).collect();
        if active.iter().any(Option::is_none) {
            return;
        }
        // Once every partition is idle (the stream paused), the slowest partition that has seen
        // events decides, so that a burst followed by silence still closes its windows even when
        // its partition went idle together with the fresh ones that were holding it back.
        let min = if active.is_empty() {
            self.partitions.values().filter_map(|(m, _)| *m).min()
        } else {
            active.into_iter().flatten().min()
        };
        if let Some(min) = min {
            let candidate = min.saturating_sub(self.layout.plan.source.allowed_lateness_ms as i64);
            self.watermark = Some(self.watermark.map_or(candidate, |w| w.max(candidate)));
        }
    }

    fn evict(&mut self, out: &mut Vec<((Key, Slot), isize)>, store: &mut dyn SlotStore) {
        let (Some(w), Some(retention)) = (self.watermark, self.layout.plan.retention_ms) else {
            return;
        };
        let limit = w.saturating_sub(retention as i64);
        let layout = Arc::clone(&self.layout);
        for (g, group) in layout.groups.iter().enumerate() {
            let gid = g as u32;
            match (&mut self.groups[g], group.kind) {
                (GroupState::Panes(Panes { live: panes, frozen, evicting, typical }), GroupKind::Pane(pane_ms)) => {
                    // A pane is evicted once the last window using it (starting at the pane)
                    // ended more than `retention` before the watermark. The slots of a closed
                    // pane that left memory are read back to be retracted, except those live
                    // again (retracted below with their current value), a few per epoch: reads
                    // leave evicted windows out already, and events no longer reach them.
                    let end_of = |start: i64| start + pane_ms as i64;
                    while let Some((&start, _)) = frozen.first_key_value() {
                        if start + group.span_ms as i64 > limit {
                            break;
                        }
                        let Some((_, mut keys)) = frozen.pop_first() else {
                            break;
                        };
                        keys.sort_unstable();
                        keys.dedup();
                        if let Some(pane) = panes.get(&start) {
                            keys.retain(|k| !pane.slots.contains_key(k));
                        }
                        // Each is one slot the arrangement holds: gone now, retracted below.
                        self.stats.live_slots = self.stats.live_slots.saturating_sub(keys.len() as u64);
                        evicting.push_back((start, keys));
                    }
                    let mut budget = self.tuning.evict_per_epoch;
                    while budget > 0 {
                        let Some((start, keys)) = evicting.front_mut() else { break };
                        let start = *start;
                        let chunk = keys.split_off(keys.len().saturating_sub(budget));
                        budget -= chunk.len();
                        if keys.is_empty() {
                            evicting.pop_front();
                        }
                        store.get(&chunk, gid, start, &mut |key, accs| {
                            out.push(((key.clone(), Slot { group: gid, start, end: end_of(start), accs }), -1));
                        });
                    }
                    while let Some((&start, _)) = panes.first_key_value() {
                        if start + group.span_ms as i64 > limit {
                            break;
                        }
                        let Some((_, pane)) = panes.pop_first() else {
                            break;
                        };
                        *typical = pane.slots.len();
                        self.stats.live_slots -= pane.slots.len() as u64;
                        out.extend(pane.slots.into_iter().map(|(key, live)| {
                            ((key, Slot { group: gid, start, end: end_of(start), accs: live.accs }), -1)
                        }));
                    }
                }
                (GroupState::Sessions { by_key, by_end }, GroupKind::Session(_)) => {
                    while let Some((&end, _)) = by_end.first_key_value() {
                        if end > limit {
                            break;
                        }
                        let Some((_, keys)) = by_end.pop_first() else {
                            break;
                        };
                        for key in keys {
                            let Some(sessions) = by_key.get_mut(&key) else {
                                continue;
                            };
                            let (gone, kept): (Vec<Session>, Vec<Session>) =
                                sessions.drain(..).partition(|s| s.end <= limit);
                            *sessions = kept;
                            for s in gone {
                                out.push((
                                    (key.clone(), Slot { group: gid, start: s.start, end: s.end, accs: s.accs }),
                                    -1,
                                ));
                            }
                            if sessions.is_empty() {
                                by_key.remove(&key);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// The merge of `accs`, if there are any.
fn merged<'a>(accs: impl Iterator<Item = &'a Acc>) -> Option<Acc> {
    let mut out: Option<Acc> = None;
    for a in accs {
        match &mut out {
            None => out = Some(a.clone()),
            Some(o) => o.merge(a),
        }
    }
    out
}

/// Assembles the windows of every feature from one key's slots, as of watermark `watermark`
/// and the source's largest event time `now`. Windows evicted by retention are left out;
/// hopping and cumulating windows merge their panes, and a sliding window merges the tiles of
/// the `size` ending with the tile that holds `now` (tile-aligned: it reports that exact span).
pub fn assemble(
    layout: &Layout,
    slots: &[Slot],
    watermark: Option<i64>,
    now: Option<i64>,
) -> Vec<(String, Vec<WindowOut>)> {
    let plan = &layout.plan;
    let retained = |end: i64| match (watermark, plan.retention_ms) {
        (Some(w), Some(r)) => end > w.saturating_sub(r as i64),
        _ => true,
    };
    let closed = |end: i64| watermark.is_some_and(|w| w >= end);
    let mut result = Vec::with_capacity(plan.features.len());
    for (f, feature) in plan.features.iter().enumerate() {
        let Some((g, group)) = layout.groups.iter().enumerate().find(|(_, g)| g.features.contains(&f)) else {
            continue;
        };
        let Some(pos) = group.features.iter().position(|&x| x == f) else {
            continue;
        };
        let mine: Vec<&Slot> = slots.iter().filter(|s| s.group == g as u32).collect();
        // A window [start, end) of this feature holding `acc`.
        let window = |start: i64, end: i64, acc: &Acc| WindowOut {
            start: Some(start),
            end: Some(end),
            value: acc.value_at(feature.agg, &feature.params, now),
            closed: closed(end),
        };
        let mut windows = Vec::new();
        match feature.window {
            Window::Tumbling { .. } | Window::Session { .. } => {
                for s in mine.iter().filter(|s| retained(s.end)) {
                    windows.push(window(s.start, s.end, &s.accs[pos]));
                }
            }
            Window::Global => {
                for s in &mine {
                    let value = s.accs[pos].value_at(feature.agg, &feature.params, now);
                    windows.push(WindowOut { start: None, end: None, value, closed: false });
                }
            }
            Window::Hopping { size_ms, hop_ms } => {
                let (size, hop) = (size_ms as i64, hop_ms as i64);
                let panes: BTreeMap<i64, &Acc> = mine.iter().map(|s| (s.start, &s.accs[pos])).collect();
                let mut starts: Vec<i64> =
                    panes.keys().flat_map(|&p| (0..size / hop).map(move |k| p - k * hop)).collect();
                starts.sort_unstable();
                starts.dedup();
                for start in starts.into_iter().filter(|s| retained(s + size)) {
                    if let Some(acc) = merged(panes.range(start..start + size).map(|(_, a)| *a)) {
                        windows.push(window(start, start + size, &acc));
                    }
                }
            }
            Window::Sliding { size_ms, tile_ms } => {
                let (size, tile) = (size_ms as i64, tile_ms as i64);
                if let Some(now) = now {
                    let end = now.div_euclid(tile) * tile + tile;
                    let start = end - size;
                    let tiles = mine.iter().filter(|s| s.start >= start && s.start < end).map(|s| &s.accs[pos]);
                    if let Some(acc) = merged(tiles) {
                        windows.push(window(start, end, &acc));
                    }
                }
            }
            Window::Cumulate { step_ms, max_ms } => {
                let (step, max) = (step_ms as i64, max_ms as i64);
                let panes: BTreeMap<i64, &Acc> = mine.iter().map(|s| (s.start, &s.accs[pos])).collect();
                // Per max-aligned period, windows from its start growing by a step, from the
                // first step that holds a pane.
                let mut periods: BTreeMap<i64, i64> = BTreeMap::new();
                for &p in panes.keys() {
                    let first = periods.entry(p.div_euclid(max) * max).or_insert(p);
                    *first = (*first).min(p);
                }
                for (base, first) in periods {
                    let ends = (first + step..=base + max).step_by(step as usize).filter(|e| retained(*e));
                    for end in ends {
                        if let Some(acc) = merged(panes.range(base..end).map(|(_, a)| *a)) {
                            windows.push(window(base, end, &acc));
                        }
                    }
                }
            }
        }
        windows.sort_by_key(|w| (w.start, w.end));
        result.push((feature.name.clone(), windows));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_protocol::plan::{Agg, FeaturePlan, Field, SourcePlan, TimeUnit};

    /// A source `s` of (k u64, t i64), t being the event time.
    fn source(lateness: u64) -> SourcePlan {
        SourcePlan {
            name: "s".into(),
            fields: vec![
                Field { name: "k".into(), ty: FieldType::U64 },
                Field { name: "t".into(), ty: FieldType::I64 },
            ],
            time: 1,
            time_unit: TimeUnit::Ms,
            allowed_lateness_ms: lateness,
            idle_timeout_ms: 10_000,
        }
    }

    /// A feature over field `t`.
    fn feature(name: &str, agg: Agg, window: Window) -> FeaturePlan {
        FeaturePlan { name: name.into(), agg, field: Some(1), window, params: Default::default() }
    }

    /// The layout of dataflow `id` over `source(lateness)`, keyed by `k`.
    fn layout(id: u64, lateness: u64, retention_ms: Option<u64>, features: Vec<FeaturePlan>) -> Arc<Layout> {
        let plan = DataflowPlan {
            name: "d".into(),
            id,
            source: source(lateness),
            key: vec![0],
            filter: None,
            retention_ms,
            features,
        };
        Arc::new(Layout::new(plan))
    }

    #[test]
    fn inline_values_take_two_elements_room() {
        assert_eq!(std::mem::size_of::<Accs>(), 2 * std::mem::size_of::<Acc>());
        assert_eq!(std::mem::size_of::<Values>(), 2 * std::mem::size_of::<Datum>());
        let three: Accs = [Acc::Count(1), Acc::Count(2), Acc::Count(3)].into_iter().collect();
        let bytes = bincode::serialize(&three).unwrap();
        assert_eq!(bytes, bincode::serialize(&three.to_vec()).unwrap(), "encoded as a sequence");
        assert_eq!(bincode::deserialize::<Accs>(&bytes).unwrap(), three);
        for n in 0..4u64 {
            let values: Values = (0..n).map(Datum::UInt).collect();
            let bytes = bincode::serialize(&values).unwrap();
            assert_eq!(bincode::deserialize::<Values>(&bytes).unwrap(), values, "{n} values");
        }
    }

    fn state(lateness: u64) -> AggregateState {
        AggregateState::new(layout(0, lateness, None, vec![feature("c", Agg::Count, Window::Global)]))
    }

    fn report(partition: u32, max_ts: Option<i64>, idle: bool) -> Report {
        Report { partition, max_ts, idle }
    }

    #[test]
    fn watermark_is_the_minimum_of_active_partitions_and_never_goes_back() {
        let mut s = state(100);
        s.update_watermark(&[report(0, None, true), report(1, None, true)]);
        assert_eq!(s.watermark, None, "no partition has seen an event");
        s.update_watermark(&[report(0, Some(1_000), false), report(1, None, false)]);
        assert_eq!(s.watermark, None, "a fresh partition without events holds it back until it idles");
        s.update_watermark(&[report(1, None, true)]);
        assert_eq!(s.watermark, Some(900), "an idle partition without events does not");
        s.update_watermark(&[report(1, Some(500), false)]);
        assert_eq!(s.watermark, Some(900), "a slower partition does not move it back");
        s.update_watermark(&[report(0, Some(2_000), false), report(1, Some(1_500), false)]);
        assert_eq!(s.watermark, Some(1_400), "the slowest active partition decides");
        s.update_watermark(&[report(1, Some(1_500), true)]);
        assert_eq!(s.watermark, Some(1_900), "an idle partition stops holding it back");
    }

    #[test]
    fn a_snapshot_restores_every_slot_and_the_watermark() {
        let layout = layout(
            9,
            0,
            Some(60_000),
            vec![
                feature("tumbling", Agg::Count, Window::Tumbling { size_ms: 1_000 }),
                feature("session", Agg::Max, Window::Session { gap_ms: 300 }),
                feature("global", Agg::Sum, Window::Global),
            ],
        );
        let mut live = AggregateState::new(Arc::clone(&layout));
        let mut out = Vec::new();
        let events: Vec<Ev> = (0..500u64)
            .map(|i| {
                let row = Row {
                    time: (i * 37 % 5_000) as i64,
                    values: vec![Datum::UInt(i % 13), Datum::Int((i * 37 % 5_000) as i64)].into(),
                };
                layout.prepare(&row).unwrap()
            })
            .collect();
        live.apply_epoch(1, &[events], &[report(0, Some(4_000), false)], &mut out, &mut NoStore);
        let bytes = live.snapshot(&mut NoStore).unwrap();
        let snapshot: StateSnapshot = bincode::deserialize(&bytes).unwrap();
        assert_eq!(snapshot.dataflow, 9);
        assert_eq!(snapshot.partition_max(0), Some(4_000));
        let mut restored = AggregateState::new(Arc::clone(&layout));
        restored.restore(snapshot);
        assert_eq!(restored.watermark, live.watermark);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        live.emit_all(&mut a);
        restored.emit_all(&mut b);
        a.sort();
        b.sort();
        assert!(a.len() > 13 * 3, "{}", a.len());
        assert_eq!(a, b);
        // The restored state goes on exactly as the live one.
        let more = |state: &mut AggregateState| {
            let evs = (0..50u64)
                .map(|i| {
                    layout
                        .prepare(&Row {
                            time: 4_100 + i as i64,
                            values: vec![Datum::UInt(i % 13), Datum::Int(7)].into(),
                        })
                        .unwrap()
                })
                .collect();
            let mut out = Vec::new();
            state.apply_epoch(2, &[evs], &[report(0, Some(4_149), false)], &mut out, &mut NoStore);
            out.sort();
            out
        };
        assert_eq!(more(&mut live), more(&mut restored));
    }

    /// A store that holds what the aggregate emitted, complete through the last epoch given.
    #[derive(Default)]
    struct MapStore {
        slots: BTreeMap<(Key, Slot), isize>,
        upper: Epoch,
    }

    impl MapStore {
        fn take(&mut self, epoch: Epoch, out: &mut Vec<((Key, Slot), isize)>) {
            for (slot, diff) in out.drain(..) {
                *self.slots.entry(slot).or_default() += diff;
            }
            self.slots.retain(|_, d| *d != 0);
            self.upper = epoch + 1;
        }
    }

    impl SlotStore for MapStore {
        fn upper(&mut self) -> Epoch {
            self.upper
        }
        fn get(&mut self, keys: &[Key], group: u32, start: i64, f: &mut dyn FnMut(&Key, Accs)) {
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "keys ascending, once each");
            for key in keys {
                let found =
                    self.slots.iter().find(|((k, s), d)| k == key && s.group == group && s.start == start && **d > 0);
                if let Some(((_, slot), _)) = found {
                    f(key, slot.accs.clone());
                }
            }
        }
        fn for_each(&mut self, f: &mut dyn FnMut(&Key, &Slot)) {
            for ((key, slot), d) in &self.slots {
                assert_eq!(*d, 1, "one copy of each slot");
                f(key, slot);
            }
        }
    }

    #[test]
    fn closed_panes_leave_memory_and_are_read_back_exactly() {
        // Tumbling and hopping panes with retention, fed in order with stragglers that reach
        // panes already closed (and some already evicted), against the same aggregate keeping
        // every slot in memory: the same updates, the same snapshots, and few slots in memory.
        let layout = layout(
            3,
            100,
            Some(6_000),
            vec![
                feature("count", Agg::Count, Window::Tumbling { size_ms: 1_000 }),
                feature("max", Agg::Max, Window::Hopping { size_ms: 2_000, hop_ms: 500 }),
                feature("last", Agg::Last, Window::Hopping { size_ms: 2_000, hop_ms: 500 }),
            ],
        );
        let (mut all, mut some) = (AggregateState::new(Arc::clone(&layout)), AggregateState::new(Arc::clone(&layout)));
        some.tuning = Tuning {
            freeze_after: std::time::Duration::ZERO,
            evict_per_epoch: usize::MAX,
            freeze_min_panes: 0,
            ..Tuning::default()
        };
        // And one that retracts evicted slots three per epoch: behind, but never wrong.
        let mut slow = AggregateState::new(Arc::clone(&layout));
        slow.tuning = Tuning {
            freeze_after: std::time::Duration::ZERO,
            evict_per_epoch: 3,
            freeze_min_panes: 0,
            ..Tuning::default()
        };
        let (mut store, mut slow_store) = (MapStore::default(), MapStore::default());
        let mut expected: BTreeMap<(Key, Slot), isize> = BTreeMap::new();
        for epoch in 1..=60u64 {
            let base = epoch as i64 * 200;
            let events: Vec<Ev> = (0..40i64)
                .map(|i| {
                    // Mostly recent; every seventh event up to 9 s late (past retention, some).
                    let t = if i % 7 == 0 { base - (i * 211 % 9_000) } else { base + i * 5 };
                    layout.prepare(&Row { time: t, values: vec![Datum::UInt((i % 9) as u64), Datum::Int(t)].into() })
                })
                .collect::<Option<_>>()
                .unwrap();
            let reports = [report(0, Some(base + 200), false)];
            let (mut a, mut b) = (Vec::new(), Vec::new());
            all.apply_epoch(epoch, std::slice::from_ref(&events), &reports, &mut a, &mut NoStore);
            some.apply_epoch(epoch, std::slice::from_ref(&events), &reports, &mut b, &mut store);
            let mut c = Vec::new();
            slow.apply_epoch(epoch, &[events], &reports, &mut c, &mut slow_store);
            for (slot, diff) in a {
                *expected.entry(slot).or_default() += diff;
            }
            expected.retain(|_, d| *d != 0);
            store.take(epoch, &mut b);
            assert_eq!(store.slots, expected, "epoch {epoch}: the same slots");
            slow_store.take(epoch, &mut c);
            assert!(
                expected.iter().all(|(slot, d)| slow_store.slots.get(slot) == Some(d)),
                "epoch {epoch}: what is retained is there"
            );
            assert_eq!(some.stats.live_slots, all.stats.live_slots);
            assert_eq!(slow.stats.live_slots, all.stats.live_slots, "evictions in progress are not live");
            assert_eq!(some.stats.reopened, all.stats.reopened);
            if epoch > 30 {
                let (hot, live) = (some.stats.hot_slots, some.stats.live_slots);
                assert!(hot * 2 < live, "epoch {epoch}: closed panes left memory: {hot} in memory of {live}");
            }
            let decode = |bytes: Vec<u8>| {
                let mut s: StateSnapshot = bincode::deserialize(&bytes).unwrap();
                for g in &mut s.groups {
                    if let GroupSnapshot::Panes(panes) = g {
                        panes.iter_mut().for_each(|(_, slots)| slots.sort());
                    }
                }
                s
            };
            let reference = decode(all.snapshot(&mut NoStore).unwrap());
            assert_eq!(decode(some.snapshot(&mut store).unwrap()), reference, "epoch {epoch}");
            assert_eq!(decode(slow.snapshot(&mut slow_store).unwrap()), reference, "epoch {epoch}, evicting");
        }
        assert!(some.stats.reopened > 0 && expected.len() > 100);
        assert!(some.stats.read_back > 0, "stragglers reached panes that had left memory");
        assert!(slow_store.slots.len() > expected.len(), "evictions are behind");
        for epoch in 61..=200u64 {
            let mut c = Vec::new();
            slow.apply_epoch(epoch, &[], &[report(0, Some(12_200), false)], &mut c, &mut slow_store);
            slow_store.take(epoch, &mut c);
        }
        assert_eq!(slow_store.slots, expected, "evictions caught up");
    }

    #[test]
    fn when_every_partition_is_idle_the_slowest_with_events_decides() {
        let mut s = state(100);
        s.update_watermark(&[report(0, Some(1_000), false), report(1, None, false), report(2, Some(3_000), false)]);
        assert_eq!(s.watermark, None, "a fresh partition holds it back");
        s.update_watermark(&[report(0, Some(1_000), true), report(1, None, true), report(2, Some(3_000), true)]);
        assert_eq!(s.watermark, Some(900), "all idle at once: the slowest partition with events decides");
        s.update_watermark(&[report(2, Some(3_000), false)]);
        assert_eq!(s.watermark, Some(2_900), "the active partition decides again");
        s.update_watermark(&[report(2, Some(3_000), true)]);
        assert_eq!(s.watermark, Some(2_900), "and it never goes back");
    }
}
