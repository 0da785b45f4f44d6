//! Sources and dataflow definitions as users write them (JSON, TOML or YAML), validated and
//! lowered to the typed plans of [`sundial_protocol::plan`].
//!
//! No timely here: the coordinator validates with this crate, and a definition that does not
//! validate is refused before anything reaches a worker. Every error names the offending part
//! (`features[1] "spend_10m": window: hop 3m does not divide size 10m`), and all errors of a
//! document are reported at once.

pub mod duration;
pub mod expr;

use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use sundial_protocol::plan::{
    Agg, AggParams, DataflowPlan, FeaturePlan, Field, FieldType, SourcePlan, TimeUnit, Window,
};

pub use duration::{format_duration, parse_duration};

/// A document format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// JSON.
    Json,
    /// TOML.
    Toml,
    /// YAML.
    Yaml,
}

impl Format {
    /// The format of a file, by its extension.
    pub fn from_path(path: &std::path::Path) -> Result<Format, DefinitionError> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("json") => Ok(Format::Json),
            Some("toml") => Ok(Format::Toml),
            Some("yaml") | Some("yml") => Ok(Format::Yaml),
            _ => Err(DefinitionError::one(format!(
                "{}: cannot tell the format; name the file .json, .toml, .yaml or .yml",
                path.display()
            ))),
        }
    }
}

/// Why a document was refused: every problem found, each naming its place.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct DefinitionError {
    /// One entry per problem.
    pub problems: Vec<String>,
}

impl DefinitionError {
    fn one(problem: String) -> Self {
        DefinitionError { problems: vec![problem] }
    }
}

/// Parses a document of `format` into `T`.
pub fn parse_document<T: DeserializeOwned>(text: &str, format: Format) -> Result<T, DefinitionError> {
    let result = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
        Format::Toml => toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("{} at line {line} column {column}", e.message().trim_end())
            }
            None => e.message().trim_end().to_string(),
        }),
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| e.to_string()),
    };
    result.map_err(DefinitionError::one)
}

/// A source as users write it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Its name.
    pub name: String,
    /// The event-time field.
    pub time: String,
    /// `ms` (default), `s` or `rfc3339`.
    #[serde(default)]
    pub time_unit: Option<String>,
    /// Watermark delay behind the largest event time (default 0s).
    #[serde(default)]
    pub allowed_lateness: Option<String>,
    /// A partition without events this long does not hold the watermark back (default 10s).
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Field name to type, in order.
    pub fields: IndexMap<String, String>,
}

/// The key of a definition: one field or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum KeySpec {
    /// `"key": "user_id"`
    One(String),
    /// `"key": ["user_id", "merchant"]`
    Many(Vec<String>),
}

/// A dataflow definition as users write it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionSpec {
    /// Its name.
    pub name: String,
    /// The source it reads.
    pub source: String,
    /// The key fields.
    pub key: KeySpec,
    /// A filter expression.
    #[serde(default)]
    pub filter: Option<String>,
    /// A duration or `forever`.
    #[serde(default)]
    pub retention: Option<String>,
    /// The features.
    pub features: Vec<FeatureSpec>,
}

/// A feature as users write it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Its name.
    pub name: String,
    /// The aggregation.
    pub agg: String,
    /// The aggregated field.
    #[serde(default)]
    pub field: Option<String>,
    /// The window: `"global"`, or an object with one key naming the kind
    /// (`{"tumbling": "1m"}`, `{"hopping": {"size": "10m", "hop": "1m"}}`, ...). Kept as a
    /// value and interpreted by [`WindowSpec::from_value`], so that JSON, TOML and YAML all take
    /// the same shape.
    pub window: serde_json::Value,
    /// Quantile(s) of `approx_quantile`.
    #[serde(default)]
    pub q: Option<serde_json::Value>,
    /// k of `last_k` / `top_k`.
    #[serde(default)]
    pub k: Option<u64>,
    /// Half-life of `exp_decay_sum`.
    #[serde(default)]
    pub half_life: Option<String>,
    /// HyperLogLog precision of `approx_distinct` (4 to 16, default 12).
    #[serde(default)]
    pub precision: Option<u64>,
}

