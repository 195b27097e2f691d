//! ARCHITECTURE.md's "may use" table, enforced: every file of a folder of
//! `src/` names only the folders and the assigned crates its row allows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The folders of `src/`, as `crate::<name>` paths name them.
const MODULES: &[&str] = &[
    "common", "model", "library", "store", "vector", "keyword", "indexer", "search", "server",
    "train", "eval", "cli",
];

/// Crates the table assigns to some folders (as the table spells them, and
/// as code names them). Every other crate is free for all.
const ASSIGNED: &[(&str, &str)] = &[
    ("candle", "candle_"),
    ("tokenizers", "tokenizers"),
    ("hf-hub", "hf_hub"),
    ("image", "image"),
    ("mozjpeg", "mozjpeg"),
    ("kamadak-exif", "exif"),
    ("walkdir", "walkdir"),
    ("sled", "sled"),
    ("hnsw_rs", "hnsw_rs"),
    ("tantivy", "tantivy"),
    ("axum", "axum"),
    ("hyper", "hyper"),
    ("hyper-util", "hyper_util"),
    ("utoipa", "utoipa"),
    ("clap", "clap"),
    ("indicatif", "indicatif"),
    ("ureq", "ureq"),
    ("tokio", "tokio"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What each row allows: folder (`model`, or `main.rs`) to the names in backticks of its last cell.
fn table() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut rows = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `src/")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let folder = cells[0]
            .trim_matches('`')
            .trim_start_matches("src/")
            .trim_end_matches('/')
            .to_string();
        let last = cells.last().unwrap();
        let mut allowed: BTreeSet<String> = last
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect();
        if last.contains("everything") {
            allowed.extend(MODULES.iter().map(|m| m.to_string()));
            allowed.extend(ASSIGNED.iter().map(|(name, _)| name.to_string()));
        }
        rows.insert(folder, allowed);
    }
    rows
}

/// Whether `code` names `name` as a path's first segment (`name::`, not `x::name::` or `xname::`).
fn names(code: &str, name: &str) -> bool {
    let pattern = if name.ends_with('_') {
        name.to_string()
    } else {
        format!("{name}::")
    };
    code.match_indices(&pattern).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    }) || code.contains(&format!("use {name};"))
}

/// The code of a file without its comments (line comments and doc comments).
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) if !l[..at].contains('"') => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn files(folder: &str) -> Vec<PathBuf> {
    if folder == "main.rs" {
        return vec![root().join("src/main.rs")];
    }
    walkdir::WalkDir::new(root().join("src").join(folder))
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect()
}

#[test]
fn every_folder_uses_only_what_its_row_allows() {
    let rows = table();
    // Every folder of src/ has a row, and every row a folder.
    for m in MODULES {
        assert!(
            rows.contains_key(*m),
            "ARCHITECTURE.md has no row for src/{m}/"
        );
    }
    let mut violations = Vec::new();
    for (folder, allowed) in &rows {
        let files = files(folder);
        assert!(
            !files.is_empty(),
            "ARCHITECTURE.md has a row for src/{folder}, which holds no code"
        );
        for file in files {
            let code = code_of(&file);
            let shown = file.strip_prefix(root()).unwrap().display().to_string();
            if code.contains("crate::{") || code.contains("super::super::") {
                violations.push(format!(
                    "{shown}: name other folders as `crate::x::...`, so that this check sees them"
                ));
            }
            for m in MODULES {
                let own = folder.as_str() == *m || *m == "common";
                if !own
                    && !allowed.contains(*m)
                    && (names(&code, &format!("crate::{m}"))
                        || names(&code, &format!("clipdex::{m}")))
                {
                    violations.push(format!(
                        "{shown} uses `{m}`, outside the row of src/{folder}"
                    ));
                }
            }
            for (name, in_code) in ASSIGNED {
                if !allowed.contains(*name) && names(&code, in_code) {
                    violations.push(format!(
                        "{shown} uses the crate `{name}`, outside the row of src/{folder}"
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "ARCHITECTURE.md's table does not hold:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_check_sees_what_it_must() {
    // The matcher itself, on code it must and must not flag.
    assert!(names("use crate::model::Clip;", "crate::model"));
    assert!(names(
        "let x = crate::model::DEFAULT_MODEL;",
        "crate::model"
    ));
    assert!(!names("use crate::modeling::X;", "crate::model"));
    assert!(names("use tantivy::Term;", "tantivy"));
    assert!(!names("use crate::library::image::X;", "image"));
    assert!(!names("let my_image::x = 1;", "image"));
    assert!(names("candle_core::Tensor", "candle_"));
    assert!(
        code_of(&root().join("src/lib.rs"))
            .lines()
            .all(|l| !l.trim_start().starts_with("//"))
    );
}
