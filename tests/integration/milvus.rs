//! Milvus as the vector engine (`--vectors milvus://`), against the real
//! standalone server: `.ci/run` starts one (`scripts/milvus_server.sh`) and
//! names it in `CLIPDEX_TEST_MILVUS` (HOST:PORT), and its folder in
//! `CLIPDEX_TEST_MILVUS_DIR`, where one test stops and restarts it. Without
//! them these tests say so and pass, except under CI, where a missing
//! server fails them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::{
    clipdex, copy_photos, fixture_model, open_index, shared_photos, stderr, stdout,
};

/// The test server's address, held for a test: most tests share the
/// server, and the one that stops and restarts it holds it alone.
struct Server {
    address: String,
    _held: Held,
}

enum Held {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

static SERVER: std::sync::RwLock<()> = std::sync::RwLock::new(());

impl std::ops::Deref for Server {
    type Target = str;
    fn deref(&self) -> &str {
        &self.address
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.address)
    }
}

/// The test server's address, or `None` (outside CI) to skip.
fn address() -> Option<String> {
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

/// The test server, shared with the other tests.
fn server() -> Option<Server> {
    let address = address()?;
    let held = Held::Shared(SERVER.read().unwrap_or_else(|e| e.into_inner()));
    Some(Server {
        address,
        _held: held,
    })
}

/// The test server held alone, and the folder `scripts/milvus_server.sh`
/// started it in (`CLIPDEX_TEST_MILVUS_DIR`), to stop and restart it.
fn server_alone() -> Option<(Server, std::path::PathBuf)> {
    let address = address()?;
    let Some(folder) = std::env::var_os("CLIPDEX_TEST_MILVUS_DIR") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must name the Milvus server's folder (CLIPDEX_TEST_MILVUS_DIR)"
        );
        eprintln!("skipped: set CLIPDEX_TEST_MILVUS_DIR to the server's folder to restart it");
        return None;
    };
    let held = Held::Alone(SERVER.write().unwrap_or_else(|e| e.into_inner()));
    let server = Server {
        address,
        _held: held,
    };
    Some((server, folder.into()))
}

/// Stops or restarts the test server (`scripts/milvus_server.sh`).
fn control_server(command: &str, folder: &Path) {
    let out = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/milvus_server.sh"),
    )
    .args([command, folder.to_str().unwrap()])
    .output()
    .unwrap();
    assert!(out.status.success(), "{command}: {}", stderr(&out));
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