/// A window as users write it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowSpec {
    /// `{"tumbling": "1m"}`
    Tumbling(String),
    /// `{"hopping": {"size": "10m", "hop": "1m"}}`
    Hopping {
        /// Window length.
        size: String,
        /// Distance between starts.
        hop: String,
    },
    /// `{"session": {"gap": "30s"}}`
    Session {
        /// Inactivity gap.
        gap: String,
    },
    /// `{"sliding": {"size": "1h", "tile": "1m"}}`
    Sliding {
        /// Window length.
        size: String,
        /// Tile length.
        tile: String,
    },
    /// `{"cumulate": {"step": "1m", "max": "1h"}}`
    Cumulate {
        /// Growth step.
        step: String,
        /// Largest window.
        max: String,
    },
    /// `"global"`
    Global,
}

impl WindowSpec {
    /// Interprets the `window` of a feature.
    pub fn from_value(value: &serde_json::Value) -> Result<WindowSpec, String> {
        use serde_json::Value;
        const KINDS: &str = "tumbling, hopping, session, sliding, cumulate or global";
        let (kind, params) = match value {
            Value::String(s) => (s.as_str(), &Value::Null),
            Value::Object(map) if map.len() == 1 => match map.iter().next() {
                Some((k, v)) => (k.as_str(), v),
                None => return Err(format!("expected one of {KINDS}")),
            },
            Value::Object(map) => {
                let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                return Err(format!("expected exactly one window kind, got {{{}}}", keys.join(", ")));
            }
            other => return Err(format!("expected a window such as {{\"tumbling\": \"1m\"}}, got {other}")),
        };
        let param = |name: &str| -> Result<String, String> {
            match params.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("{kind}.{name}: expected a duration string such as \"1m\", got {other}")),
                None => Err(format!("{kind}: missing {name}")),
            }
        };
        let only = |names: &[&str]| -> Result<(), String> {
            if let Value::Object(map) = params {
                if let Some(extra) = map.keys().find(|k| !names.contains(&k.as_str())) {
                    return Err(format!("{kind}: unknown parameter {extra:?} (takes {})", names.join(", ")));
                }
            } else {
                return Err(format!("{kind}: expected an object with {}", names.join(", ")));
            }
            Ok(())
        };
        match kind {
            "tumbling" => match params {
                Value::String(size) => Ok(WindowSpec::Tumbling(size.clone())),
                _ => only(&["size"]).and_then(|()| param("size")).map(WindowSpec::Tumbling),
            },
            "hopping" => {
                only(&["size", "hop"])?;
                Ok(WindowSpec::Hopping { size: param("size")?, hop: param("hop")? })
            }
            "session" => match params {
                Value::String(gap) => Ok(WindowSpec::Session { gap: gap.clone() }),
                _ => {
                    only(&["gap"])?;
                    Ok(WindowSpec::Session { gap: param("gap")? })
                }
            },
            "sliding" => {
                only(&["size", "tile"])?;
                Ok(WindowSpec::Sliding { size: param("size")?, tile: param("tile")? })
            }
            "cumulate" => {
                only(&["step", "max"])?;
                Ok(WindowSpec::Cumulate { step: param("step")?, max: param("max")? })
            }
            "global" if params.is_null() || params.as_object().is_some_and(|m| m.is_empty()) => Ok(WindowSpec::Global),
            "global" => Err("global takes no parameters".into()),
            other => Err(format!("unknown window kind {other:?} (use {KINDS})")),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

fn name_problem(what: &str, name: &str) -> Option<String> {
    (!valid_name(name))
        .then(|| format!("{what} {name:?} must be 1 to 64 characters of letters, digits, `_`, `-` or `.`"))
}

/// Validates a source.
pub fn validate_source(spec: &SourceSpec) -> Result<SourcePlan, DefinitionError> {
    let mut problems = Vec::new();
    problems.extend(name_problem("source name", &spec.name));
    if spec.fields.is_empty() {
        problems.push("fields: a source needs at least one field".into());
    }
    let mut fields = Vec::new();
    for (name, ty) in &spec.fields {
        if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            problems.push(format!("fields: field name {name:?} must be an identifier (letters, digits, `_`)"));
        }
        let ty = match ty.as_str() {
            "i64" => FieldType::I64,
            "u64" => FieldType::U64,
            "f64" => FieldType::F64,
            "bool" => FieldType::Bool,
            "string" => FieldType::String,
            other => {
                problems.push(format!("fields.{name}: unknown type {other:?} (use i64, u64, f64, bool or string)"));
                FieldType::String
            }
        };
        fields.push(Field { name: name.clone(), ty });
    }
    let time_unit = match spec.time_unit.as_deref().unwrap_or("ms") {
        "ms" => TimeUnit::Ms,
        "s" => TimeUnit::S,
        "rfc3339" => TimeUnit::Rfc3339,
        other => {
            problems.push(format!("time_unit: {other:?} is not ms, s or rfc3339"));
            TimeUnit::Ms
        }
    };
    let time = fields.iter().position(|f| f.name == spec.time);
    match time.map(|i| fields[i].ty) {
        None => problems.push(format!("time: {:?} is not a field of the source", spec.time)),
        Some(FieldType::I64 | FieldType::U64) if time_unit != TimeUnit::Rfc3339 => {}
        Some(FieldType::String) if time_unit == TimeUnit::Rfc3339 => {}
        Some(ty) => problems.push(format!(
            "time: field {:?} is {} but time_unit {} needs {}",
            spec.time,
            ty.name(),
            spec.time_unit.as_deref().unwrap_or("ms"),
            if time_unit == TimeUnit::Rfc3339 { "a string" } else { "an integer (i64 or u64)" }
        )),
    }
    let mut duration = |what: &str, text: &Option<String>, default: u64, allow_zero: bool| match text {
        None => default,
        Some(t) => match parse_duration(t) {
            Ok(0) if !allow_zero => {
                problems.push(format!("{what}: must be longer than zero"));
                default
            }
            Ok(ms) => ms,
            Err(e) => {
                problems.push(format!("{what}: {e}"));
                default
            }
        },
    };
    let allowed_lateness_ms = duration("allowed_lateness", &spec.allowed_lateness, 0, true);
    let idle_timeout_ms = duration("idle_timeout", &spec.idle_timeout, 10_000, false);
    if !problems.is_empty() {
        return Err(DefinitionError { problems });
    }
    Ok(SourcePlan {
        name: spec.name.clone(),
        fields,
        time: time.unwrap_or(0),
        time_unit,
        allowed_lateness_ms,
        idle_timeout_ms,
    })
}

