//! Automatic tags as a user meets them: `clipdex index --tags`, `retag`,
//! `tags`, the `tag:` filter, and the API's `/api/tags`, photo tags and tag
//! filter. Every photo's tags are checked against the mechanism worked out
//! here from the fixture model's own embeddings (prompt embeddings, softmax
//! at the model's logit scale, broader tags holding their kinds').

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use axum::http::StatusCode;
use clipdex::model::{Clip, HubOptions, ModelSource};
use serde_json::Value;

use crate::common::{
    clipdex, copy_photos, fixture_model, open_index, shared_photos, stderr, stdout,
};
use crate::server::{Served, get, index_with_tiny_model_and, state};

/// A vocabulary with a contrast class and a kind (`hammer < tool`).
const VOCABULARY: &str =
    "# test\ntemplate: a photo of a {}.\n- thing\nfish\ntool\nhammer < tool\nmonument | landmark\n";
const NAMES: [&str; 4] = ["fish", "tool", "hammer", "monument"];

/// The fixture model at the precision a new index is made with, as the
/// tests' indexes are (bf16 on CPUs with AMX, AVX512-BF16 or AVX2 only).
fn tiny() -> Clip {
    Clip::load_with(
        &ModelSource::Dir(fixture_model("openai-tiny")),
        &HubOptions {
            offline: true,
            progress: false,
        },
        clipdex::model::default_precision(),
    )
    .unwrap()
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

/// Each tag's probability for `image`, worked out without the tagger.
fn expected(clip: &Clip, image: &[f32]) -> BTreeMap<&'static str, f32> {
    let prompts = [
        vec!["a photo of a fish."],
        vec!["a photo of a tool."],
        vec!["a photo of a hammer."],
        vec!["a photo of a monument.", "a photo of a landmark."],
        vec!["a photo of a thing."],
    ];
    let scale = clip.logit_scale().unwrap();
    let logits: Vec<f32> = prompts
        .iter()
        .map(|p| {
            let e = clip.embed_texts(p).unwrap();
            let mean: Vec<f32> = (0..e[0].len())
                .map(|j| e.iter().map(|v| v[j]).sum::<f32>())
                .collect();
            let t = unit(&mean);
            scale * t.iter().zip(image).map(|(a, b)| a * b).sum::<f32>()
        })
        .collect();
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let p: Vec<f32> = logits.iter().map(|l| (l - max).exp() / total).collect();
    BTreeMap::from([
        ("fish", p[0]),
        ("tool", p[1] + p[2]),
        ("hammer", p[2]),
        ("monument", p[3]),
    ])
}

/// Every record's tags agree with `expected` at `threshold` (a tag within
/// 1e-4 of it may go either way).
fn check_tags(index: &Path, clip: &Clip, threshold: f32) -> BTreeMap<String, BTreeSet<String>> {
    let index = open_index(index);
    let mut by_path = BTreeMap::new();
    for record in index.store().records() {
        let record = record.unwrap();
        let vector = index.store().vector(record.id).unwrap().unwrap();
        let want = expected(clip, &vector);
        let got: BTreeMap<&str, f32> = record.tags.iter().map(|t| (t.name.as_str(), t.p)).collect();
        for name in NAMES {
            let p = want[name];
            if (p - threshold).abs() < 1e-4 {
                continue;
            }
            match got.get(name) {
                Some(q) => {
                    assert!(p >= threshold, "{}: {name} {p} given", record.path);
                    assert!((q - p).abs() < 2e-3, "{}: {name} {q} vs {p}", record.path);
                }
                None => assert!(p < threshold, "{}: {name} {p} missing", record.path),
            }
        }
        let probabilities: Vec<f32> = record.tags.iter().map(|t| t.p).collect();
        assert!(probabilities.windows(2).all(|w| w[0] >= w[1]), "{record:?}");
        by_path.insert(
            record.path.clone(),
            record.tags.iter().map(|t| t.name.clone()).collect(),
        );
    }
    by_path
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Photos of three kinds, indexed with the vocabulary at 0.3.
fn tagged_library() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("photos");
    for folder in ["fishes", "tools", "monuments"] {
        copy_photos(
            &shared_photos().join("gcompris").join(folder),
            &library.join(folder),
            4,
        );
    }
    let vocabulary = dir.path().join("tags.txt");
    std::fs::write(&vocabulary, VOCABULARY).unwrap();
    let vocabulary = vocabulary.to_str().unwrap().to_string();
    index_with_tiny_model_and(
        dir,
        library,
        &["--tags", &vocabulary, "--tag-threshold", "0.3"],
    )
}

