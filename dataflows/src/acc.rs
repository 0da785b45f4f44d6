//! Accumulators: the mergeable partial aggregate of one feature over one pane (or session).
//!
//! Every accumulator can take one value at a time and can merge another of its kind, so that a
//! hopping window is the merge of its panes. Integer sums and moments are exact (i128); float
//! ones are f64. `first` and `last` break ties in event time by the value, so the result does not
//! depend on arrival order. Only `count_distinct` grows with its input (it keeps the distinct
//! values); the sketches are bounded (HyperLogLog: at most 2^p bytes; DDSketch: one counter per
//! occupied logarithmic bucket, a few hundred over many orders of magnitude), `last_k` and
//! `top_k` hold k values, every other accumulator is a few words.
//!
//! The sketches are written here rather than taken from crates: an accumulator lives inside the
//! arrangement's slots and the checkpoints, so it must be `Ord`, `Hash`, `Clone` and serde, and
//! merge exactly; the HyperLogLog and DDSketch crates' types are not `Ord`/`Hash` and keep
//! state (hashers, configuration) that does not belong in every slot.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use sundial_protocol::plan::{Agg, AggParams, FieldType};
use sundial_protocol::value::{Datum, F64};

/// A partial aggregate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Acc {
    /// `count`.
    Count(u64),
    /// Integer `sum` and `avg`.
    SumInt {
        /// Values taken.
        n: u64,
        /// Their sum.
        sum: Wide,
    },
    /// Float `sum` and `avg`.
    SumFloat {
        /// Values taken.
        n: u64,
        /// Their sum.
        sum: F64,
    },
    /// Integer `variance` and `stddev` (boxed: three wide words would double every
    /// accumulator's size).
    MomentsInt(Box<MomentsInt>),
    /// Float `variance` and `stddev`.
    MomentsFloat {
        /// Values taken.
        n: u64,
        /// Their sum.
        sum: F64,
        /// The sum of their squares.
        sumsq: F64,
    },
    /// `min` (null until a value is taken).
    Min(Datum),
    /// `max`.
    Max(Datum),
    /// `count_distinct`: the distinct values.
    Distinct(BTreeSet<Datum>),
    /// `first`: the value with the smallest event time.
    First(Option<Box<(i64, Datum)>>),
    /// `last`: the value with the largest event time.
    Last(Option<Box<(i64, Datum)>>),
    /// `approx_distinct`: a HyperLogLog sketch of the values' hashes.
    Hll(Box<Hll>),
    /// `approx_quantile`: a DDSketch of the values.
    Quantiles(Box<DdSketch>),
    /// `last_k`: the k most recent (time, value), most recent first; ties in time by value.
    LastK {
        /// How many.
        k: u32,
        /// The values, sorted by (time, value) descending.
        items: Vec<(i64, Datum)>,
    },
    /// `top_k`: the k largest values, largest first.
    TopK {
        /// How many.
        k: u32,
        /// The values, descending.
        items: Vec<Datum>,
    },
    /// `exp_decay_sum`: the decayed sum as of a reference time, so that merging and reading
    /// need no history.
    ExpDecay(Box<ExpDecay>),
}

/// An `i128` stored as two words, so that accumulators holding one are aligned to 8 bytes, not
/// 16 (the order of `(hi, lo)` is the order of the number). Serialized as the `i128` it is, so
/// that checkpoints written before it existed still read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Wide {
    hi: i64,
    lo: u64,
}

impl Wide {
    /// The number.
    pub fn get(self) -> i128 {
        (i128::from(self.hi) << 64) | i128::from(self.lo)
    }

    fn add(&mut self, x: i128) {
        *self = Wide::from(self.get().wrapping_add(x));
    }
}

impl Serialize for Wide {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_i128(self.get())
    }
}

impl<'de> Deserialize<'de> for Wide {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Wide, D::Error> {
        i128::deserialize(deserializer).map(Wide::from)
    }
}

impl From<i128> for Wide {
    fn from(x: i128) -> Wide {
        Wide { hi: (x >> 64) as i64, lo: x as u64 }
    }
}