/// Parses and validates a source given as JSON text.
pub fn source_from_json(text: &str) -> Result<SourcePlan, DefinitionError> {
    validate_source(&parse_document::<SourceSpec>(text, Format::Json)?)
}

/// Validates a definition against the sources that exist.
pub fn validate_definition<'a>(
    spec: &DefinitionSpec,
    source_named: impl Fn(&str) -> Option<&'a SourcePlan>,
) -> Result<DataflowPlan, DefinitionError> {
    let mut problems = Vec::new();
    problems.extend(name_problem("dataflow name", &spec.name));
    let Some(source) = source_named(&spec.source) else {
        problems.push(format!("source: no source named {:?}; create it first", spec.source));
        return Err(DefinitionError { problems });
    };

    let key_names: Vec<String> = match &spec.key {
        KeySpec::One(k) => vec![k.clone()],
        KeySpec::Many(ks) => ks.clone(),
    };
    if key_names.is_empty() {
        problems.push("key: needs at least one field".into());
    }
    let mut key = Vec::new();
    for name in &key_names {
        match source.field_index(name) {
            None => problems.push(format!("key: {name:?} is not a field of source {}", source.name)),
            Some(i) if source.fields[i].ty == FieldType::F64 => {
                problems.push(format!("key: {name:?} is f64; key fields must be integers, strings or booleans"))
            }
            Some(i) if key.contains(&i) => problems.push(format!("key: {name:?} appears twice")),
            Some(i) => key.push(i),
        }
    }

    let filter = match &spec.filter {
        None => None,
        Some(text) => match expr::parse_filter(text, source) {
            Ok(e) => Some(e),
            Err(e) => {
                problems.push(format!("filter: {e}"));
                None
            }
        },
    };

    if spec.features.is_empty() {
        problems.push("features: a dataflow needs at least one feature".into());
    }
    let mut features = Vec::new();
    for (i, f) in spec.features.iter().enumerate() {
        let at = format!("features[{i}] {:?}", f.name);
        if let Some(p) = name_problem("feature name", &f.name) {
            problems.push(format!("{at}: {p}"));
        }
        if spec.features[..i].iter().any(|g| g.name == f.name) {
            problems.push(format!("{at}: duplicate feature name"));
        }
        match validate_feature(f, source) {
            Ok(plan) => features.push(plan),
            Err(errs) => problems.extend(errs.into_iter().map(|e| format!("{at}: {e}"))),
        }
    }

    let retention_ms = match spec.retention.as_deref() {
        Some("forever") => None,
        Some(text) => match parse_duration(text) {
            Ok(ms) => Some(ms),
            Err(e) => {
                problems.push(format!("retention: {e}"));
                None
            }
        },
        // Keep the current and the previous window: evict a window once its end is more than
        // one window length behind the watermark.
        None => Some(features.iter().map(|f| default_retention(&f.window)).max().unwrap_or(0)),
    };
    if !problems.is_empty() {
        return Err(DefinitionError { problems });
    }
    Ok(DataflowPlan { name: spec.name.clone(), id: 0, source: source.clone(), key, filter, retention_ms, features })
}

