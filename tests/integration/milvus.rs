//! Milvus as the vector engine (`--vectors milvus://`), against the real
//! standalone server: `.ci/run` starts one (`scripts/milvus_server.sh`) and
//! names it in `CLIPDEX_TEST_MILVUS` (HOST:PORT). Without it these tests
//! say so and pass, except under CI, where a missing server fails them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::{
    clipdex, copy_photos, fixture_model, open_index, shared_photos, stderr, stdout,
};

/// The test server's address, or `None` (outside CI) to skip.
fn server() -> Option<String> {
    match std::env::var("CLIPDEX_TEST_MILVUS") {
        Ok(address) if !address.is_empty() => Some(address),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must run a Milvus server for these tests (CLIPDEX_TEST_MILVUS)"
            );
            eprintln!("skipped: no Milvus server (set CLIPDEX_TEST_MILVUS=HOST:PORT)");
            None
        }
    }
}

/// A collection name no other test (or earlier run) uses.
fn collection(label: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "t_{label}_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn index(
    library: &Path,
    index: &Path,
    model: &Path,
    vectors: Option<&str>,
) -> std::process::Output {
    let mut args = vec![
        "index",
        library.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ];
    if let Some(v) = vectors {
        args.extend(["--vectors", v]);
    }
    clipdex(&args)
}

