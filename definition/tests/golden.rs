//! Golden tests for definitions: every file in `golden/cases` is validated (as a source when its
//! name starts with `source_`, otherwise as a dataflow definition against the sources in
//! `golden/sources`), and the result — the plan as JSON, or the error text — must equal the
//! `.expected` file beside it. `UPDATE_GOLDEN=1 cargo test -p sundial-definition` rewrites the
//! expected files; review the diff before committing it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use sundial_definition::{parse_document, validate_definition, validate_source, DefinitionSpec, Format, SourceSpec};
use sundial_protocol::plan::SourcePlan;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn load(path: &Path) -> (String, Format) {
    (fs::read_to_string(path).unwrap(), Format::from_path(path).unwrap())
}

fn outcome(path: &Path, sources: &[SourcePlan]) -> String {
    let (text, format) = load(path);
    let name = path.file_name().unwrap().to_string_lossy();
    let result = if name.starts_with("source_") {
        parse_document::<SourceSpec>(&text, format)
            .and_then(|spec| validate_source(&spec))
            .map(|plan| serde_json::to_string_pretty(&plan).unwrap())
    } else {
        parse_document::<DefinitionSpec>(&text, format)
            .and_then(|spec| validate_definition(&spec, |n| sources.iter().find(|s| s.name == n)))
            .map(|plan| serde_json::to_string_pretty(&plan).unwrap())
    };
    match result {
        Ok(plan) => format!("{plan}\n"),
        Err(e) => e.problems.iter().map(|p| format!("error: {p}\n")).collect(),
    }
}

#[test]
fn golden_cases() {
    let sources: Vec<SourcePlan> = fs::read_dir(golden().join("sources"))
        .unwrap()
        .map(|e| {
            let (text, format) = load(&e.unwrap().path());
            validate_source(&parse_document::<SourceSpec>(&text, format).unwrap()).unwrap()
        })
        .collect();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<PathBuf> = fs::read_dir(golden().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "expected"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "the golden cases are missing");
    let mut failures = Vec::new();
    for case in &cases {
        let got = outcome(case, &sources);
        let expected_path = case.with_extension("expected");
        if update {
            fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failures.push(format!("{}:\n--- expected\n{expected}--- got\n{got}", case.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