fn default_retention(window: &Window) -> u64 {
    match *window {
        Window::Tumbling { size_ms } => size_ms,
        Window::Hopping { size_ms, .. } => size_ms,
        Window::Session { gap_ms } => gap_ms,
        Window::Sliding { size_ms, .. } => size_ms,
        Window::Cumulate { max_ms, .. } => max_ms,
        Window::Global => 0,
    }
}

fn validate_feature(f: &FeatureSpec, source: &SourcePlan) -> Result<FeaturePlan, Vec<String>> {
    let mut problems = Vec::new();
    let agg = match f.agg.as_str() {
        "count" => Some(Agg::Count),
        "sum" => Some(Agg::Sum),
        "avg" => Some(Agg::Avg),
        "min" => Some(Agg::Min),
        "max" => Some(Agg::Max),
        "stddev" => Some(Agg::Stddev),
        "variance" => Some(Agg::Variance),
        "count_distinct" => Some(Agg::CountDistinct),
        "first" => Some(Agg::First),
        "last" => Some(Agg::Last),
        "approx_distinct" => Some(Agg::ApproxDistinct),
        "approx_quantile" => Some(Agg::ApproxQuantile),
        "last_k" => Some(Agg::LastK),
        "top_k" => Some(Agg::TopK),
        "exp_decay_sum" => Some(Agg::ExpDecaySum),
        other => {
            problems.push(format!(
                "agg: unknown aggregation {other:?} (count, sum, avg, min, max, stddev, variance, count_distinct, first, last, approx_distinct, approx_quantile, last_k, top_k, exp_decay_sum)"
            ));
            None
        }
    };
    let mut params = AggParams::default();
    match (&f.q, agg) {
        (None, Some(Agg::ApproxQuantile)) => {
            problems.push("q: approx_quantile needs q (a number or a list, each in (0, 1))".into())
        }
        (Some(q), Some(Agg::ApproxQuantile)) => {
            let qs: Vec<Option<f64>> = match q {
                serde_json::Value::Array(items) => items.iter().map(serde_json::Value::as_f64).collect(),
                other => vec![other.as_f64()],
            };
            if qs.is_empty() || qs.iter().any(|q| q.is_none_or(|q| !(q > 0.0 && q < 1.0))) {
                problems.push(format!("q: {q} must be a number or a list of numbers, each in (0, 1)"));
            } else {
                params.quantiles = qs.into_iter().flatten().collect();
            }
        }
        (Some(_), _) => problems.push("q: only approx_quantile takes q".into()),
        (None, _) => {}
    }
    match (f.k, agg) {
        (None, Some(Agg::LastK | Agg::TopK)) => problems.push(format!("k: {} needs k (1 to 1000)", f.agg)),
        (Some(k), Some(Agg::LastK | Agg::TopK)) if !(1..=1000).contains(&k) => {
            problems.push(format!("k: {k} is not between 1 and 1000"))
        }
        (Some(k), Some(Agg::LastK | Agg::TopK)) => params.k = k as u32,
        (Some(_), _) => problems.push("k: only last_k and top_k take k".into()),
        (None, _) => {}
    }
    match (&f.half_life, agg) {
        (None, Some(Agg::ExpDecaySum)) => problems.push("half_life: exp_decay_sum needs half_life".into()),
        (Some(h), Some(Agg::ExpDecaySum)) => match positive("half_life", h) {
            Ok(ms) => params.half_life_ms = ms,
            Err(e) => problems.push(e),
        },
        (Some(_), _) => problems.push("half_life: only exp_decay_sum takes half_life".into()),
        (None, _) => {}
    }
    match (f.precision, agg) {
        (None, Some(Agg::ApproxDistinct)) => params.precision = 12,
        (Some(p), Some(Agg::ApproxDistinct)) if !(4..=16).contains(&p) => {
            problems.push(format!("precision: {p} is not between 4 and 16"))
        }
        (Some(p), Some(Agg::ApproxDistinct)) => params.precision = p as u8,
        (Some(_), _) => problems.push("precision: only approx_distinct takes precision".into()),
        (None, _) => {}
    }
    let field = match &f.field {
        None => None,
        Some(name) => match source.field_index(name) {
            Some(i) => Some(i),
            None => {
                problems.push(format!("field: {name:?} is not a field of source {}", source.name));
                None
            }
        },
    };
    if let Some(agg) = agg {
        let ty = field.map(|i| source.fields[i].ty);
        match (agg, ty) {
            (Agg::Count, _) => {}
            (_, None) if f.field.is_none() => problems.push(format!("field: {} needs a field", f.agg)),
            (_, None) => {}
            (Agg::Sum | Agg::Avg | Agg::Stddev | Agg::Variance | Agg::ApproxQuantile | Agg::ExpDecaySum, Some(t))
                if !t.is_numeric() =>
            {
                problems.push(format!(
                    "field: {} needs a numeric field, but {:?} is {}",
                    f.agg,
                    f.field.as_deref().unwrap_or_default(),
                    t.name()
                ))
            }
            (Agg::Min | Agg::Max | Agg::TopK, Some(FieldType::Bool)) => {
                problems.push(format!("field: {} needs a number or a string, not bool", f.agg))
            }
            _ => {}
        }
    }
    let window =
        WindowSpec::from_value(&f.window).and_then(|w| validate_window(&w)).map_err(|e| format!("window: {e}"));
    let window = match window {
        Ok(w) => Some(w),
        Err(e) => {
            problems.push(e);
            None
        }
    };
    match (agg, window, problems.is_empty()) {
        (Some(agg), Some(window), true) => Ok(FeaturePlan { name: f.name.clone(), agg, field, window, params }),
        _ => Err(problems),
    }
}