/// The moments of integer values: exact while they fit in 128 bits.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MomentsInt {
    /// Values taken.
    pub n: u64,
    /// Their sum.
    pub sum: i128,
    /// The sum of their squares (saturating).
    pub sumsq: i128,
}

/// An exponentially decayed sum scaled to `reference`, the largest event time taken:
/// `value(now) = sum * 2^-((now - reference) / half_life)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExpDecay {
    /// The half-life.
    pub half_life_ms: u64,
    /// The time the sum is scaled to.
    pub reference: Option<i64>,
    /// The sum of value * 2^-((reference - t) / half_life).
    pub sum: F64,
}

/// A HyperLogLog sketch with 2^p registers, sparse (sorted (register, rank) pairs) while few
/// registers are set and dense afterwards. Relative standard error 1.04 / sqrt(2^p).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hll {
    /// Precision p.
    pub p: u8,
    /// Set registers while sparse.
    pub sparse: Vec<(u16, u8)>,
    /// All registers once dense (empty while sparse).
    pub dense: Vec<u8>,
}

impl Hll {
    fn new(p: u8) -> Hll {
        Hll { p: p.clamp(4, 16), sparse: Vec::new(), dense: Vec::new() }
    }

    fn m(&self) -> usize {
        1 << self.p
    }

    fn set(&mut self, index: u16, rank: u8) {
        if !self.dense.is_empty() {
            let r = &mut self.dense[index as usize];
            *r = (*r).max(rank);
            return;
        }
        match self.sparse.binary_search_by_key(&index, |(i, _)| *i) {
            Ok(at) => self.sparse[at].1 = self.sparse[at].1.max(rank),
            Err(at) => self.sparse.insert(at, (index, rank)),
        }
        // Dense takes m bytes; sparse 2 words per register: switch when that is smaller.
        if self.sparse.len() * 4 > self.m() {
            let mut dense = vec![0u8; self.m()];
            for (i, r) in self.sparse.drain(..) {
                dense[i as usize] = r;
            }
            self.dense = dense;
        }
    }

    fn add_hash(&mut self, hash: u64) {
        let p = u32::from(self.p);
        let index = (hash >> (64 - p)) as u16;
        let rest = (hash << p) | (1 << (p - 1));
        let rank = (rest.leading_zeros() + 1) as u8;
        self.set(index, rank);
    }

    fn merge(&mut self, other: &Hll) {
        if other.p != self.p {
            return;
        }
        if other.dense.is_empty() {
            for &(i, r) in &other.sparse {
                self.set(i, r);
            }
        } else {
            for (i, &r) in other.dense.iter().enumerate() {
                if r > 0 {
                    self.set(i as u16, r);
                }
            }
        }
    }

    /// The estimated number of distinct values.
    pub fn estimate(&self) -> u64 {
        let m = self.m() as f64;
        let (sum, zeros) = if self.dense.is_empty() {
            let set: f64 = self.sparse.iter().map(|(_, r)| 2f64.powi(-i32::from(*r))).sum();
            (set + (self.m() - self.sparse.len()) as f64, self.m() - self.sparse.len())
        } else {
            let sum = self.dense.iter().map(|r| 2f64.powi(-i32::from(*r))).sum();
            (sum, self.dense.iter().filter(|r| **r == 0).count())
        };
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw };
        estimate.round() as u64
    }
}

/// A DDSketch (Masson et al., 2019) with relative accuracy [`DdSketch::ALPHA`]: every value
/// falls in a logarithmic bucket, and a quantile is answered with its bucket's representative
/// value, within 1% of a value of that rank. Mergeable by adding bucket counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DdSketch {
    /// Values taken.
    pub count: u64,
    /// Values equal to zero.
    pub zeros: u64,
    /// Bucket index → count, for positive values.
    pub positive: std::collections::BTreeMap<i32, u64>,
    /// Bucket index (of the magnitude) → count, for negative values.
    pub negative: std::collections::BTreeMap<i32, u64>,
}

impl DdSketch {
    /// The relative accuracy.
    pub const ALPHA: f64 = 0.01;

    fn gamma() -> f64 {
        (1.0 + Self::ALPHA) / (1.0 - Self::ALPHA)
    }

