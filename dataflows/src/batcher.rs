//! The batcher of the features arrangement: forms each epoch's batch of slot changes with one
//! sort, instead of differential's merge batcher.
//!
//! The merge batcher sorts the arriving updates in chunks of timely's default container size
//! (8 KiB: 64 updates of a slot) and merges the chunks geometrically, so that each update is
//! moved a dozen times at the rates of a backfill. The aggregate emits an epoch's changes all
//! at once and never before the epoch is complete, so here they are kept as they arrive and
//! sorted once when the epoch is sealed: an order of small (prefix, index) pairs, where the
//! prefix orders keys as [`Key`]'s `Ord` does wherever two prefixes differ, and the updates
//! move once, into their place.

use std::cmp::Ordering;

use differential_dataflow::batcher::merge::Sealer;
use differential_dataflow::batcher::{Batcher, Extract};
use differential_dataflow::trace::implementations::ord_neu::{BuilderInput, OrdValBatch};
use differential_dataflow::trace::implementations::{ValBuilder, Vector};
use differential_dataflow::trace::Builder as _;
use timely::progress::frontier::{Antichain, AntichainRef};

use sundial_protocol::value::{Datum, Key};

use crate::features::{Epoch, Slot};

/// One change of a slot, as the aggregate emits it.
pub type SlotUpdate = ((Key, Slot), Epoch, isize);
type Builder = ValBuilder<Key, Slot, Epoch, isize>;

/// Holds slot changes until their epoch is sealed, then sorts and consolidates them into one
/// batch. The aggregate sends each epoch's changes as one container already in order (see
/// [`epoch_in_order`]); such a container becomes the batch as it is.
pub struct SlotBatcher {
    pending: Vec<Vec<SlotUpdate>>,
    frontier: Antichain<Epoch>,
}

impl SlotBatcher {
    /// An empty batcher (the signature `arrange_core` asks for; no logging of its size).
    pub fn new(_logger: Option<differential_dataflow::logging::Logger>, _operator: usize) -> SlotBatcher {
        SlotBatcher { pending: Vec::new(), frontier: Antichain::new() }
    }
}

impl Batcher<Vec<SlotUpdate>> for SlotBatcher {
    fn insert(&mut self, container: &mut Vec<SlotUpdate>) {
        if !container.is_empty() {
            self.pending.push(std::mem::take(container));
        }
    }
}

impl Extract for SlotBatcher {
    type Time = Epoch;
    type Output = OrdValBatch<Vector<SlotUpdate>>;

    fn extract<'a>(&'a mut self, upper: AntichainRef<'_, Epoch>) -> (Option<Self::Output>, AntichainRef<'a, Epoch>) {
        // Epochs are totally ordered: the upper is one epoch, or empty once the input is done.
        let limit = upper.first().copied();
        let is_ready = |u: &SlotUpdate| limit.is_none_or(|l| u.1 < l);
        let mut ready: Vec<Vec<SlotUpdate>> = Vec::new();
        let mut kept: Vec<Vec<SlotUpdate>> = Vec::new();
        for chunk in std::mem::take(&mut self.pending) {
            if chunk.iter().all(is_ready) {
                ready.push(chunk);
            } else if chunk.iter().any(is_ready) {
                let (now, later): (Vec<_>, Vec<_>) = chunk.into_iter().partition(is_ready);
                ready.push(now);
                kept.push(later);
            } else {
                kept.push(chunk);
            }
        }
        self.pending = kept;
        self.frontier.clear();
        if let Some(least) = self.pending.iter().flatten().map(|u| u.1).min() {
            self.frontier.insert(least);
        }
        // Containers already in order (each epoch's, from the aggregate) are merged; anything
        // else is sorted first.
        let (mut runs, unsorted): (Vec<_>, Vec<_>) = ready.into_iter().partition(|run| is_run(run));
        if !unsorted.is_empty() {
            runs.push(sort_and_consolidate(unsorted.into_iter().flatten().collect()));
        }
        (seal_runs(runs), self.frontier.borrow())
    }
}

/// Updates moved into the builder at a time when runs are merged.
const SEAL_CHUNK: usize = 1024;

/// Sorted, consolidated runs as one batch. Several runs (the epochs the aggregate finished in
/// one step) are merged on their way into the batch, a chunk at a time: each update moves
/// once, without a merged copy of them all first.
fn seal_runs(runs: Vec<Vec<SlotUpdate>>) -> Option<OrdValBatch<Vector<SlotUpdate>>> {
    seal_runs_in(runs, SEAL_CHUNK)
}