/// The hits of `clipdex search` of `query` (the words, then any options)
/// in `index` by meaning alone (no keywords, no cutoff): path and score.
fn by_meaning(index: &Path, query: &[&str]) -> Vec<(String, f32)> {
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
        let (a, b) = (by_meaning(&embedded, query), by_meaning(&remote, query));
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
    let library = tools_and_fishes(dir.path(), 39, 28);
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

/// `clipdex index` of one shard of `library` into `url`, as a child process.
fn spawn_shard(
    library: &Path,
    index: &Path,
    url: &str,
    shard: &str,
    quick_commits: bool,
) -> std::process::Child {
    let model = fixture_model("openai-tiny");
    let mut args = vec![
        "index",
        library.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--vectors",
        url,
        "--shard",
        shard,
        "--workers",
        "1",
    ];
    if quick_commits {
        args.extend(["--batch", "2", "--commit-every", "2"]);
    }
    std::process::Command::new(env!("CARGO_BIN_EXE_clipdex"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The paths a shard's index holds, after checking that the engine holds
/// exactly its photos (none missing, none twice, none of another shard's).
fn shard_paths(index: &Path) -> BTreeSet<String> {
    let index = open_index(index);
    let ids = index.store().ids().unwrap();
    assert_eq!(index.vectors().ids().unwrap(), ids);
    assert_eq!(index.vectors().count().unwrap(), ids.len());
    let (shard, _) = index.vectors().shard();
    assert!(ids.iter().all(|id| shard.ids().contains(id)), "{ids:?}");
    let paths: BTreeSet<String> = index.store().records().map(|r| r.unwrap().path).collect();
    assert_eq!(paths.len(), ids.len());
    paths
}

/// Checks that the two shards' indexes hold every file of `library`
/// exactly once, as the engine does; their paths.
fn shards_are_library(
    d0: &Path,
    d1: &Path,
    library: &Path,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let (p0, p1) = (shard_paths(d0), shard_paths(d1));
    assert!(p0.is_disjoint(&p1), "{:?}", p0.intersection(&p1));
    let all: BTreeSet<String> = p0.union(&p1).cloned().collect();
    assert_eq!(all, crate::index::library_files(library));
    (p0, p1)
}

/// A library under `root` of `tools` photos of tools and `fishes` of fishes,
/// in two folders.
fn tools_and_fishes(root: &Path, tools: usize, fishes: usize) -> std::path::PathBuf {
    let library = root.join("library");
    copy_photos(
        &shared_photos().join("gcompris/tools"),
        &library.join("tools"),
        tools,
    );
    copy_photos(
        &shared_photos().join("gcompris/fishes"),
        &library.join("fishes"),
        fishes,
    );
    library
}

/// Two shards (`0/2`, `1/2`, folders `shard0` and `shard1`) of a library
/// of 50 photos under `root` indexed at the same time into a new exact
/// collection: the library, the collection's address and the two folders.
fn two_shards_at_once(
    root: &Path,
    server: &str,
    label: &str,
) -> (
    std::path::PathBuf,
    String,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let library = tools_and_fishes(root, 30, 20);
    let url = format!("milvus://{server}/{}?index=flat", collection(label));
    let (d0, d1) = (root.join("shard0"), root.join("shard1"));
    let a = spawn_shard(&library, &d0, &url, "0/2", false);
    let b = spawn_shard(&library, &d1, &url, "1/2", false);
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    (library, url, d0, d1)
}

/// Two indexers, `--shard 0/2` and `--shard 1/2`, index one library into
/// one collection at the same time, each with its own index folder: every
/// photo is then in the collection exactly once, `status` on either folder
/// shows both shards from the engine, and a writer that would split the
/// collection another way is refused.
#[test]
fn two_shards_index_one_library_at_once() {
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (library, url, d0, d1) = two_shards_at_once(dir.path(), &server, "shards");
    let (p0, p1) = shards_are_library(&d0, &d1, &library);
    assert!(
        p0.len() >= 10 && p1.len() >= 10,
        "{} and {}",
        p0.len(),
        p1.len()
    );

    // Any folder's status reads every shard from the engine.
    for (folder, name) in [(&d0, "shard 0/2"), (&d1, "shard 1/2")] {
        let out = clipdex(&["status", "--index", folder.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let s: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let shards = s["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 2, "{s}");
        for (i, (shard, paths)) in shards.iter().zip([&p0, &p1]).enumerate() {
            assert_eq!(shard["shard"]["index"], i as u64);
            assert_eq!(shard["shard"]["count"], 2);
            assert_eq!(shard["photos"], paths.len() as u64, "{shard}");
            assert_eq!(shard["report"]["state"], "done", "{shard}");
            assert_eq!(shard["report"]["files"], paths.len() as u64, "{shard}");
        }
        let engine = s["vectors_engine"].as_str().unwrap();
        assert!(engine.ends_with(name), "{engine}");
    }
    let out = clipdex(&["status", "--index", d1.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(
        text.contains("shards   2 of 2 reported, 50 photos"),
        "{text}"
    );

    // A shard's own searches find its photos only, every one of them.
    let found = hits(&[
        "search",
        "a tool",
        "--index",
        d0.to_str().unwrap(),
        "-k",
        "100",
        "--cutoff",
        "none",
        "--json",
    ]);
    let found: BTreeSet<String> = found.into_iter().map(|(p, _)| p).collect();
    assert_eq!(found, p0);

    // Another split, or the whole library, would write over the shards.
    let model = fixture_model("openai-tiny");
    let refused = [
        spawn_shard(&library, &dir.path().join("other"), &url, "0/3", false)
            .wait_with_output()
            .unwrap(),
        index(&library, &dir.path().join("whole"), &model, Some(&url)),
    ];
    for out in refused {
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("is split into 2 shards"), "{err}");
    }
    // A shard keeps its folder, and needs a shared engine.
    let out = clipdex(&[
        "index",
        library.to_str().unwrap(),
        "--index",
        d0.to_str().unwrap(),
        "--shard",
        "1/2",
    ]);
    assert!(stderr(&out).contains("not shard 1/2"), "{}", stderr(&out));
    let out = clipdex(&[
        "index",
        library.to_str().unwrap(),
        "--index",
        dir.path().join("embedded").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--shard",
        "1/2",
    ]);
    assert!(
        stderr(&out).contains("one shared engine"),
        "{}",
        stderr(&out)
    );
    // Both shards are untouched by the refusals.
    assert_eq!(shard_paths(&d0), p0);
    assert_eq!(shard_paths(&d1), p1);
}

/// A shard killed with SIGKILL in the middle of its run, while the other
/// shard indexes, loses and duplicates nothing when it runs again, and the
/// other shard's photos are untouched.
#[test]
fn a_killed_shard_resumes_without_loss_or_duplicates() {
    use crate::index::kill_mid_run;
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let library = tools_and_fishes(dir.path(), 30, 20);
    let url = format!("milvus://{server}/{}", collection("killed_shard"));
    let (d0, d1) = (dir.path().join("shard0"), dir.path().join("shard1"));
    let other = spawn_shard(&library, &d0, &url, "0/2", false);
    let mut kills = 0;
    for round in 0..6u64 {
        let child = spawn_shard(&library, &d1, &url, "1/2", true);
        if kill_mid_run(child, &d1, 2 + round * 4) {
            kills += 1;
        } else {
            break;
        }
    }
    assert!(kills >= 1, "the shard finished before it could be killed");
    let out = other.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = spawn_shard(&library, &d1, &url, "1/2", false)
        .wait_with_output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    shards_are_library(&d0, &d1, &library);
    let out = clipdex(&["status", "--index", d0.to_str().unwrap(), "--json"]);
    let s: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let total: u64 = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["photos"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 50, "{s}");
}

/// `clipdex replica` of the collection `url` into `replica` (made, or
/// synced), on the fixture model.
fn replica_of(replica: &Path, url: &str, library: &Path, extra: &[&str]) -> std::process::Output {
    let model = fixture_model("openai-tiny");
    let mut args = vec![
        "replica",
        "--index",
        replica.to_str().unwrap(),
        "--of",
        url,
        "--library",
        library.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ];
    args.extend(extra);
    clipdex(&args)
}

/// The ids, paths and scores of an API search's hits.
fn api_hits(base: &str, query: &str) -> Vec<(u64, String, f64)> {
    let (status, body) = crate::web::get_json(base, query);
    assert_eq!(status, 200, "{query}: {body}");
    body["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["id"].as_u64().unwrap(),
                h["path"].as_str().unwrap().to_string(),
                h["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Two search replicas of a collection that two shards wrote, each made
/// from the collection alone (`clipdex replica`) and served by `clipdex
/// serve`, answer every query alike (text, paging, filters, keywords,
/// find-similar, browsing), as the embedded engine does; after files are
/// removed and the shards re-indexed, neither returns them, at once, and
/// their copies of the records follow.
#[test]
fn replicas_answer_alike_and_never_return_removed_photos() {
    use crate::web::{get_json, serve};
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (library, url, d0, d1) = two_shards_at_once(dir.path(), &server, "replicas");
    let model = fixture_model("openai-tiny");
    let embedded = dir.path().join("embedded");
    let out = index(&library, &embedded, &model, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let replicas = [dir.path().join("replica1"), dir.path().join("replica2")];
    for r in &replicas {
        let out = replica_of(r, &url, &library, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out).contains(": 50 photos (50 added"),
            "{}",
            stdout(&out)
        );
    }
    // A replica is not indexed.
    let out = clipdex(&["reindex", "--index", replicas[0].to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is a search replica"),
        "{}",
        stderr(&out)
    );

    let servers = [serve(&replicas[0], &[]), serve(&replicas[1], &[])];
    let (_, status) = get_json(&servers[0].url, "/api/status");
    assert!(
        status["vectors"].as_str().unwrap().ends_with("(replica)"),
        "{status}"
    );
    assert_eq!(status["photos"], 50);
    let first = api_hits(&servers[0].url, "/api/search?q=a%20hammer&k=3");
    let queries = [
        "/api/search?q=a%20red%20fish&k=10".to_string(),
        "/api/search?q=a%20tool&k=5&offset=5".to_string(),
        "/api/search?q=a%20tool&folder=fishes&k=10".to_string(),
        "/api/search?q=scissors%20hammer&k=10".to_string(),
        "/api/search?q=fish&k=10&hybrid=false".to_string(),
        format!("/api/search?q=image:{}&k=6", first[0].0),
        "/api/search?q=&folder=tools&k=40".to_string(),
    ];
    for q in &queries {
        let (x, y) = (api_hits(&servers[0].url, q), api_hits(&servers[1].url, q));
        assert!(!x.is_empty(), "{q}");
        assert_eq!(x.len(), y.len(), "{q}");
        for (h, g) in x.iter().zip(&y) {
            assert_eq!((h.0, &h.1), (g.0, &g.1), "{q}");
            assert!((h.2 - g.2).abs() < 1e-5, "{q}");
        }
    }
    let (status, body) = get_json(
        &servers[1].url,
        &format!("/api/photos/{}/similar?k=5", first[0].0),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["hits"].as_array().unwrap().len(), 5);
    // Thumbnails are made from the originals (a replica indexed nothing).
    let thumb = ureq::get(&format!(
        "{}/api/photos/{}/thumbnail",
        servers[0].url, first[0].0
    ))
    .call()
    .unwrap();
    assert_eq!(thumb.headers()["content-type"], "image/jpeg");

    // By meaning alone, the replicas rank as the embedded engine (through
    // the server that holds the replica, as the CLI does).
    let red_fish = ["a red fish", "-k", "10"];
    let (e, r) = (
        by_meaning(&embedded, &red_fish),
        by_meaning(&replicas[1], &red_fish),
    );
    assert_eq!(e.len(), 10);
    for ((pe, se), (pr, sr)) in e.iter().zip(&r) {
        assert!((se - sr).abs() < 1e-4, "{pe} {se} against {pr} {sr}");
    }

    // Remove five tools and re-index both shards while the replicas serve.
    let removed: Vec<String> = library_paths(&library.join("tools"))[..5]
        .iter()
        .map(|p| {
            std::fs::remove_file(library.join(p)).unwrap();
            p.clone()
        })
        .collect();
    for d in [&d0, &d1] {
        let out = clipdex(&["reindex", "--index", d.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // At once: the engine drops them from every answer, browsing and
    // keyword matches included.
    for s in &servers {
        for q in [
            "/api/search?q=a%20tool&k=100&cutoff=none",
            "/api/search?q=&folder=tools&k=100",
            "/api/search?q=tools&k=100",
        ] {
            let found = api_hits(&s.url, q);
            assert!(
                found.iter().all(|(_, p, _)| !removed.contains(p)),
                "{q}: {found:?}"
            );
        }
    }
    // And the replicas' records follow within a few syncs.
    let start = std::time::Instant::now();
    for s in &servers {
        while get_json(&s.url, "/api/status").1["photos"] != 45 {
            assert!(
                start.elapsed().as_secs() < 60,
                "the replica kept removed photos"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

/// The files of a folder, as paths relative to its parent (the library).
fn library_paths(folder: &Path) -> Vec<String> {
    let name = folder.file_name().unwrap().to_str().unwrap();
    crate::index::library_files(folder)
        .into_iter()
        .map(|f| format!("{name}/{f}"))
        .collect()
}

/// The engine stopped in the middle of an indexing run, while a replica
/// serves, and started again: the replica answers 503 with a JSON error
/// while it is down and recovers by itself; the run retries with back-off,
/// resumes, and leaves every photo in the engine exactly once.
#[test]
fn the_engine_stopped_and_restarted_loses_nothing() {
    use crate::web::{get_json, serve};
    let Some((server, folder)) = server_alone() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let library = tools_and_fishes(dir.path(), 30, 20);
    let model = fixture_model("openai-tiny");
    let url = format!("milvus://{server}/{}", collection("restart"));
    let writer = dir.path().join("writer");
    let out = index(&library, &writer, &model, Some(&url));
    assert!(out.status.success(), "{}", stderr(&out));
    let replica = dir.path().join("replica");
    let out = replica_of(&replica, &url, &library, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let served = serve(&replica, &[]);
    let query = "/api/search?q=a%20red%20fish&k=5";
    let before = api_hits(&served.url, query);
    assert_eq!(before.len(), 5);
    let before = before[0].0;

    // More photos, and a run that writes them a few at a time.
    for (from, count) in [("erase_animals", 33), ("monuments", 27), ("renewable", 29)] {
        copy_photos(
            &shared_photos().join("gcompris").join(from),
            &library.join(from),
            count,
        );
    }
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_clipdex"))
        .args([
            "index",
            library.to_str().unwrap(),
            "--index",
            writer.to_str().unwrap(),
            "--workers",
            "1",
            "--batch",
            "2",
            "--commit-every",
            "2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while !crate::index::progress_of(&writer, run.id())
        .is_some_and(|p| p["phase"] == "indexing" && p["processed"].as_u64().unwrap_or(0) >= 4)
    {
        if run.try_wait().unwrap().is_some() {
            let out = run.wait_with_output().unwrap();
            panic!("the run ended before the engine stopped: {}", stderr(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    control_server("stop", &folder);
    let (status, body) = get_json(&served.url, query);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "engine_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&*server), "{message}");
    // Find-similar too; the status page still answers.
    let (status, body) = get_json(&served.url, &format!("/api/photos/{before}/similar?k=3"));
    assert_eq!(status, 503, "{body}");
    let (status, body) = get_json(&served.url, "/api/status");
    assert_eq!(status, 200, "{body}");
    // The run waits for the engine meanwhile.
    std::thread::sleep(std::time::Duration::from_secs(3));

    control_server("restart", &folder);
    let back = std::time::Instant::now();
    loop {
        let (status, body) = get_json(&served.url, query);
        if status == 200 {
            assert_eq!(body["hits"].as_array().unwrap().len(), 5, "{body}");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            back.elapsed().as_secs() < 60,
            "the replica did not recover: {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let out = run.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("retrying"), "the run never waited: {log}");
    crate::index::assert_index_is_library(&writer, &library);
    let index = open_index(&writer);
    let ids = index.store().ids().unwrap();
    assert_eq!(ids.len(), 139);
    assert_eq!(index.vectors().ids().unwrap(), ids);
    assert_eq!(index.vectors().count().unwrap(), 139);
    drop(index);
    // The replica's records follow.
    let start = std::time::Instant::now();
    while get_json(&served.url, "/api/status").1["photos"] != 139 {
        assert!(start.elapsed().as_secs() < 60, "the replica fell behind");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let found = api_hits(&served.url, "/api/search?q=&folder=monuments&k=100");
    assert_eq!(found.len(), 27, "{found:?}");
    // And it ranks as the writer's folder does.
    let replica: Vec<String> = api_hits(
        &served.url,
        "/api/search?q=a%20red%20fish&k=10&hybrid=false&cutoff=none",
    )
    .into_iter()
    .map(|(_, path, _)| path)
    .collect();
    let writer: Vec<String> = by_meaning(&writer, &["a red fish", "-k", "10"])
        .into_iter()
        .map(|(path, _)| path)
        .collect();
    assert_eq!(replica, writer);
}

/// A replica that lost photos the collection holds (a sync that read the
/// engine while it answered with less, as after a restart) gets them back
/// at its next sync, without reading every record.
#[test]
fn a_replica_brings_back_photos_it_lost() {
    use clipdex::store::Change;
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let library = tools_and_fishes(dir.path(), 12, 8);
    let model = fixture_model("openai-tiny");
    let url = format!("milvus://{server}/{}", collection("lost"));
    let out = index(&library, &dir.path().join("writer"), &model, Some(&url));
    assert!(out.status.success(), "{}", stderr(&out));
    let replica = dir.path().join("replica");
    let sync = || {
        let out = replica_of(&replica, &url, &library, &["--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()
    };
    assert_eq!(sync()["photos"], 20);
    let lost: Vec<u64> = {
        let index = open_index(&replica);
        let records: Vec<_> = index
            .store()
            .records()
            .map(|r| r.unwrap())
            .take(7)
            .collect();
        let ids = records.iter().map(|r| r.id).collect();
        for r in &records {
            index.keywords().remove(r.id).unwrap();
        }
        index.keywords().commit().unwrap();
        let changes: Vec<Change> = records
            .into_iter()
            .map(|record| Change::Remove { record })
            .collect();
        index.store().commit(&changes).unwrap();
        ids
    };
    // Records written later than any the collection has: the next sync
    // reads none of them as changed, only the id sets can tell.
    let later = clipdex::common::time::now_millis() + 3_600_000;
    std::fs::write(
        replica.join("replica.json"),
        format!("{{\"newest_ms\":{later}}}"),
    )
    .unwrap();
    let synced = sync();
    assert_eq!(synced["photos"], 20, "{synced}");
    assert_eq!(synced["added"], 7, "{synced}");
    assert_eq!(synced["read"], 7, "{synced}");
    assert_eq!(synced["compared_ids"], true, "{synced}");
    let index = open_index(&replica);
    for id in lost {
        assert!(index.store().get(id).unwrap().is_some(), "{id}");
    }
    assert_eq!(index.keywords().ids().unwrap().len(), 20);
}