    fn index(x: f64) -> i32 {
        (x.ln() / Self::gamma().ln()).ceil() as i32
    }

    fn value_of(index: i32) -> f64 {
        let g = Self::gamma();
        2.0 * g.powi(index) / (g + 1.0)
    }

    fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.count += 1;
        if x > 0.0 {
            *self.positive.entry(Self::index(x)).or_default() += 1;
        } else if x < 0.0 {
            *self.negative.entry(Self::index(-x)).or_default() += 1;
        } else {
            self.zeros += 1;
        }
    }

    fn merge(&mut self, other: &DdSketch) {
        self.count += other.count;
        self.zeros += other.zeros;
        for (i, c) in &other.positive {
            *self.positive.entry(*i).or_default() += c;
        }
        for (i, c) in &other.negative {
            *self.negative.entry(*i).or_default() += c;
        }
    }

    /// The estimated `q` quantile (`None` when empty).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        for (i, c) in self.negative.iter().rev() {
            seen += c;
            if seen > rank {
                return Some(-Self::value_of(*i));
            }
        }
        seen += self.zeros;
        if seen > rank {
            return Some(0.0);
        }
        for (i, c) in &self.positive {
            seen += c;
            if seen > rank {
                return Some(Self::value_of(*i));
            }
        }
        self.positive.keys().next_back().map(|i| Self::value_of(*i))
    }
}

fn decay(delta_ms: i64, half_life_ms: u64) -> f64 {
    2f64.powf(-(delta_ms as f64) / half_life_ms.max(1) as f64)
}

/// The hash of a value for sketches (the same mix as key sharding, so values of one key spread).
fn value_hash(v: &Datum) -> u64 {
    sundial_protocol::value::Key::One(v.clone()).hash64()
}

impl Acc {
    /// The empty accumulator of `agg` over a field of type `ty` (none for a plain count), with
    /// default parameters (k = 1, precision 12, a half-life of 1 ms).
    pub fn new(agg: Agg, ty: Option<FieldType>) -> Acc {
        Acc::with_params(agg, ty, &AggParams::default())
    }

    /// The empty accumulator of `agg` with parameters `params` (unset ones take the defaults of
    /// [`Acc::new`]), over a field of type `ty`.
    pub fn with_params(agg: Agg, ty: Option<FieldType>, params: &AggParams) -> Acc {
        let float = ty == Some(FieldType::F64);
        match agg {
            Agg::Count => Acc::Count(0),
            Agg::Sum | Agg::Avg if float => Acc::SumFloat { n: 0, sum: F64(0.0) },
            Agg::Sum | Agg::Avg => Acc::SumInt { n: 0, sum: Wide::default() },
            Agg::Variance | Agg::Stddev if float => Acc::MomentsFloat { n: 0, sum: F64(0.0), sumsq: F64(0.0) },
            Agg::Variance | Agg::Stddev => Acc::MomentsInt(Box::default()),
            Agg::Min => Acc::Min(Datum::Null),
            Agg::Max => Acc::Max(Datum::Null),
            Agg::CountDistinct => Acc::Distinct(BTreeSet::new()),
            Agg::First => Acc::First(None),
            Agg::Last => Acc::Last(None),
            Agg::ApproxDistinct => {
                Acc::Hll(Box::new(Hll::new(if params.precision == 0 { 12 } else { params.precision })))
            }
            Agg::ApproxQuantile => Acc::Quantiles(Box::default()),
            Agg::LastK => Acc::LastK { k: params.k.max(1), items: Vec::new() },
            Agg::TopK => Acc::TopK { k: params.k.max(1), items: Vec::new() },
            Agg::ExpDecaySum => Acc::ExpDecay(Box::new(ExpDecay {
                half_life_ms: params.half_life_ms.max(1),
                reference: None,
                sum: F64(0.0),
            })),
        }
    }

