//! Typed plans: what a validated source or dataflow definition becomes. The coordinator produces
//! them (crate `sundial-definition`), workers render them; a worker never sees user text.
//!
//! Durations are milliseconds; fields are referred to by their index in the source's schema.

use serde::{Deserialize, Serialize};

/// The type of a field of a source.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// 64-bit float.
    F64,
    /// true / false.
    Bool,
    /// UTF-8 text.
    String,
}

impl FieldType {
    /// The name users write.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::I64 => "i64",
            FieldType::U64 => "u64",
            FieldType::F64 => "f64",
            FieldType::Bool => "bool",
            FieldType::String => "string",
        }
    }

    /// True for i64, u64 and f64.
    pub fn is_numeric(self) -> bool {
        matches!(self, FieldType::I64 | FieldType::U64 | FieldType::F64)
    }
}

/// How the event-time field encodes time.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    /// Integer milliseconds since the Unix epoch.
    Ms,
    /// Integer seconds since the Unix epoch.
    S,
    /// An RFC 3339 string.
    Rfc3339,
}

/// One field of a source.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Field {
    /// Its name.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
}

/// A validated source.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourcePlan {
    /// Its name.
    pub name: String,
    /// Its fields, in a fixed order (the order of the definition).
    pub fields: Vec<Field>,
    /// Index of the event-time field.
    pub time: usize,
    /// How the event-time field encodes time.
    pub time_unit: TimeUnit,
    /// How far behind the largest event time the watermark trails.
    pub allowed_lateness_ms: u64,
    /// A partition without events for this long does not hold the watermark back.
    pub idle_timeout_ms: u64,
}

impl SourcePlan {
    /// The index of the field called `name`.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

/// An aggregation.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Agg {
    /// Number of events (with a field: of events where it is not null).
    Count,
    /// Sum.
    Sum,
    /// Mean.
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Population standard deviation.
    Stddev,
    /// Population variance.
    Variance,
    /// Exact number of distinct values.
    CountDistinct,
    /// The value of the event with the smallest event time.
    First,
    /// The value of the event with the largest event time.
    Last,
    /// Estimated number of distinct values (HyperLogLog, [`AggParams::precision`]).
    ApproxDistinct,
    /// Estimated quantiles ([`AggParams::quantiles`]; a DDSketch with 1% relative accuracy).
    ApproxQuantile,
    /// The [`AggParams::k`] most recent values by event time.
    LastK,
    /// The [`AggParams::k`] largest values.
    TopK,
    /// Sum of values weighted by 2^-(now - t)/half_life ([`AggParams::half_life_ms`]).
    ExpDecaySum,
}

/// Parameters of the aggregations that take some.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AggParams {
    /// `last_k`, `top_k`: how many values.
    #[serde(default)]
    pub k: u32,
    /// `approx_quantile`: the quantiles, each in (0, 1).
    #[serde(default)]
    pub quantiles: Vec<f64>,
    /// `exp_decay_sum`: the half-life.
    #[serde(default)]
    pub half_life_ms: u64,
    /// `approx_distinct`: HyperLogLog precision p (2^p registers; relative standard error
    /// 1.04 / sqrt(2^p)).
    #[serde(default)]
    pub precision: u8,
}

/// A window.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// Fixed, non-overlapping windows of `size_ms`, aligned to the epoch.
    Tumbling {
        /// Window length.
        size_ms: u64,
    },
    /// Windows of `size_ms` starting every `hop_ms` (which divides the size).
    Hopping {
        /// Window length.
        size_ms: u64,
        /// Distance between window starts.
        hop_ms: u64,
    },
    /// Windows of activity separated by at least `gap_ms` without events.
    Session {
        /// Inactivity gap that closes a session.
        gap_ms: u64,
    },
    /// One window of `size_ms` ending at the read's "now" (the source's largest event time),
    /// assembled from `tile_ms` partial aggregates (which divide the size) at read time.
    Sliding {
        /// Window length.
        size_ms: u64,
        /// Length of the partial aggregates.
        tile_ms: u64,
    },
    /// Windows starting at each `max_ms`-aligned boundary and growing by `step_ms` up to
    /// `max_ms` (Flink's CUMULATE); the step divides the maximum.
    Cumulate {
        /// Growth step.
        step_ms: u64,
        /// Largest window length.
        max_ms: u64,
    },
    /// One window over all time.
    Global,
}

impl Window {
    /// The length of the partial aggregates (panes) this window is assembled from: the window
    /// for tumbling, the hop for hopping, the tile for sliding, the step for cumulate. `None` for sessions and the global window.
    pub fn pane_ms(&self) -> Option<u64> {
        match *self {
            Window::Tumbling { size_ms } => Some(size_ms),
            Window::Hopping { hop_ms, .. } => Some(hop_ms),
            Window::Sliding { tile_ms, .. } => Some(tile_ms),
            Window::Cumulate { step_ms, .. } => Some(step_ms),
            Window::Session { .. } | Window::Global => None,
        }
    }
}

/// One feature of a dataflow.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FeaturePlan {
    /// Parameters of the aggregation, for those that take some.
    #[serde(default)]
    pub params: AggParams,
    /// Its name, unique in the dataflow.
    pub name: String,
    /// What it computes.
    pub agg: Agg,
    /// The field it aggregates (none for a plain count).
    pub field: Option<usize>,
    /// Over which windows.
    pub window: Window,
}

/// A validated dataflow definition.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataflowPlan {
    /// Its name.
    pub name: String,
    /// Its catalog id, unique over the catalog's life (a dataflow dropped and submitted again
    /// gets a new one); 0 until the coordinator assigns it. Names its checkpoints and log marks.
    /// (Always serialized: plans also cross processes as bincode, which cannot skip fields.)
    #[serde(default)]
    pub id: u64,
    /// The source it reads.
    pub source: SourcePlan,
    /// The key fields.
    pub key: Vec<usize>,
    /// Events that do not satisfy it are ignored.
    pub filter: Option<Expr>,
    /// Closed windows whose end is more than this behind the watermark are evicted; `None`
    /// keeps everything.
    pub retention_ms: Option<u64>,
    /// The features.
    pub features: Vec<FeaturePlan>,
}

/// A literal in a filter expression.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Literal {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number with a fraction or exponent.
    Float(f64),
    /// A string.
    Str(String),
}

/// A binary operator of a filter expression.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BinOp {
    /// `and`
    And,
    /// `or`
    Or,
    /// `==` or `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Rem,
}

/// The static type of an expression.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExprType {
    /// A boolean.
    Bool,
    /// An integer (i64 or u64 field, or integer literal).
    Int,
    /// A float.
    Float,
    /// A string.
    Str,
    /// The `null` literal.
    Null,
}

/// A type-checked filter expression.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Expr {
    /// The value of a field.
    Field(usize),
    /// A constant.
    Lit(Literal),
    /// `not e`.
    Not(Box<Expr>),
    /// `-e`.
    Neg(Box<Expr>),
    /// `a op b`.
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `e [not] in (l1, l2, ...)`.
    In {
        /// The tested value.
        expr: Box<Expr>,
        /// The list.
        list: Vec<Literal>,
        /// `not in`.
        negated: bool,
    },
    /// `e is [not] null`.
    IsNull {
        /// The tested value.
        expr: Box<Expr>,
        /// `is not null`.
        negated: bool,
    },
}