/// [`seal_runs`], moving `chunk` updates at a time.
fn seal_runs_in(mut runs: Vec<Vec<SlotUpdate>>, chunk_len: usize) -> Option<OrdValBatch<Vector<SlotUpdate>>> {
    runs.retain(|run| !run.is_empty());
    if runs.len() <= 1 {
        return runs.pop().and_then(|run| Builder::seal(&mut vec![run]));
    }
    // Counted over the runs one after the other: at least what the merge holds.
    let (keys, vals, upds) = <Vec<SlotUpdate> as BuilderInput<Vec<Key>, Vec<Slot>>>::key_val_upd_counts(&runs);
    let mut builder = Builder::with_capacity(keys, vals, upds);
    let mut rest: Vec<std::vec::IntoIter<SlotUpdate>> = runs.into_iter().map(Vec::into_iter).collect();
    let mut heads: Vec<Option<SlotUpdate>> = rest.iter_mut().map(Iterator::next).collect();
    let mut chunk: Vec<SlotUpdate> = Vec::with_capacity(chunk_len);
    loop {
        let mut least: Option<(usize, &SlotUpdate)> = None;
        for (i, head) in heads.iter().enumerate() {
            if let Some(u) = head {
                if least.is_none_or(|(_, l)| (&u.0, u.1) < (&l.0, l.1)) {
                    least = Some((i, u));
                }
            }
        }
        let Some((i, _)) = least else { break };
        let next = rest[i].next();
        let Some(update) = std::mem::replace(&mut heads[i], next) else { break };
        match chunk.last_mut() {
            // The same change in two runs (of one epoch): one update.
            Some(last) if last.1 == update.1 && last.0 == update.0 => last.2 += update.2,
            _ => {
                // The last one is final once a different one follows it.
                if chunk.len() >= chunk_len {
                    chunk.retain(|u| u.2 != 0);
                    builder.push(&mut chunk);
                    chunk.clear();
                }
                chunk.push(update);
            }
        }
    }
    chunk.retain(|u| u.2 != 0);
    builder.push(&mut chunk);
    builder.done()
}

/// One epoch's changes (as the aggregate makes them) in the order of their (key, slot), with
/// the differences of equal ones summed and those that sum to zero left out: the container the
/// batcher turns into a batch without sorting again.
pub fn epoch_in_order(changes: Vec<((Key, Slot), isize)>, epoch: Epoch) -> Vec<SlotUpdate> {
    let n = changes.len();
    consolidated(in_order(changes, |c| &c.0 .0, |x, y| x.0.cmp(&y.0)).map(|(data, diff)| (data, epoch, diff)), n)
}

/// The updates in the order of their (key, slot, epoch), with the differences of equal ones
/// summed and those that sum to zero left out.
pub fn sort_and_consolidate(updates: Vec<SlotUpdate>) -> Vec<SlotUpdate> {
    let n = updates.len();
    consolidated(in_order(updates, |u| &u.0 .0, |x, y| (&x.0, x.1).cmp(&(&y.0, y.1))), n)
}

/// Whether `updates` are strictly in the order of (key, slot, epoch) with no zero difference:
/// sorted and consolidated.
fn is_run(updates: &[SlotUpdate]) -> bool {
    updates.windows(2).all(|w| (&w[0].0, w[0].1) < (&w[1].0, w[1].1)) && updates.iter().all(|u| u.2 != 0)
}

/// `items` in the order of `cmp`, which must order first by `key`: sorts (key prefix, index)
/// pairs, comparing the items themselves only where prefixes tie, then moves each item once.
fn in_order<T>(items: Vec<T>, key: impl Fn(&T) -> &Key, cmp: impl Fn(&T, &T) -> Ordering) -> impl Iterator<Item = T> {
    let mut order: Vec<(u128, usize)> = items.iter().enumerate().map(|(i, item)| (prefix(key(item)), i)).collect();
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| cmp(&items[a.1], &items[b.1])));
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    order.into_iter().filter_map(move |(_, index)| slots.get_mut(index).and_then(Option::take))
}

/// Updates in (key, slot, epoch) order with the differences of equal neighbours summed and
/// those that sum to zero left out.
fn consolidated(sorted: impl Iterator<Item = SlotUpdate>, capacity: usize) -> Vec<SlotUpdate> {
    let mut out: Vec<SlotUpdate> = Vec::with_capacity(capacity);
    for update in sorted {
        match out.last_mut() {
            Some(last) if last.1 == update.1 && last.0 == update.0 => last.2 += update.2,
            _ => out.push(update),
        }
    }
    out.retain(|u| u.2 != 0);
    out
}

