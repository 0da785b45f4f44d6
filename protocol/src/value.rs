//! Typed values of events and keys, and the key hash that decides which worker owns a key.
//!
//! The coordinator and the workers must agree on the owner of a key, so the hash lives here,
//! next to the types, and is a fixed function of the key's typed parts (not of `std`'s seeded
//! hasher).

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::plan::FieldType;

/// An f64 with a total order (`f64::total_cmp`), so values can be sorted, deduplicated and
/// arranged.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0) == Ordering::Equal
    }
}
impl Eq for F64 {}
impl PartialOrd for F64 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for F64 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl std::hash::Hash for F64 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

/// One typed value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Datum {
    /// No value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A float.
    Float(F64),
    /// A string.
    Str(Box<str>),
}

impl Datum {
    /// As JSON, for results.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Datum::Null => serde_json::Value::Null,
            Datum::Bool(b) => (*b).into(),
            Datum::Int(i) => (*i).into(),
            Datum::UInt(u) => (*u).into(),
            Datum::Float(f) => serde_json::Number::from_f64(f.0).map_or(serde_json::Value::Null, Into::into),
            Datum::Str(s) => s.as_ref().into(),
        }
    }

    /// The value as f64, for numeric aggregates.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Datum::Int(i) => Some(i as f64),
            Datum::UInt(u) => Some(u as f64),
            Datum::Float(f) => Some(f.0),
            _ => None,
        }
    }

    /// The value as i128, for exact integer aggregates.
    pub fn as_i128(&self) -> Option<i128> {
        match *self {
            Datum::Int(i) => Some(i128::from(i)),
            Datum::UInt(u) => Some(i128::from(u)),
            _ => None,
        }
    }

    /// Parses `text` as a value of `ty` (for key parts in URLs and CSV cells).
    pub fn parse(text: &str, ty: FieldType) -> Result<Datum, String> {
        match ty {
            FieldType::I64 => text.trim().parse().map(Datum::Int).map_err(|_| format!("{text:?} is not an i64")),
            FieldType::U64 => text.trim().parse().map(Datum::UInt).map_err(|_| format!("{text:?} is not a u64")),
            FieldType::F64 => match text.trim().parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(Datum::Float(F64(f))),
                _ => Err(format!("{text:?} is not a finite f64")),
            },
            FieldType::Bool => match text.trim() {
                "true" => Ok(Datum::Bool(true)),
                "false" => Ok(Datum::Bool(false)),
                _ => Err(format!("{text:?} is not a bool (true or false)")),
            },
            FieldType::String => Ok(Datum::Str(text.into())),
        }
    }
}

impl fmt::Display for Datum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Datum::Null => write!(f, "null"),
            Datum::Bool(b) => write!(f, "{b}"),
            Datum::Int(i) => write!(f, "{i}"),
            Datum::UInt(u) => write!(f, "{u}"),
            Datum::Float(x) => write!(f, "{}", x.0),
            Datum::Str(s) => write!(f, "{s}"),
        }
    }
}

/// The key of a group: the values of the key fields, in order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Key {
    /// A single-field key (no allocation for numbers).
    One(Datum),
    /// A composite key.
    Many(Box<[Datum]>),
}

impl From<&Key> for Key {
    fn from(key: &Key) -> Key {
        key.clone()
    }
}

impl Key {
    /// The parts of the key.
    pub fn parts(&self) -> &[Datum] {
        match self {
            Key::One(d) => std::slice::from_ref(d),
            Key::Many(ds) => ds,
        }
    }

    /// Builds a key from its parts.
    pub fn from_parts(mut parts: Vec<Datum>) -> Key {
        if parts.len() == 1 {
            if let Some(d) = parts.pop() {
                return Key::One(d);
            }
        }
        Key::Many(parts.into_boxed_slice())
    }

    /// The key as results show it: its parts as strings.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Array(self.parts().iter().map(|d| d.to_string().into()).collect())
    }

    /// The key's hash; its worker is `hash % peers`.
    pub fn hash64(&self) -> u64 {
        let mut h = Fnv::new();
        for part in self.parts() {
            match part {
                Datum::Null => h.byte(0),
                Datum::Bool(b) => {
                    h.byte(1);
                    h.byte(u8::from(*b));
                }
                // Integers hash by value, whatever their type, so that a key typed in a URL
                // finds the same worker as the event.
                Datum::Int(i) => {
                    h.byte(2);
                    h.bytes(&i128::from(*i).to_le_bytes());
                }
                Datum::UInt(u) => {
                    h.byte(2);
                    h.bytes(&i128::from(*u).to_le_bytes());
                }
                Datum::Float(f) => {
                    h.byte(3);
                    h.bytes(&f.0.to_bits().to_le_bytes());
                }
                Datum::Str(s) => {
                    h.byte(4);
                    h.bytes(&(s.len() as u64).to_le_bytes());
                    h.bytes(s.as_bytes());
                }
            }
        }
        mix(h.0)
    }
}

/// A 64-bit hash of bytes (FNV-1a, mixed), for spreading names such as batch ids.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.bytes(bytes);
    mix(h.0)
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn byte(&mut self, b: u8) {
        self.0 ^= u64::from(b);
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    fn bytes(&mut self, bs: &[u8]) {
        for &b in bs {
            self.byte(b);
        }
    }
}

/// A finalizer (splitmix64) so that the low bits, which pick the worker, are well mixed.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Parses a key from its parts as text (the path form `a,b` split at `,` and percent-decoded),
/// typed by the key fields' types.
pub fn parse_key(parts: &[&str], types: &[FieldType]) -> Result<Key, String> {
    if parts.len() != types.len() {
        return Err(format!("the key has {} parts but the dataflow's key has {} fields", parts.len(), types.len()));
    }
    let datums = parts.iter().zip(types).map(|(p, t)| Datum::parse(p, *t)).collect::<Result<Vec<_>, _>>()?;
    Ok(Key::from_parts(datums))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_keys_hash_alike_whatever_their_type() {
        assert_eq!(Key::One(Datum::Int(42)).hash64(), Key::One(Datum::UInt(42)).hash64());
        assert_ne!(Key::One(Datum::Int(42)).hash64(), Key::One(Datum::Int(43)).hash64());
        let a = Key::from_parts(vec![Datum::Str("a,b".into()), Datum::Int(1)]);
        let b = Key::from_parts(vec![Datum::Str("a".into()), Datum::Str("b,1".into())]);
        assert_ne!(a.hash64(), b.hash64());
    }

    #[test]
    fn key_paths_parse_by_type() {
        assert_eq!(parse_key(&["42"], &[FieldType::U64]), Ok(Key::One(Datum::UInt(42))));
        assert_eq!(parse_key(&["a,b"], &[FieldType::String]), Ok(Key::One(Datum::Str("a,b".into()))));
        assert_eq!(
            parse_key(&["7", "x"], &[FieldType::I64, FieldType::String]),
            Ok(Key::Many(vec![Datum::Int(7), Datum::Str("x".into())].into_boxed_slice()))
        );
        assert!(parse_key(&["x"], &[FieldType::U64]).unwrap_err().contains("not a u64"));
        assert!(parse_key(&["1"], &[FieldType::U64, FieldType::U64]).unwrap_err().contains("1 parts"));
    }

    #[test]
    fn hashes_spread_over_workers() {
        let mut counts = [0u32; 4];
        for i in 0..4000u64 {
            counts[(Key::One(Datum::UInt(i)).hash64() % 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