#[test]
fn photos_are_tagged_filtered_listed_and_retagged() {
    let served = tagged_library();
    let index = served.index.to_str().unwrap();
    let clip = tiny();
    let tags = check_tags(&served.index, &clip, 0.3);
    let with = |name: &str| -> BTreeSet<String> {
        tags.iter()
            .filter(|(_, t)| t.contains(name))
            .map(|(p, _)| p.clone())
            .collect()
    };
    assert!(
        tags.values().any(|t| !t.is_empty()),
        "no photo has a tag: {tags:?}"
    );

    // `tag:` in the query and --tag select exactly the photos with the tag.
    for name in NAMES {
        for args in [
            vec!["search", &*format!("tag:{name}")],
            vec!["search", "photo", "--tag", name],
        ] {
            let mut args = args.clone();
            args.extend(["--index", index, "--json", "-k", "100", "--cutoff", "none"]);
            let out = clipdex(&args);
            assert!(out.status.success(), "{}", stderr(&out));
            let found: BTreeSet<String> = json_lines(&stdout(&out))
                .iter()
                .map(|h| h["path"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(found, with(name), "{args:?}");
        }
    }

    // The tag list: counts, a cover with the tag, the vocabulary.
    let out = clipdex(&["tags", "--index", index, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["enabled"], true);
    assert_eq!(list["vocabulary_size"], 4);
    assert_eq!(list["threshold"].as_f64().unwrap() as f32, 0.3);
    let listed = list["tags"].as_array().unwrap();
    assert_eq!(
        listed.len(),
        NAMES.iter().filter(|n| !with(n).is_empty()).count()
    );
    for t in listed {
        let name = t["name"].as_str().unwrap();
        assert_eq!(
            t["count"].as_u64().unwrap() as usize,
            with(name).len(),
            "{t}"
        );
        let cover = t["cover"]["path"].as_str().unwrap();
        assert!(with(name).contains(cover), "{t}");
    }
    let counts: Vec<u64> = listed
        .iter()
        .map(|t| t["count"].as_u64().unwrap())
        .collect();
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");

    // Another threshold: re-tagged from the stored embeddings, no photo read.
    let out = clipdex(&[
        "retag",
        "--index",
        index,
        "--tag-threshold",
        "0.5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let done: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(done["photos"], 12);
    let stricter = check_tags(&served.index, &clip, 0.5);
    for (path, t) in &stricter {
        assert!(
            t.is_subset(&tags[path]),
            "{path}: {t:?} not in {:?}",
            tags[path]
        );
    }

    // A new photo gets its tags as it is embedded, with the index's setup.
    copy_photos(
        &shared_photos().join("gcompris").join("renewable"),
        &served.library.join("renewable"),
        2,
    );
    let out = clipdex(&["reindex", "--index", index]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(check_tags(&served.index, &clip, 0.5).len(), 14);

    // A bad tag file is refused, naming the problem; the index keeps its tags.
    let dir = served.dir.path();
    for (text, says) in [
        ("", "lists no tags"),
        ("# only a comment\n- thing\n", "lists no tags"),
        ("dog\nDog\n", "line 2"),
        ("dog < pet\n", "\"pet\" is not"),
        ("template: no slot\ndog\n", "{}"),
    ] {
        let file = dir.join("bad.txt");
        std::fs::write(&file, text).unwrap();
        let out = clipdex(&["retag", "--index", index, "--tags", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{text:?} accepted");
        let err = stderr(&out);
        assert!(
            err.contains("bad.txt") && err.contains(says),
            "{text:?}: {err}"
        );
    }
    for bad in [
        ["--tag-threshold", "0"],
        ["--tag-threshold", "1.5"],
        ["--tags", "/no/such/file"],
    ] {
        let out = clipdex(&["retag", "--index", index, bad[0], bad[1]]);
        assert!(!out.status.success(), "{bad:?} accepted");
    }
    let out = clipdex(&["search", "tag:\"a,b\"", "--index", index]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("may not"), "{}", stderr(&out));
    assert_eq!(check_tags(&served.index, &clip, 0.5).len(), 14);

    // No tags: every photo loses them, the list says so.
    let out = clipdex(&["retag", "--index", index, "--no-tags"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let index_now = open_index(&served.index);
    assert!(
        index_now
            .store()
            .records()
            .all(|r| r.unwrap().tags.is_empty())
    );
    drop(index_now);
    let out = clipdex(&["tags", "--index", index, "--json"]);
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (
            list["enabled"].clone(),
            list["tags"].as_array().unwrap().len()
        ),
        (Value::Bool(false), 0)
    );
}

/// An index made before tags gets the built-in vocabulary at its next run.
#[test]
fn an_index_without_tags_gets_the_builtin_vocabulary() {
    let served = tagged_library();
    {
        let index = open_index(&served.index);
        index.store().raw_tree().remove(b"m:tags").unwrap();
    }
    let out = clipdex(&["reindex", "--index", served.index.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let index = open_index(&served.index);
    let setup = index.store().tag_setup().unwrap().unwrap().unwrap();
    assert_eq!(setup.source, "built-in");
    assert_eq!(setup.text, clipdex::indexer::tags::BUILTIN);
}

#[tokio::test]
async fn the_api_lists_filters_and_shows_tags() {
    let served = tagged_library();
    let clip = tiny();
    let tags = check_tags(&served.index, &clip, 0.3);
    let s = state(&served, None);

    let list = get(&s, "/api/tags").await;
    assert_eq!(list.status, StatusCode::OK);
    let list = list.json();
    let first = &list["tags"][0];
    let name = first["name"].as_str().unwrap().to_string();
    let with: BTreeSet<&String> = tags
        .iter()
        .filter(|(_, t)| t.contains(&name))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(first["count"].as_u64().unwrap() as usize, with.len());

    // The photo shows its tags, most probable first.
    let id = first["cover"]["id"].as_u64().unwrap();
    let photo = get(&s, &format!("/api/photos/{id}")).await.json();
    let shown: Vec<&str> = photo["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(shown.contains(&name.as_str()), "{photo}");

    // The tag filter, as a parameter and in the query box; hits carry tags.
    for uri in [
        format!("/api/search?q=photo&tag={name}&k=100&cutoff=none"),
        format!("/api/search?q=tag:{name}&k=100"),
    ] {
        let reply = get(&s, &uri).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}");
        let body = reply.json();
        let found: BTreeSet<String> = body["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                assert!(
                    h["tags"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|t| t["name"] == name.as_str())
                );
                h["path"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(found.iter().collect::<BTreeSet<_>>(), with, "{uri}");
    }
    let understood = get(&s, &format!("/api/search?q=tag:{name}")).await.json();
    assert_eq!(understood["understood"][0]["field"], "tag");

    for bad in ["/api/search?q=x&tag=a:b", "/api/search?q=tag:%22a,b%22"] {
        let reply = get(&s, bad).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

/// A running server takes tag options and applies them by a re-index at
/// start; `clipdex retag` on the index it holds says who holds it.
#[test]
fn the_server_applies_tag_options_at_start() {
    let served = tagged_library();
    let vocabulary = served.dir.path().join("other.txt");
    std::fs::write(&vocabulary, "fish\nmonument\n").unwrap();
    let server = crate::web::serve(
        &served.index,
        &[
            "--tags",
            vocabulary.to_str().unwrap(),
            "--tag-threshold",
            "0.25",
        ],
    );
    let start = std::time::Instant::now();
    loop {
        let (_, list) = crate::web::get_json(&server.url, "/api/tags");
        if list["vocabulary"] == vocabulary.to_str().unwrap() {
            assert_eq!(list["threshold"].as_f64().unwrap() as f32, 0.25);
            assert_eq!(list["vocabulary_size"], 2);
            assert!(
                list["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|t| t["name"] == "fish" || t["name"] == "monument")
            );
            break;
        }
        assert!(start.elapsed().as_secs() < 60, "not re-tagged: {list}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = clipdex(&[
        "retag",
        "--index",
        served.index.to_str().unwrap(),
        "--no-tags",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
}
