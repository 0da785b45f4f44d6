//! Events as typed rows, parsed once at ingest from NDJSON or CSV against the source schema.
//!
//! A row holds one [`Datum`] per field of the source, in schema order, and the event time in
//! milliseconds. Missing fields are null, except the event-time field, which every event needs.
//! Wrong types, malformed lines and times out of range are rejected line by line with a reason;
//! the good lines of a batch are kept.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use sundial_protocol::plan::{FieldType, SourcePlan, TimeUnit};
use sundial_protocol::value::{Datum, F64};
pub use sundial_protocol::LineError;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Row {
    /// Event time, milliseconds since the Unix epoch.
    pub time: i64,
    /// The fields, in the source's order.
    pub values: Box<[Datum]>,
}

/// The longest line accepted.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Parses an event-time field value to milliseconds.
fn time_ms(datum: &Datum, unit: TimeUnit) -> Result<i64, String> {
    let scale = |v: i64| match unit {
        TimeUnit::Ms => Ok(v),
        TimeUnit::S => v.checked_mul(1000).ok_or_else(|| format!("time {v}s is out of range")),
        TimeUnit::Rfc3339 => Err("expected an RFC 3339 string".to_string()),
    };
    match datum {
        Datum::Int(v) => scale(*v),
        Datum::UInt(v) => i64::try_from(*v).map_err(|_| format!("time {v} is out of range")).and_then(scale),
        Datum::Str(s) if unit == TimeUnit::Rfc3339 => parse_rfc3339(s),
        Datum::Null => Err("the event time is missing".into()),
        other => Err(format!("the event time {other} has the wrong type")),
    }
}

/// Event times are limited to the years 0 to 9999 (as RFC 3339 is), so that window arithmetic
/// (start + size, time + gap) can never overflow.
pub const MAX_ABS_TIME_MS: i64 = 253_402_300_800_000;

fn finish(values: Vec<Datum>, source: &SourcePlan) -> Result<Row, String> {
    let name = &source.fields[source.time].name;
    let time = time_ms(&values[source.time], source.time_unit).map_err(|e| format!("field {name:?}: {e}"))?;
    if !(-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS).contains(&time) {
        return Err(format!("field {name:?}: time {time} ms is outside the years 0 to 9999"));
    }
    Ok(Row { time, values: values.into_boxed_slice() })
}

/// Parses one NDJSON line.
pub fn parse_json_line(line: &str, source: &SourcePlan) -> Result<Row, String> {
    if line.len() > MAX_LINE_BYTES {
        return Err(format!("line of {} bytes is over the limit of {MAX_LINE_BYTES}", line.len()));
    }
    let mut de = serde_json::Deserializer::from_str(line);
    let values = RowSeed(source).deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    finish(values, source)
}

struct RowSeed<'a>(&'a SourcePlan);

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Vec<Datum>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<Datum>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = Vec<Datum>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a JSON object with the fields of source {}", self.0.name)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Datum>, A::Error> {
        let source = self.0;
        let mut values = vec![Datum::Null; source.fields.len()];
        let mut seen = vec![false; source.fields.len()];
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match source.field_index(&name) {
                Some(i) => {
                    if seen[i] {
                        return Err(de::Error::custom(format!("field {name:?} appears twice")));
                    }
                    seen[i] = true;
                    values[i] = map.next_value_seed(FieldSeed { name: &name, ty: source.fields[i].ty })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(values)
    }
}

struct FieldSeed<'a> {
    name: &'a str,
    ty: FieldType,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Datum;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Datum, D::Error> {
        d.deserialize_any(self)
    }
}