    /// Takes one event: its time and the aggregated field's value (`None` for a plain count).
    /// Nulls are skipped by every aggregate but a plain count.
    pub fn add(&mut self, time: i64, value: Option<&Datum>) {
        if let (Acc::Count(c), None) = (&mut *self, value) {
            *c += 1;
            return;
        }
        let Some(v) = value.filter(|v| **v != Datum::Null) else {
            return;
        };
        match self {
            Acc::Count(c) => *c += 1,
            Acc::SumInt { n, sum } => {
                *n += 1;
                sum.add(v.as_i128().unwrap_or(0));
            }
            Acc::SumFloat { n, sum } => {
                *n += 1;
                sum.0 += v.as_f64().unwrap_or(0.0);
            }
            Acc::MomentsInt(m) => {
                let x = v.as_i128().unwrap_or(0);
                m.n += 1;
                m.sum += x;
                m.sumsq = m.sumsq.saturating_add(x.saturating_mul(x));
            }
            Acc::MomentsFloat { n, sum, sumsq } => {
                let x = v.as_f64().unwrap_or(0.0);
                *n += 1;
                sum.0 += x;
                sumsq.0 += x * x;
            }
            Acc::Min(m) => {
                if *m == Datum::Null || v < m {
                    *m = v.clone();
                }
            }
            Acc::Max(m) => {
                if *m == Datum::Null || v > m {
                    *m = v.clone();
                }
            }
            Acc::Distinct(set) => {
                if !set.contains(v) {
                    set.insert(v.clone());
                }
            }
            Acc::First(cur) => {
                if cur.as_deref().is_none_or(|(t, d)| (time, v) < (*t, d)) {
                    *cur = Some(Box::new((time, v.clone())));
                }
            }
            Acc::Last(cur) => {
                if cur.as_deref().is_none_or(|(t, d)| (time, v) > (*t, d)) {
                    *cur = Some(Box::new((time, v.clone())));
                }
            }
            Acc::Hll(h) => h.add_hash(value_hash(v)),
            Acc::Quantiles(s) => {
                if let Some(x) = v.as_f64() {
                    s.add(x);
                }
            }
            Acc::LastK { k, items } => {
                let item = (time, v.clone());
                let at = items.partition_point(|x| *x > item);
                if at < *k as usize {
                    items.insert(at, item);
                    items.truncate(*k as usize);
                }
            }
            Acc::TopK { k, items } => {
                let at = items.partition_point(|x| x > v);
                if at < *k as usize {
                    items.insert(at, v.clone());
                    items.truncate(*k as usize);
                }
            }
            Acc::ExpDecay(e) => {
                let Some(x) = v.as_f64() else { return };
                match e.reference {
                    None => {
                        e.reference = Some(time);
                        e.sum.0 = x;
                    }
                    Some(r) if time > r => {
                        e.sum.0 = e.sum.0 * decay(time - r, e.half_life_ms) + x;
                        e.reference = Some(time);
                    }
                    Some(r) => e.sum.0 += x * decay(r - time, e.half_life_ms),
                }
            }
        }
    }

