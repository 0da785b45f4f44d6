//! Reading a feature arrangement at one epoch: a cursor over the local trace, accumulating each
//! slot's updates at times not after `as_of`. Nothing is copied out of the arrangement but the
//! slots that are live at `as_of`.
//!
//! A [`Snapshot`] holds the trace's batches as they are at one moment (shared, immutable), so
//! that a key can be read from it on another thread than the worker thread that maintains the
//! trace.

use differential_dataflow::trace::cursor::{Cursor, CursorList, Navigable};
use differential_dataflow::trace::TraceReader;
use timely::progress::Antichain;

use sundial_protocol::value::Key;

use crate::features::{Epoch, Slot, SlotBatch, SlotTrace};
use crate::spine::Shared;

/// Why a read cannot be served from this trace.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// History before the compaction frontier has been merged away.
    #[error("epoch {as_of} is no longer readable: history before epoch {since} has been compacted")]
    Compacted {
        /// The requested epoch.
        as_of: Epoch,
        /// The oldest readable epoch.
        since: Epoch,
    },
}

fn since(trace: &mut SlotTrace) -> Epoch {
    trace.get_logical_compaction().iter().next().copied().unwrap_or(0)
}

/// A trace's batches at one moment, and its compaction frontier then. The batches are shared
/// with the trace (no update is copied) and never change: a merge makes a new batch, so a
/// snapshot reads the same at every epoch it covers for as long as it is kept (and keeps the
/// batches it holds alive).
#[derive(Clone)]
pub struct Snapshot {
    batches: Vec<Shared<SlotBatch>>,
    since: Epoch,
}

impl Snapshot {
    /// The trace as it is now.
    pub fn of(trace: &mut SlotTrace) -> Snapshot {
        // Through the empty frontier (everything) there is never a cut inside a batch.
        let batches = trace.batches_through(Antichain::new().borrow()).unwrap_or_default();
        Snapshot { batches, since: since(trace) }
    }

    /// Whether it holds the last reference to one of its batches (letting go of it would free
    /// that batch).
    pub fn holds_last_reference(&self) -> bool {
        self.batches.iter().any(Shared::is_unique)
    }

    /// The oldest epoch it can be read at.
    pub fn since(&self) -> Epoch {
        self.since
    }

    /// A cursor over its batches, which are the cursor's storage (not a copy of the list: the
    /// snapshot is shared by every reader, and each batch's count would be touched per read).
    fn cursor(&self) -> (CursorList<<Shared<SlotBatch> as Navigable>::Cursor>, &Vec<Shared<SlotBatch>>) {
        let cursors = self.batches.iter().map(Navigable::cursor).collect();
        (CursorList::new(cursors, &self.batches), &self.batches)
    }

    fn check(&self, as_of: Epoch) -> Result<(), ReadError> {
        if as_of < self.since {
            return Err(ReadError::Compacted { as_of, since: self.since });
        }
        Ok(())
    }

    /// The live slots of `key` at `as_of` (empty when the key has none). Epochs the trace had
    /// not completed when the snapshot was taken read as incomplete: the caller checks that
    /// `as_of` was complete.
    pub fn read_key(&self, key: &Key, as_of: Epoch) -> Result<Vec<Slot>, ReadError> {
        let mut slots = Vec::new();
        self.read_keys([key], as_of, |_, found| slots = found)?;
        Ok(slots)
    }

    /// Calls `f` with each of `keys`, in the order given, and its live slots at `as_of` (empty
    /// when it has none): one cursor over the batches for all of them.
    pub fn read_keys<K: std::borrow::Borrow<Key>>(
        &self,
        keys: impl IntoIterator<Item = K>,
        as_of: Epoch,
        mut f: impl FnMut(K, Vec<Slot>),
    ) -> Result<(), ReadError> {
        self.check(as_of)?;
        let (mut cursor, storage) = self.cursor();
        for key in keys {
            cursor.rewind_keys(storage);
            cursor.seek_key(storage, key.borrow());
            let slots = match cursor.get_key(storage) {
                Some(k) if k == key.borrow() => live_slots(&mut cursor, storage, as_of),
                _ => Vec::new(),
            };
            f(key, slots);
        }
        Ok(())
    }

    /// Calls `f` with the keys after `start_after` (all keys when `None`) that have live slots
    /// at `as_of`, in key order: at most `limit` keys, and no further key once `max_slots`
    /// slots have been read (the first key is always read whole). Returns whether more such
    /// keys remain.
    pub fn read_from(
        &self,
        as_of: Epoch,
        start_after: Option<&Key>,
        limit: usize,
        max_slots: usize,
        mut f: impl FnMut(&Key, Vec<Slot>),
    ) -> Result<bool, ReadError> {
        self.check(as_of)?;
        let (mut cursor, storage) = self.cursor();
        if let Some(start) = start_after {
            cursor.seek_key(storage, start);
            if cursor.get_key(storage) == Some(start) {
                cursor.step_key(storage);
            }
        }
        let (mut taken, mut slots_taken) = (0, 0);
        while let Some(key) = cursor.get_key(storage) {
            let key = key.clone();
            let slots = live_slots(&mut cursor, storage, as_of);
            if !slots.is_empty() {
                if taken == limit || (taken > 0 && slots_taken >= max_slots) {
                    return Ok(true);
                }
                slots_taken += slots.len();
                f(&key, slots);
                taken += 1;
            }
            cursor.step_key(storage);
        }
        Ok(false)
    }

    /// Calls `f` with every key that has live slots at `as_of`, in key order.
    pub fn read_all(&self, as_of: Epoch, f: impl FnMut(&Key, Vec<Slot>)) -> Result<(), ReadError> {
        self.read_from(as_of, None, usize::MAX, usize::MAX, f).map(|_| ())
    }
}

fn live_slots<C: Cursor<Time = Epoch, Diff = isize>>(cursor: &mut C, storage: &C::Storage, as_of: Epoch) -> Vec<Slot>
where
    for<'a> C::Val<'a>: Into<&'a Slot>,
{
    let mut slots = Vec::new();
    while let Some(val) = cursor.get_val(storage) {
        let mut count = 0isize;
        cursor.map_times(storage, |t, r| {
            if C::owned_time(t) <= as_of {
                count += C::owned_diff(r);
            }
        });
        if count > 0 {
            slots.push(val.into().clone());
        }
        cursor.step_val(storage);
    }
    slots
}

/// The live slots of `key` at `as_of` (empty when the key has none).
pub fn read_key(trace: &mut SlotTrace, key: &Key, as_of: Epoch) -> Result<Vec<Slot>, ReadError> {
    Snapshot::of(trace).read_key(key, as_of)
}

/// Calls `f` with every key that has live slots at `as_of`, in key order.
pub fn read_all(trace: &mut SlotTrace, as_of: Epoch, f: impl FnMut(&Key, Vec<Slot>)) -> Result<(), ReadError> {
    Snapshot::of(trace).read_all(as_of, f)
}

/// [`Snapshot::read_from`] on the trace as it is now.
pub fn read_from(
    trace: &mut SlotTrace,
    as_of: Epoch,
    start_after: Option<&Key>,
    limit: usize,
    max_slots: usize,
    f: impl FnMut(&Key, Vec<Slot>),
) -> Result<bool, ReadError> {
    Snapshot::of(trace).read_from(as_of, start_after, limit, max_slots, f)
}