impl FieldSeed<'_> {
    fn wrong<E: de::Error>(&self, got: &str) -> E {
        E::custom(format!("field {:?} must be {}, got {got}", self.name, self.ty.name()))
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Datum;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a value of type {}", self.ty.name())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Datum, E> {
        Ok(Datum::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Datum, E> {
        Ok(Datum::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Datum, E> {
        match self.ty {
            FieldType::Bool => Ok(Datum::Bool(v)),
            _ => Err(self.wrong("a boolean")),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Datum, E> {
        match self.ty {
            FieldType::I64 => Ok(Datum::Int(v)),
            FieldType::U64 => u64::try_from(v).map(Datum::UInt).map_err(|_| self.wrong(&format!("{v}"))),
            FieldType::F64 => Ok(Datum::Float(F64(v as f64))),
            _ => Err(self.wrong("a number")),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Datum, E> {
        match self.ty {
            FieldType::U64 => Ok(Datum::UInt(v)),
            FieldType::I64 => i64::try_from(v).map(Datum::Int).map_err(|_| self.wrong(&format!("{v}"))),
            FieldType::F64 => Ok(Datum::Float(F64(v as f64))),
            _ => Err(self.wrong("a number")),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Datum, E> {
        match self.ty {
            FieldType::F64 if v.is_finite() => Ok(Datum::Float(F64(v))),
            _ => Err(self.wrong(&format!("{v}"))),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Datum, E> {
        match self.ty {
            FieldType::String => Ok(Datum::Str(v.into())),
            _ => Err(self.wrong(&format!("the string {v:?}"))),
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<Datum, A::Error> {
        Err(self.wrong("an object"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<Datum, A::Error> {
        Err(self.wrong("an array"))
    }
}

/// The column layout of a CSV body, from its header.
pub struct CsvLayout {
    /// For each column, the field it fills (None: ignored column).
    columns: Vec<Option<usize>>,
}

impl CsvLayout {
    /// Reads the header row.
    pub fn from_header(header: &csv::StringRecord, source: &SourcePlan) -> Result<CsvLayout, String> {
        let mut columns = Vec::with_capacity(header.len());
        let mut seen = vec![false; source.fields.len()];
        for name in header.iter() {
            let index = source.field_index(name.trim());
            if let Some(i) = index {
                if seen[i] {
                    return Err(format!("the header names column {name:?} twice"));
                }
                seen[i] = true;
            }
            columns.push(index);
        }
        if !seen[source.time] {
            return Err(format!("the header has no column for the event time {:?}", source.fields[source.time].name));
        }
        Ok(CsvLayout { columns })
    }

    /// Parses one record.
    pub fn parse(&self, record: &csv::StringRecord, source: &SourcePlan) -> Result<Row, String> {
        self.parse_cells(record.len(), record.iter(), source)
    }

    /// Parses one record of `count` cells.
    fn parse_cells<'a>(
        &self,
        count: usize,
        cells: impl Iterator<Item = &'a str>,
        source: &SourcePlan,
    ) -> Result<Row, String> {
        if count != self.columns.len() {
            return Err(format!("{count} columns, but the header has {}", self.columns.len()));
        }
        let mut values = Vec::with_capacity(source.fields.len());
        values.resize_with(source.fields.len(), || Datum::Null);
        for (cell, column) in cells.zip(&self.columns) {
            let Some(i) = *column else { continue };
            if cell.is_empty() && source.fields[i].ty != FieldType::String {
                continue;
            }
            values[i] = Datum::parse(cell, source.fields[i].ty)
                .map_err(|e| format!("field {:?}: {e}", source.fields[i].name))?;
        }
        finish(values, source)
    }
}

/// Parses a body of NDJSON (`csv == false`) or CSV with a header. Returns the rows with their
/// line numbers, and the rejected lines. `first_line` is the number of the body's first line.
pub fn parse_body(
    body: &str,
    csv_format: bool,
    source: &SourcePlan,
    first_line: u64,
) -> (Vec<(u64, Row)>, Vec<LineError>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    if !csv_format {
        for (i, line) in body.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let number = first_line + i as u64;
            match parse_json_line(line, source) {
                Ok(row) => rows.push((number, row)),
                Err(reason) => errors.push(LineError { line: number, reason }),
            }
        }
        return (rows, errors);
    }
    if is_plain_csv(body) {
        parse_plain_csv(body, source, first_line, &mut rows, &mut errors);
    } else {
        parse_csv(body, source, first_line, &mut rows, &mut errors);
    }
    (rows, errors)
}

/// [`parse_body`] of CSV, through the CSV reader (quotes, carriage returns and all).
fn parse_csv(
    body: &str,
    source: &SourcePlan,
    first_line: u64,
    rows: &mut Vec<(u64, Row)>,
    errors: &mut Vec<LineError>,
) {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(body.as_bytes());
    let header = reader.headers().map_err(|e| format!("bad CSV header: {e}"));
    let Some(layout) = header_layout(header, source, first_line, errors) else { return };
    let mut record = csv::StringRecord::new();
    loop {
        let line = first_line - 1 + reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let number = first_line - 1 + record.position().map_or(line, |p| p.line());
                if record.iter().all(str::is_empty) {
                    continue;
                }
                match layout.parse(&record, source) {
                    Ok(row) => rows.push((number, row)),
                    Err(reason) => errors.push(LineError { line: number, reason }),
                }
            }
            Err(e) => {
                let number = e.position().map_or(line, |p| first_line - 1 + p.line());
                errors.push(LineError { line: number, reason: format!("bad CSV: {e}") });
                if !matches!(e.kind(), csv::ErrorKind::Utf8 { .. } | csv::ErrorKind::UnequalLengths { .. }) {
                    break;
                }
            }
        }
    }
}

/// The layout of a CSV body's header, or (`None`) the error of its first line.
fn header_layout(
    header: Result<&csv::StringRecord, String>,
    source: &SourcePlan,
    first_line: u64,
    errors: &mut Vec<LineError>,
) -> Option<CsvLayout> {
    match header.and_then(|header| CsvLayout::from_header(header, source)) {
        Ok(layout) => Some(layout),
        Err(reason) => {
            errors.push(LineError { line: first_line, reason });
            None
        }
    }
}

/// Whether a CSV body is one record per line, cut at commas: no quotes, no carriage returns, no
/// byte-order mark, and a header on the first line. Such a body is split directly, which reads
/// it as the CSV reader does at a fraction of the cost.
fn is_plain_csv(body: &str) -> bool {
    !body.starts_with('\u{feff}')
        && !body.starts_with('\n')
        && !body.is_empty()
        && memchr::memchr2(b'"', b'\r', body.as_bytes()).is_none()
}

/// [`parse_body`] of a body [`is_plain_csv`] accepts.
fn parse_plain_csv(
    body: &str,
    source: &SourcePlan,
    first_line: u64,
    rows: &mut Vec<(u64, Row)>,
    errors: &mut Vec<LineError>,
) {
    let bytes = body.as_bytes();
    let mut ends = memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len()));
    let header_end = ends.next().unwrap_or(bytes.len());
    let header = csv::StringRecord::from(cells(&body[..header_end]).collect::<Vec<&str>>());
    let Some(layout) = header_layout(Ok(&header), source, first_line, errors) else { return };
    let mut start = header_end + 1;
    for (i, end) in ends.enumerate() {
        let line = body.get(start..end).unwrap_or_default();
        start = end + 1;
        // As the CSV reader does: empty lines and records of empty cells are skipped.
        let commas = line.bytes().filter(|&b| b == b',').count();
        if commas == line.len() {
            continue;
        }
        let number = first_line + 1 + i as u64;
        match layout.parse_cells(commas + 1, cells(line), source) {
            Ok(row) => rows.push((number, row)),
            Err(reason) => errors.push(LineError { line: number, reason }),
        }
    }
}

/// The cells of a line of plain CSV (cut at commas, byte by byte: cells are short).
fn cells(line: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(line);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.bytes().position(|b| b == b',') {
            Some(comma) => {
                rest = text.get(comma + 1..);
                text.get(..comma)
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// Parses an RFC 3339 timestamp (`2023-11-14T22:13:20.5Z`, `...+02:00`) to Unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let bad = || format!("{text:?} is not an RFC 3339 time such as 2024-01-31T12:00:00Z");
    let b = text.as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let s = text.get(r).ok_or_else(bad)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad());
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let frac = &text[start..i.min(start + 3)];
        millis = frac.parse::<i64>().map_err(|_| bad())? * 10_i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match b.get(i) {
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if sign == b'+' {
                m
            } else {
                -m
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(year, month, day);
    Ok(((days * 24 + hour) * 60 + minute - offset_min) * 60_000 + second * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_protocol::plan::Field;

    fn source(unit: TimeUnit) -> SourcePlan {
        let f = |n: &str, ty| Field { name: n.into(), ty };
        SourcePlan {
            name: "tx".into(),
            fields: vec![
                f("user_id", FieldType::U64),
                f("ts", if unit == TimeUnit::Rfc3339 { FieldType::String } else { FieldType::I64 }),
                f("amount", FieldType::I64),
                f("merchant", FieldType::String),
                f("score", FieldType::F64),
            ],
            time: 1,
            time_unit: unit,
            allowed_lateness_ms: 0,
            idle_timeout_ms: 10_000,
        }
    }

    use proptest::prelude::*;

    proptest::proptest! {
        /// A CSV body without quotes, carriage returns or a byte-order mark reads the same
        /// split directly as through the CSV reader: rows, line numbers and errors.
        #[test]
        fn plain_csv_reads_as_the_csv_reader_does(
            columns in proptest::sample::subsequence(vec!["user_id", "ts", "amount", "merchant", "score", "other"], 0..=6)
                .prop_shuffle(),
            lines in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        proptest::strategy::Just(String::new()),
                        (0u64..5_000_000).prop_map(|n| n.to_string()),
                        (-500i64..500).prop_map(|n| n.to_string()),
                        "[ a-z0-9.\\-]{0,6}",
                    ],
                    0..8,
                ),
                0..12,
            ),
            trailing_newline in proptest::bool::ANY,
            first_line in 1u64..100,
        ) {
            let s = source(TimeUnit::Ms);
            let mut body = columns.join(",");
            for cells in &lines {
                body.push('\n');
                body.push_str(&cells.join(","));
            }
            if trailing_newline {
                body.push('\n');
            }
            prop_assume!(is_plain_csv(&body));
            // Not blank lines in the middle: the CSV reader skips them without counting them in
            // its line numbers, where the direct split counts them (as the line numbers of the
            // body are).
            prop_assume!(!body.trim_end_matches('\n').contains("\n\n"));
            let (mut plain, mut plain_errors) = (Vec::new(), Vec::new());
            parse_plain_csv(&body, &s, first_line, &mut plain, &mut plain_errors);
            let (mut read, mut read_errors) = (Vec::new(), Vec::new());
            parse_csv(&body, &s, first_line, &mut read, &mut read_errors);
            prop_assert_eq!(plain, read);
            prop_assert_eq!(plain_errors, read_errors);
        }
    }

    #[test]
    fn json_lines_parse_and_fail_with_reasons() {
        let s = source(TimeUnit::Ms);
        let row = parse_json_line(
            r#"{"user_id": 7, "ts": 1000, "amount": -5, "merchant": "m", "score": 2, "extra": [1]}"#,
            &s,
        )
        .unwrap();
        assert_eq!(row.time, 1000);
        assert_eq!(row.values[0], Datum::UInt(7));
        assert_eq!(row.values[4], Datum::Float(F64(2.0)));
        let row = parse_json_line(r#"{"ts": 5}"#, &s).unwrap();
        assert_eq!(row.values[0], Datum::Null);
        for (line, want) in [
            (r#"{"user_id": -1, "ts": 1}"#, "must be u64"),
            (r#"{"user_id": 1, "ts": "x"}"#, "must be i64"),
            (r#"{"user_id": 1}"#, "event time is missing"),
            (r#"{"user_id": 1, "ts": 1"#, "EOF"),
            (r#"[1, 2]"#, "expected a JSON object"),
            (r#"{"user_id": 1, "ts": 1} x"#, "trailing characters"),
            (r#"{"ts": 1, "ts": 2}"#, "appears twice"),
            (r#"{"ts": 1, "amount": 1.5}"#, "must be i64"),
        ] {
            let err = parse_json_line(line, &s).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
        let s = source(TimeUnit::S);
        assert_eq!(parse_json_line(r#"{"ts": 3}"#, &s).unwrap().time, 3000);
        let s = source(TimeUnit::Ms);
        let err = parse_json_line(r#"{"ts": 9223372036854775807}"#, &s).unwrap_err();
        assert!(err.contains("outside the years 0 to 9999"), "{err}");
    }

    #[test]
    fn bodies_keep_good_lines_and_number_bad_ones() {
        let s = source(TimeUnit::Ms);
        let body = "{\"user_id\": 1, \"ts\": 1}\nnot json\n\n{\"user_id\": 2, \"ts\": 2}\n";
        let (rows, errors) = parse_body(body, false, &s, 1);
        assert_eq!(rows.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 2);
        let body = "user_id,ts,amount,merchant\n1,10,5,\"a,b\"\n2,x,1,b\n3,30,,c\n4,40\n";
        let (rows, errors) = parse_body(body, true, &s, 1);
        assert_eq!(rows.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(rows[0].1.values[3], Datum::Str("a,b".into()));
        assert_eq!(rows[1].1.values[2], Datum::Null);
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![3, 5]);
        assert!(errors[0].reason.contains("not an i64"), "{errors:?}");
        let (_, errors) = parse_body("user_id,amount\n1,2\n", true, &s, 1);
        assert!(errors[0].reason.contains("no column for the event time"));
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(parse_rfc3339("2023-11-14T23:13:20.5+01:00"), Ok(1_700_000_000_500));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.999Z"), Ok(-1));
        for bad in ["2023-02-30T00:00:00Z", "2023-11-14 22:13", "2023-11-14T22:13:20", "x"] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
        let s = source(TimeUnit::Rfc3339);
        assert_eq!(parse_json_line(r#"{"ts": "2023-11-14T22:13:20Z"}"#, &s).unwrap().time, 1_700_000_000_000);
    }
}