    /// Merges another accumulator of the same kind into this one.
    pub fn merge(&mut self, other: &Acc) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::SumInt { n, sum }, Acc::SumInt { n: n2, sum: s2 }) => {
                *n += n2;
                sum.add(s2.get());
            }
            (Acc::SumFloat { n, sum }, Acc::SumFloat { n: n2, sum: s2 }) => {
                *n += n2;
                sum.0 += s2.0;
            }
            (Acc::MomentsInt(a), Acc::MomentsInt(b)) => {
                a.n += b.n;
                a.sum += b.sum;
                a.sumsq = a.sumsq.saturating_add(b.sumsq);
            }
            (Acc::MomentsFloat { n, sum, sumsq }, Acc::MomentsFloat { n: n2, sum: s2, sumsq: q2 }) => {
                *n += n2;
                sum.0 += s2.0;
                sumsq.0 += q2.0;
            }
            (Acc::Min(a), Acc::Min(b)) if *b != Datum::Null && (*a == Datum::Null || b < a) => *a = b.clone(),
            (Acc::Max(a), Acc::Max(b)) if *b != Datum::Null && (*a == Datum::Null || b > a) => *a = b.clone(),
            (Acc::Distinct(a), Acc::Distinct(b)) => a.extend(b.iter().cloned()),
            (Acc::First(a), Acc::First(Some(b))) if a.as_ref().is_none_or(|x| b < x) => *a = Some(b.clone()),
            (Acc::Last(a), Acc::Last(Some(b))) if a.as_ref().is_none_or(|x| b > x) => *a = Some(b.clone()),
            (Acc::Hll(a), Acc::Hll(b)) => a.merge(b),
            (Acc::Quantiles(a), Acc::Quantiles(b)) => a.merge(b),
            (Acc::LastK { k, items }, Acc::LastK { items: more, .. }) => {
                items.extend(more.iter().cloned());
                items.sort_by(|a, b| b.cmp(a));
                items.truncate(*k as usize);
            }
            (Acc::TopK { k, items }, Acc::TopK { items: more, .. }) => {
                items.extend(more.iter().cloned());
                items.sort_by(|a, b| b.cmp(a));
                items.truncate(*k as usize);
            }
            (Acc::ExpDecay(a), Acc::ExpDecay(b)) => {
                let Some(r2) = b.reference else { return };
                match a.reference {
                    None => {
                        a.reference = Some(r2);
                        a.sum = b.sum;
                    }
                    Some(r) if r2 > r => {
                        a.sum.0 = a.sum.0 * decay(r2 - r, a.half_life_ms) + b.sum.0;
                        a.reference = Some(r2);
                    }
                    Some(r) => a.sum.0 += b.sum.0 * decay(r - r2, a.half_life_ms),
                }
            }
            _ => {}
        }
    }

    /// A `last_k` or `top_k` without values (shown as null, like every empty aggregate).
    fn is_empty_list(&self) -> bool {
        match self {
            Acc::LastK { items, .. } => items.is_empty(),
            Acc::TopK { items, .. } => items.is_empty(),
            _ => false,
        }
    }

    /// The feature's value as results show it, with its parameters and the read's "now" (the
    /// source's largest event time), which decayed sums are read at.
    pub fn value_at(&self, agg: Agg, params: &AggParams, now: Option<i64>) -> Value {
        let float = |f: f64| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
        match self {
            Acc::Quantiles(s) => {
                let one = |q: f64| s.quantile(q).map_or(Value::Null, float);
                match params.quantiles.as_slice() {
                    [q] => one(*q),
                    [] => one(0.5),
                    many => Value::Object(many.iter().map(|q| (q.to_string(), one(*q))).collect()),
                }
            }
            Acc::ExpDecay(e) => match e.reference {
                None => Value::Null,
                Some(r) => float(e.sum.0 * decay(now.map_or(0, |n| n - r), e.half_life_ms)),
            },
            _ => self.value(agg),
        }
    }

    /// The feature's value as results show it.
    pub fn value(&self, agg: Agg) -> Value {
        let float = |f: f64| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
        let variance_f = |n: u64, sum: f64, sumsq: f64| {
            let n = n as f64;
            let mean = sum / n;
            (sumsq / n - mean * mean).max(0.0)
        };
        let finish = |var: f64| {
            if agg == Agg::Stddev {
                float(var.sqrt())
            } else {
                float(var)
            }
        };
        match self {
            Acc::Count(c) => (*c).into(),
            Acc::SumInt { n: 0, .. } | Acc::SumFloat { n: 0, .. } => Value::Null,
            Acc::MomentsInt(m) if m.n == 0 => Value::Null,
            Acc::MomentsFloat { n: 0, .. } => Value::Null,
            Acc::SumInt { n, sum } => match agg {
                Agg::Avg => float(sum.get() as f64 / *n as f64),
                _ => i64::try_from(sum.get()).map_or_else(|_| float(sum.get() as f64), Value::from),
            },
            Acc::SumFloat { n, sum } => match agg {
                Agg::Avg => float(sum.0 / *n as f64),
                _ => float(sum.0),
            },
            Acc::MomentsInt(m) => {
                let (n, sum, sumsq) = (&m.n, &m.sum, &m.sumsq);
                // Exact numerator n*sumsq - sum^2, divided once.
                let n128 = i128::from(*n);
                let var = match n128.checked_mul(*sumsq).and_then(|a| sum.checked_mul(*sum).map(|b| a - b)) {
                    Some(num) => num as f64 / (n128 * n128) as f64,
                    None => variance_f(*n, *sum as f64, *sumsq as f64),
                };
                finish(var.max(0.0))
            }
            Acc::MomentsFloat { n, sum, sumsq } => finish(variance_f(*n, sum.0, sumsq.0)),
            Acc::Min(d) | Acc::Max(d) => d.to_json(),
            Acc::Distinct(set) => (set.len() as u64).into(),
            Acc::First(v) | Acc::Last(v) => v.as_deref().map_or(Value::Null, |(_, d)| d.to_json()),
            Acc::Hll(h) => h.estimate().into(),
            Acc::Quantiles(s) => s.quantile(0.5).map_or(Value::Null, float),
            Acc::LastK { .. } | Acc::TopK { .. } if self.is_empty_list() => Value::Null,
            Acc::LastK { items, .. } => Value::Array(items.iter().map(|(_, d)| d.to_json()).collect()),
            Acc::TopK { items, .. } => Value::Array(items.iter().map(Datum::to_json).collect()),
            Acc::ExpDecay(e) if e.reference.is_none() => Value::Null,
            Acc::ExpDecay(e) => float(e.sum.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(i: i64) -> Datum {
        Datum::Int(i)
    }

    #[test]
    fn aggregates_and_merges() {
        let values = [5, -3, 9, 9, 0];
        let mut all: Vec<(Agg, Acc)> = [
            Agg::Count,
            Agg::Sum,
            Agg::Avg,
            Agg::Min,
            Agg::Max,
            Agg::Variance,
            Agg::Stddev,
            Agg::CountDistinct,
            Agg::First,
            Agg::Last,
        ]
        .into_iter()
        .map(|a| (a, Acc::new(a, Some(FieldType::I64))))
        .collect();
        // Split in two panes and merge: same as taking everything in one.
        for (agg, acc) in &mut all {
            let mut left = Acc::new(*agg, Some(FieldType::I64));
            let mut right = Acc::new(*agg, Some(FieldType::I64));
            for (t, v) in values.iter().enumerate() {
                let target = if t % 2 == 0 { &mut left } else { &mut right };
                target.add(t as i64, Some(&int(*v)));
            }
            left.merge(&right);
            *acc = left;
        }
        let got: Vec<Value> = all.iter().map(|(agg, acc)| acc.value(*agg)).collect();
        let mean = 4.0;
        let var = values.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / 5.0;
        assert_eq!(got[0], 5);
        assert_eq!(got[1], 20);
        assert_eq!(got[2], 4.0);
        assert_eq!(got[3], -3);
        assert_eq!(got[4], 9);
        assert!((got[5].as_f64().unwrap() - var).abs() < 1e-9);
        assert!((got[6].as_f64().unwrap() - var.sqrt()).abs() < 1e-9);
        assert_eq!(got[7], 4);
        assert_eq!(got[8], 5);
        assert_eq!(got[9], 0);
    }

    fn params(precision: u8, quantiles: &[f64]) -> AggParams {
        AggParams { precision, quantiles: quantiles.to_vec(), k: 3, half_life_ms: 1_000 }
    }

    #[test]
    fn hyperloglog_is_within_its_bound_on_a_million_distinct_values_and_merges() {
        for p in [10u8, 12, 14] {
            let bound = 1.04 / f64::from(1u32 << p).sqrt();
            let (mut whole, mut left, mut right) = (
                Acc::with_params(Agg::ApproxDistinct, Some(FieldType::U64), &params(p, &[])),
                Acc::with_params(Agg::ApproxDistinct, Some(FieldType::U64), &params(p, &[])),
                Acc::with_params(Agg::ApproxDistinct, Some(FieldType::U64), &params(p, &[])),
            );
            let n = 1_000_000u64;
            for i in 0..n {
                // Every value twice: duplicates do not count.
                let v = Datum::UInt(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                whole.add(0, Some(&v));
                whole.add(0, Some(&v));
                if i % 3 == 0 {
                    left.add(0, Some(&v))
                } else {
                    right.add(0, Some(&v))
                }
            }
            left.merge(&right);
            assert_eq!(left, whole, "merging halves gives the same sketch");
            let estimate = whole.value(Agg::ApproxDistinct).as_u64().unwrap() as f64;
            let error = (estimate - n as f64).abs() / n as f64;
            assert!(
                error < 3.0 * bound,
                "p={p}: estimate {estimate}, error {error:.4} over 3x the standard error {bound:.4}"
            );
        }
        // Small sets are (nearly) exact, and sparse.
        let mut small = Acc::with_params(Agg::ApproxDistinct, Some(FieldType::U64), &params(12, &[]));
        for i in 0..100u64 {
            small.add(0, Some(&Datum::UInt(i)));
        }
        assert!((98..=102).contains(&small.value(Agg::ApproxDistinct).as_u64().unwrap()));
        let Acc::Hll(h) = &small else { unreachable!() };
        assert!(h.dense.is_empty() && h.sparse.len() <= 100);
    }

    #[test]
    fn ddsketch_quantiles_are_within_one_percent_of_the_exact_ones() {
        let qs = [0.01, 0.25, 0.5, 0.9, 0.99, 0.999];
        let mut values: Vec<f64> = (0..200_000u64)
            .map(|i| {
                // A long-tailed mix of negative, zero and positive values.
                let x = ((i.wrapping_mul(2_654_435_761) % 1_000_003) as f64 / 1_000_003.0).powi(3) * 1e6;
                if i % 10 == 0 {
                    -x
                } else if i % 97 == 0 {
                    0.0
                } else {
                    x
                }
            })
            .collect();
        let mut sketch = Acc::with_params(Agg::ApproxQuantile, Some(FieldType::F64), &params(0, &qs));
        let mut halves = [
            Acc::with_params(Agg::ApproxQuantile, Some(FieldType::F64), &params(0, &qs)),
            Acc::with_params(Agg::ApproxQuantile, Some(FieldType::F64), &params(0, &qs)),
        ];
        for (i, v) in values.iter().enumerate() {
            sketch.add(0, Some(&Datum::Float(F64(*v))));
            halves[i % 2].add(0, Some(&Datum::Float(F64(*v))));
        }
        let [mut a, b] = halves;
        a.merge(&b);
        assert_eq!(a, sketch);
        values.sort_by(f64::total_cmp);
        let got = sketch.value_at(Agg::ApproxQuantile, &params(0, &qs), None);
        for q in qs {
            let exact = values[(q * (values.len() - 1) as f64).floor() as usize];
            let estimate = got[q.to_string()].as_f64().unwrap();
            assert!(
                (estimate - exact).abs() <= DdSketch::ALPHA * exact.abs() + 1e-9,
                "q={q}: estimate {estimate}, exact {exact}"
            );
        }
        let one = sketch.value_at(Agg::ApproxQuantile, &params(0, &[0.5]), None);
        assert_eq!(one, got["0.5"]);
    }

    #[test]
    fn last_k_top_k_and_decayed_sums_merge_exactly() {
        let p = params(0, &[]);
        let make = |agg| Acc::with_params(agg, Some(FieldType::I64), &p);
        let (mut last, mut top, mut decay) = (make(Agg::LastK), make(Agg::TopK), make(Agg::ExpDecaySum));
        let (mut last2, mut top2, mut decay2) = (make(Agg::LastK), make(Agg::TopK), make(Agg::ExpDecaySum));
        for (t, v) in [(5, 10), (1, 50), (9, 7), (9, 8), (3, 1)] {
            for acc in [&mut last, &mut top, &mut decay] {
                acc.add(t, Some(&int(v)));
            }
        }
        for (t, v) in [(9, 8), (3, 1)] {
            for acc in [&mut last2, &mut top2, &mut decay2] {
                acc.add(t, Some(&int(v)));
            }
        }
        let (mut last1, mut top1, mut decay1) = (make(Agg::LastK), make(Agg::TopK), make(Agg::ExpDecaySum));
        for (t, v) in [(5, 10), (1, 50), (9, 7)] {
            for acc in [&mut last1, &mut top1, &mut decay1] {
                acc.add(t, Some(&int(v)));
            }
        }
        last1.merge(&last2);
        top1.merge(&top2);
        decay1.merge(&decay2);
        assert_eq!(last1, last);
        assert_eq!(top1, top);
        assert_eq!(last.value(Agg::LastK), serde_json::json!([8, 7, 10]), "most recent first, ties by value");
        assert_eq!(top.value(Agg::TopK), serde_json::json!([50, 10, 8]));
        // At now = 9 with a 1 s half-life: sum of v * 2^-((9 - t) / 1000).
        let want: f64 = [(5, 10.0), (1, 50.0), (9, 7.0), (9, 8.0), (3, 1.0)]
            .iter()
            .map(|(t, v)| v * 2f64.powf(-((9 - t) as f64) / 1000.0))
            .sum();
        for acc in [&decay, &decay1] {
            let got = acc.value_at(Agg::ExpDecaySum, &p, Some(9)).as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        // Read an hour later, it has halved 3.6 times.
        let later = decay.value_at(Agg::ExpDecaySum, &p, Some(9 + 3_600)).as_f64().unwrap();
        assert!((later - want * 2f64.powf(-3.6)).abs() < 1e-9);
    }

    #[test]
    fn accumulators_are_four_words() {
        // Every slot of every pane holds one per feature: the common ones stay inline.
        assert_eq!(std::mem::size_of::<Acc>(), 32);
        let mut s = Acc::new(Agg::Sum, Some(FieldType::I64));
        s.add(0, Some(&int(i64::MAX)));
        s.add(0, Some(&int(i64::MAX)));
        s.add(0, Some(&int(-3)));
        let Acc::SumInt { sum, .. } = &s else { unreachable!() };
        assert_eq!(sum.get(), 2 * i128::from(i64::MAX) - 3);
        let (a, b) = (Wide::from(-1), Wide::from(1));
        assert!(a < b && Wide::from(i128::MIN) < a && b < Wide::from(i128::MAX));
    }

    #[test]
    fn checkpoints_of_the_earlier_layout_still_read() {
        // Before accumulators shrank, sums were plain i128 and the big variants were not boxed;
        // boxing does not change an encoding, and `Wide` encodes as an i128.
        #[derive(Serialize)]
        enum Before {
            #[allow(dead_code)]
            Count(u64),
            SumInt {
                n: u64,
                sum: i128,
            },
            #[allow(dead_code)]
            SumFloat {
                n: u64,
                sum: F64,
            },
            MomentsInt {
                n: u64,
                sum: i128,
                sumsq: i128,
            },
        }
        let sum = (1i128 << 70) - 5;
        let bytes =
            bincode::serialize(&vec![Before::SumInt { n: 3, sum }, Before::MomentsInt { n: 2, sum: -7, sumsq: 25 }])
                .unwrap();
        let now: Vec<Acc> = bincode::deserialize(&bytes).unwrap();
        assert_eq!(now[0], Acc::SumInt { n: 3, sum: Wide::from(sum) });
        assert_eq!(now[1], Acc::MomentsInt(Box::new(MomentsInt { n: 2, sum: -7, sumsq: 25 })));
        assert_eq!(bincode::serialize(&now).unwrap(), bytes, "and they are written the same way");
    }

    #[test]
    fn ties_in_time_break_by_value_whatever_the_order() {
        let mut a = Acc::new(Agg::Last, Some(FieldType::I64));
        let mut b = Acc::new(Agg::Last, Some(FieldType::I64));
        a.add(10, Some(&int(1)));
        a.add(10, Some(&int(2)));
        b.add(10, Some(&int(2)));
        b.add(10, Some(&int(1)));
        assert_eq!(a, b);
        assert_eq!(a.value(Agg::Last), 2);
    }

    #[test]
    fn nulls_are_skipped_and_empty_is_null() {
        let mut s = Acc::new(Agg::Sum, Some(FieldType::I64));
        s.add(1, Some(&Datum::Null));
        assert_eq!(s.value(Agg::Sum), Value::Null);
        let mut c = Acc::new(Agg::Count, Some(FieldType::I64));
        c.add(1, Some(&Datum::Null));
        c.add(1, Some(&int(3)));
        assert_eq!(c.value(Agg::Count), 1);
        let mut plain = Acc::new(Agg::Count, None);
        plain.add(1, None);
        assert_eq!(plain.value(Agg::Count), 1);
    }
}