/// A number that orders keys as their `Ord` does wherever two numbers differ (equal numbers say
/// nothing): the key's variant and datum kind, then, for integers, the value and, for strings,
/// their first eight bytes.
fn prefix(key: &Key) -> u128 {
    let (rank, bits): (u128, u64) = match key {
        Key::One(datum) => match datum {
            Datum::Null => (0, 0),
            Datum::Bool(b) => (1, u64::from(*b)),
            Datum::Int(i) => (2, (*i as u64) ^ (1 << 63)),
            Datum::UInt(u) => (3, *u),
            Datum::Float(_) => (4, 0),
            Datum::Str(s) => {
                let mut head = [0u8; 8];
                let n = s.len().min(8);
                head[..n].copy_from_slice(&s.as_bytes()[..n]);
                (5, u64::from_be_bytes(head))
            }
        },
        Key::Many(_) => (6, 0),
    };
    (rank << 64) | u128::from(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acc::Acc;
    use crate::features::Accs;
    use proptest::prelude::*;
    use sundial_protocol::value::F64;

    fn datum() -> impl Strategy<Value = Datum> {
        prop_oneof![
            Just(Datum::Null),
            any::<bool>().prop_map(Datum::Bool),
            any::<i64>().prop_map(Datum::Int),
            prop_oneof![any::<u64>(), 0u64..4].prop_map(Datum::UInt),
            any::<f64>().prop_map(|f| Datum::Float(F64(f))),
            "[a-c]{0,10}".prop_map(|s| Datum::Str(s.into())),
        ]
    }

    fn key() -> impl Strategy<Value = Key> {
        prop_oneof![
            datum().prop_map(Key::One),
            prop::collection::vec(datum(), 1..3).prop_map(|d| Key::Many(d.into_boxed_slice())),
        ]
    }

    fn update() -> impl Strategy<Value = SlotUpdate> {
        (key(), 0u32..3, 0i64..3, 0u64..3, 1u64..4, -2isize..3).prop_map(|(k, group, start, n, epoch, diff)| {
            let slot = Slot { group, start, end: start + 1, accs: Accs::One(Acc::Count(n)) };
            ((k, slot), epoch, diff)
        })
    }

    /// A batch's updates, in its order.
    fn contents(batch: Option<OrdValBatch<Vector<SlotUpdate>>>) -> Vec<SlotUpdate> {
        use differential_dataflow::trace::cursor::{Cursor, Navigable};
        let mut out = Vec::new();
        let Some(batch) = batch else { return out };
        let mut cursor = batch.cursor();
        while cursor.key_valid(&batch) {
            while cursor.val_valid(&batch) {
                let (key, val) = (cursor.key(&batch).clone(), cursor.val(&batch).clone());
                cursor.map_times(&batch, |t, r| out.push(((key.clone(), val.clone()), *t, *r)));
                cursor.step_val(&batch);
            }
            cursor.step_key(&batch);
        }
        out
    }

    /// Whether `prefix` agrees with `Ord` on two keys.
    fn prefix_agrees(a: &Key, b: &Key) -> bool {
        match prefix(a).cmp(&prefix(b)) {
            Ordering::Equal => true,
            order => order == a.cmp(b),
        }
    }

    proptest! {
        #[test]
        fn prefixes_order_keys_as_ord_does(a in key(), b in key()) {
            prop_assert!(prefix_agrees(&a, &b));
        }

        #[test]
        fn runs_sealed_together_are_the_sorted_whole(
            runs in prop::collection::vec(prop::collection::vec(update(), 0..60), 0..5),
            chunk in 1usize..8,
        ) {
            let whole: Vec<SlotUpdate> = runs.iter().flatten().cloned().collect();
            let sorted: Vec<Vec<SlotUpdate>> = runs.into_iter().map(sort_and_consolidate).collect();
            prop_assert!(sorted.iter().all(|r| is_run(r)));
            let expected = sort_and_consolidate(whole);
            prop_assert_eq!(contents(seal_runs_in(sorted.clone(), chunk)), expected.clone());
            prop_assert_eq!(contents(seal_runs(sorted)), expected);
        }

        #[test]
        fn sorted_and_consolidated_as_a_plain_sort_does(updates in prop::collection::vec(update(), 0..200)) {
            let mut expected: Vec<SlotUpdate> = Vec::new();
            let mut plain = updates.clone();
            plain.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
            for u in plain {
                match expected.last_mut() {
                    Some(last) if last.0 == u.0 && last.1 == u.1 => last.2 += u.2,
                    _ => expected.push(u),
                }
            }
            expected.retain(|u| u.2 != 0);
            prop_assert_eq!(sort_and_consolidate(updates.clone()), expected.clone());
            // One epoch's changes as the aggregate hands them over.
            let one: Vec<SlotUpdate> = updates.into_iter().map(|(d, _, r)| (d, 1, r)).collect();
            let mut expected: Vec<SlotUpdate> = Vec::new();
            let mut plain = one.clone();
            plain.sort_by(|x, y| x.0.cmp(&y.0));
            for u in plain {
                match expected.last_mut() {
                    Some(last) if last.0 == u.0 => last.2 += u.2,
                    _ => expected.push(u),
                }
            }
            expected.retain(|u| u.2 != 0);
            prop_assert_eq!(epoch_in_order(one.into_iter().map(|(d, _, r)| (d, r)).collect(), 1), expected);
        }
    }
}