/// The hits of a `clipdex search --json` (or `similar`) run: path to score.
fn hits(args: &[&str]) -> Vec<(String, f32)> {
    let out = clipdex(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["path"].as_str().unwrap().to_string(),
                v["score"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

/// Milvus with an exact (FLAT) index answers every query as the embedded
/// engine does: the same photos, the same scores, the filters evaluated
/// inside Milvus's search.
#[test]
fn milvus_answers_as_the_embedded_engine() {
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let library = shared_photos().join("gcompris");
    let model = fixture_model("openai-tiny");
    let embedded = dir.path().join("embedded");
    let remote = dir.path().join("milvus");
    let url = format!("milvus://{server}/{}?index=flat", collection("alike"));
    let out = index(&library, &embedded, &model, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = index(&library, &remote, &model, Some(&url));
    assert!(out.status.success(), "{}", stderr(&out));

    // By meaning alone: keyword ranks break ties by photo id, which two
    // indexing runs assign in different orders.
    let queries: [&[&str]; 7] = [
        &["a red fish"],
        &["a hammer", "-k", "25"],
        &["a monument", "--folder", "monuments"],
        &["a windmill", "--folder", "renewable/"],
        &["in:tools scissors"],
        &["an animal", "--type", "png"],
        &["an animal", "--exclude", "erase_animals"],
    ];
    let mut compared = 0;
    for query in queries {
        let run = |index: &Path| {
            let mut args = vec!["search"];
            args.extend_from_slice(query);
            args.extend([
                "--index",
                index.to_str().unwrap(),
                "--cutoff",
                "none",
                "--no-keywords",
                "--json",
            ]);
            hits(&args)
        };
        let (a, b) = (run(&embedded), run(&remote));
        assert_eq!(a.len(), b.len(), "{query:?}: {a:?} against {b:?}");
        // Scores equal to float rounding; paths equal but for ties.
        let a_map: BTreeMap<_, _> = a.iter().cloned().collect();
        for ((pa, sa), (pb, sb)) in a.iter().zip(&b) {
            assert!(
                (sa - sb).abs() < 1e-4,
                "{query:?}: {pa} {sa} against {pb} {sb}"
            );
            let other = a_map.get(pb).copied().unwrap_or(f32::NAN);
            assert!(
                (other - sb).abs() < 1e-4,
                "{query:?}: {pb} not at its score in {a:?}"
            );
        }
        compared += a.len();
    }
    assert!(compared > 50, "only {compared} hits compared");

    // With keywords fused in: the same photos.
    let hybrid = |index: &Path| {
        let mut found = hits(&[
            "search",
            "in:tools scissors",
            "--index",
            index.to_str().unwrap(),
            "--cutoff",
            "none",
            "--json",
        ]);
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.into_iter().map(|(p, _)| p).collect::<Vec<_>>()
    };
    assert_eq!(hybrid(&embedded), hybrid(&remote));

    // Find-similar goes through the engine's stored vector.
    let similar = |index: &Path| {
        hits(&[
            "similar",
            "tools/hammer1.jpg",
            "--index",
            index.to_str().unwrap(),
            "--cutoff",
            "none",
            "--json",
        ])
    };
    let (a, b) = (similar(&embedded), similar(&remote));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for ((_, sa), (_, sb)) in a.iter().zip(&b) {
        assert!((sa - sb).abs() < 1e-4);
    }
}

/// Removed photos are removed from Milvus: after a re-index no search
/// returns them, and the engine holds exactly the store's photos.
#[test]
fn removed_photos_never_come_back_from_milvus() {
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("library");
    let copies = copy_photos(
        &shared_photos().join("gcompris/tools"),
        &library.join("tools"),
        20,
    );
    let model = fixture_model("openai-tiny");
    let idx = dir.path().join("index");
    let url = format!("milvus://{server}/{}", collection("removed"));
    let out = index(&library, &idx, &model, Some(&url));
    assert!(out.status.success(), "{}", stderr(&out));
    let every_tool = || {
        hits(&[
            "search",
            "a tool",
            "--index",
            idx.to_str().unwrap(),
            "-k",
            "100",
            "--cutoff",
            "none",
            "--json",
        ])
    };
    assert_eq!(every_tool().len(), 20);

    let removed: Vec<String> = copies[..5]
        .iter()
        .map(|p| {
            std::fs::remove_file(p).unwrap();
            format!("tools/{}", p.file_name().unwrap().to_str().unwrap())
        })
        .collect();
    let out = clipdex(&["reindex", "--index", idx.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let left = every_tool();
    assert_eq!(left.len(), 15, "{left:?}");
    assert!(left.iter().all(|(p, _)| !removed.contains(p)), "{left:?}");

    let index = open_index(&idx);
    assert_eq!(index.vectors().engine(), url.clone() + "?index=hnsw");
    assert_eq!(index.vectors().ids().unwrap(), index.store().ids().unwrap());
    assert!(index.check().unwrap().consistent);
}

/// A collection made for another model is refused, not mixed into.
#[test]
fn a_collection_of_another_model_is_refused() {
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("library");
    copy_photos(&shared_photos().join("gcompris/fishes"), &library, 3);
    let url = format!("milvus://{server}/{}", collection("model"));
    let out = index(
        &library,
        &dir.path().join("a"),
        &fixture_model("openai-tiny"),
        Some(&url),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = index(
        &library,
        &dir.path().join("b"),
        &fixture_model("laion-tiny"),
        Some(&url),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("holds other vectors"), "{err}");
}

/// An engine that does not answer is named in the error, and an index
/// keeps the engine it was made with.
#[test]
fn an_unreachable_engine_or_another_engine_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("library");
    copy_photos(&shared_photos().join("gcompris/fishes"), &library, 2);
    let model = fixture_model("openai-tiny");
    // Port 1 on this machine: nothing listens there.
    let out = index(
        &library,
        &dir.path().join("a"),
        &model,
        Some("milvus://127.0.0.1:1/photos"),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect to Milvus at 127.0.0.1:1"),
        "{err}"
    );

    let bad = index(
        &library,
        &dir.path().join("b"),
        &model,
        Some("milvus://user:pw@h:1/photos"),
    );
    assert!(
        stderr(&bad).contains("credentials do not go in the address"),
        "{}",
        stderr(&bad)
    );

    let embedded = dir.path().join("c");
    let out = index(&library, &embedded, &model, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = index(
        &library,
        &embedded,
        &model,
        Some("milvus://127.0.0.1:1/photos"),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("keeps its vectors in embedded"), "{err}");
}

/// Runs killed at random moments of their work leave Milvus holding
/// exactly the store's photos, none lost and none twice, and the next run
/// finishes the library.
#[test]
fn killed_runs_leave_milvus_consistent() {
    use crate::index::{assert_index_is_library, kill_mid_run, quick_status_agrees};
    use std::process::{Command, Stdio};
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("library");
    copy_photos(
        &shared_photos().join("gcompris/tools"),
        &library.join("tools"),
        39,
    );
    copy_photos(
        &shared_photos().join("gcompris/fishes"),
        &library.join("fishes"),
        28,
    );
    let idx = dir.path().join("index");
    let model = fixture_model("openai-tiny");
    let url = format!("milvus://{server}/{}", collection("killed"));
    let mut kills = 0;
    for round in 0..12u64 {
        if kills >= 5 {
            break;
        }
        if round == 2 {
            // Change the library between runs: a removal and a move.
            std::fs::remove_file(library.join("tools/hammer1.jpg")).unwrap();
            std::fs::rename(
                library.join("fishes/fish23.jpg"),
                library.join("tools/fish23.jpg"),
            )
            .unwrap();
        }
        let child = Command::new(env!("CARGO_BIN_EXE_clipdex"))
            .args([
                "index",
                library.to_str().unwrap(),
                "--index",
                idx.to_str().unwrap(),
                "--model",
                model.to_str().unwrap(),
                "--vectors",
                &url,
                "--workers",
                "1",
                "--batch",
                "2",
                "--commit-every",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let killed = kill_mid_run(child, &idx, 2 + round * 3);
        if killed {
            kills += 1;
            // `status --check` compares Milvus's ids with the store's.
            let s = quick_status_agrees(&idx);
            assert_eq!(
                s["check"]["consistent"], true,
                "after kill {kills}: {}",
                s["check"]
            );
        }
    }
    assert!(kills >= 3, "only {kills} runs were killed mid-way");
    let out = clipdex(&["reindex", "--index", idx.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_index_is_library(&idx, &library);
    let index = open_index(&idx);
    let ids = index.store().ids().unwrap();
    assert_eq!(ids.len(), 66);
    assert_eq!(index.vectors().ids().unwrap(), ids);
    assert_eq!(index.vectors().count().unwrap(), 66);
}