fn positive(what: &str, text: &str) -> Result<u64, String> {
    match parse_duration(text) {
        Ok(0) => Err(format!("{what} must be longer than zero")),
        Ok(ms) => Ok(ms),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// A whole duration and a part of it that must divide it (hop, tile, step), both in ms.
fn whole_and_part(whole_name: &str, whole: &str, part_name: &str, part: &str) -> Result<(u64, u64), String> {
    let whole_ms = positive(whole_name, whole)?;
    let part_ms = positive(part_name, part)?;
    if part_ms > whole_ms || whole_ms % part_ms != 0 {
        return Err(format!("{part_name} {part} does not divide {whole_name} {whole}"));
    }
    Ok((whole_ms, part_ms))
}

fn validate_window(w: &WindowSpec) -> Result<Window, String> {
    match w {
        WindowSpec::Tumbling(size) => Ok(Window::Tumbling { size_ms: positive("size", size)? }),
        WindowSpec::Hopping { size, hop } => {
            let (size_ms, hop_ms) = whole_and_part("size", size, "hop", hop)?;
            Ok(Window::Hopping { size_ms, hop_ms })
        }
        WindowSpec::Session { gap } => Ok(Window::Session { gap_ms: positive("gap", gap)? }),
        WindowSpec::Sliding { size, tile } => {
            let (size_ms, tile_ms) = whole_and_part("size", size, "tile", tile)?;
            Ok(Window::Sliding { size_ms, tile_ms })
        }
        WindowSpec::Cumulate { step, max } => {
            let (max_ms, step_ms) = whole_and_part("max", max, "step", step)?;
            Ok(Window::Cumulate { step_ms, max_ms })
        }
        WindowSpec::Global => Ok(Window::Global),
    }
}
