//! Accumulators: the mergeable partial aggregate of one feature over one pane (or session).
//!
//! Every accumulator can take one value at a time and can merge another of its kind, so that a
//! hopping window is the merge of its panes. Integer sums and moments are exact (i128); float
//! ones are f64. `first` and `last` break ties in event time by the value, so the result does not
//! depend on arrival order. Only `count_distinct` grows with its input (it keeps the distinct
//! values); every other accumulator is a few words.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use sundial_protocol::plan::{Agg, FieldType};
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
        sum: i128,
    },
    /// Float `sum` and `avg`.
    SumFloat {
        /// Values taken.
        n: u64,
        /// Their sum.
        sum: F64,
    },
    /// Integer `variance` and `stddev`.
    MomentsInt {
        /// Values taken.
        n: u64,
        /// Their sum.
        sum: i128,
        /// The sum of their squares.
        sumsq: i128,
    },
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
    First(Option<(i64, Datum)>),
    /// `last`: the value with the largest event time.
    Last(Option<(i64, Datum)>),
}

impl Acc {
    /// The empty accumulator of `agg` over a field of type `ty` (none for a plain count).
    pub fn new(agg: Agg, ty: Option<FieldType>) -> Acc {
        let float = ty == Some(FieldType::F64);
        match agg {
            Agg::Count => Acc::Count(0),
            Agg::Sum | Agg::Avg if float => Acc::SumFloat { n: 0, sum: F64(0.0) },
            Agg::Sum | Agg::Avg => Acc::SumInt { n: 0, sum: 0 },
            Agg::Variance | Agg::Stddev if float => Acc::MomentsFloat { n: 0, sum: F64(0.0), sumsq: F64(0.0) },
            Agg::Variance | Agg::Stddev => Acc::MomentsInt { n: 0, sum: 0, sumsq: 0 },
            Agg::Min => Acc::Min(Datum::Null),
            Agg::Max => Acc::Max(Datum::Null),
            Agg::CountDistinct => Acc::Distinct(BTreeSet::new()),
            Agg::First => Acc::First(None),
            Agg::Last => Acc::Last(None),
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
                *sum += v.as_i128().unwrap_or(0);
            }
            Acc::SumFloat { n, sum } => {
                *n += 1;
                sum.0 += v.as_f64().unwrap_or(0.0);
            }
            Acc::MomentsInt { n, sum, sumsq } => {
                let x = v.as_i128().unwrap_or(0);
                *n += 1;
                *sum += x;
                *sumsq = sumsq.saturating_add(x.saturating_mul(x));
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
                if cur.as_ref().is_none_or(|(t, d)| (time, v) < (*t, d)) {
                    *cur = Some((time, v.clone()));
                }
            }
            Acc::Last(cur) => {
                if cur.as_ref().is_none_or(|(t, d)| (time, v) > (*t, d)) {
                    *cur = Some((time, v.clone()));
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
                *sum += s2;
            }
            (Acc::SumFloat { n, sum }, Acc::SumFloat { n: n2, sum: s2 }) => {
                *n += n2;
                sum.0 += s2.0;
            }
            (Acc::MomentsInt { n, sum, sumsq }, Acc::MomentsInt { n: n2, sum: s2, sumsq: q2 }) => {
                *n += n2;
                *sum += s2;
                *sumsq = sumsq.saturating_add(*q2);
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
            _ => {}
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
            Acc::MomentsInt { n: 0, .. } | Acc::MomentsFloat { n: 0, .. } => Value::Null,
            Acc::SumInt { n, sum } => match agg {
                Agg::Avg => float(*sum as f64 / *n as f64),
                _ => i64::try_from(*sum).map_or_else(|_| float(*sum as f64), Value::from),
            },
            Acc::SumFloat { n, sum } => match agg {
                Agg::Avg => float(sum.0 / *n as f64),
                _ => float(sum.0),
            },
            Acc::MomentsInt { n, sum, sumsq } => {
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
            Acc::First(v) | Acc::Last(v) => v.as_ref().map_or(Value::Null, |(_, d)| d.to_json()),
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
