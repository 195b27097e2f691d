//! Property tests over every parser of untrusted input: EXIF and XMP, the
//! query language, dates and filters, image headers and decoders, multipart
//! and JSON bodies and query strings through the router, file names in a
//! library. Each starts from the seed corpora in `tests/corpus/` (and the
//! fixture pictures) and mutates them. The module runs for a bounded time,
//! a minute in all by default (`CLIPDEX_FUZZ_SECONDS`), each target in
//! batches with seeds of their own; `PROPTEST_CASES=N` instead runs exactly
//! N cases per target from fixed seeds. The properties: nothing panics, a
//! server never answers 5xx, and what parses is within the documented
//! limits.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Request, header};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use clipdex::library::{DecodeLimits, decode_bytes, probe};
use clipdex::search::{Filters, parse};

use crate::common::{fixtures, jpeg_with_exif_date};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The lines of a seed file, as bytes.
fn seed_lines(name: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(corpus().join(name)).unwrap();
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The fixture pictures, every format clipdex reads and some broken ones.
fn seed_images() -> Vec<Vec<u8>> {
    let mut paths: Vec<_> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut images: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    images.push(jpeg_with_exif_date(b"2019:07:14 12:30:05"));
    images
}

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Truncate(usize),
    Remove(usize, usize),
    /// Repeat a slice of the input in place (lengths, counts, nesting grow).
    Repeat(usize, usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Remove(i, n)),
        1 => (any::<usize>(), 1usize..32, 1u8..8).prop_map(|(i, n, k)| Edit::Repeat(i, n, k)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len();
        match e {
            Edit::Flip(i, b) if len > 0 => bytes[i % len] ^= b,
            Edit::Insert(i, b) => {
                let at = i % (len + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Edit::Truncate(i) => bytes.truncate(i % (len + 1)),
            Edit::Remove(i, n) if len > 0 => {
                let at = i % len;
                bytes.drain(at..(at + n).min(len));
            }
            Edit::Repeat(i, n, k) if len > 0 => {
                let at = i % len;
                let piece = bytes[at..(at + n).min(len)].to_vec();
                for _ in 0..*k {
                    bytes.splice(at..at, piece.iter().copied());
                }
            }
            _ => {}
        }
    }
    bytes
}

/// A seed (by index, wrapped) with a few edits, or, sometimes, random bytes.
fn mutated(seeds: Vec<Vec<u8>>, max_edits: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        9 => (0..n, prop::collection::vec(edit(), 0..max_edits)).prop_map(move |(i, edits)| apply(seeds[i].clone(), &edits)),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// How many fuzz runs the module makes (some tests make two); each gets an
/// equal share of the time budget.
const RUNS: u32 = 8;

/// Runs `test` on inputs drawn from `strategy` and fails with the smallest
/// failing input proptest finds. With `PROPTEST_CASES` set, exactly that
/// many cases (a fixed seed: a longer, reproducible hunt). Otherwise batches
/// of `cases`, each from its own seed (the first the same in every run),
/// until this run's share of `CLIPDEX_FUZZ_SECONDS` (default 60 for the
/// whole module) is spent; at least one batch always runs. Returns the
/// number of cases run.
fn fuzz<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: &S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64 {
    let fixed = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok());
    let seconds: f64 = std::env::var("CLIPDEX_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let budget = std::time::Duration::from_secs_f64(seconds.max(0.0) / RUNS as f64);
    let start = std::time::Instant::now();
    let mut total = 0u64;
    for batch in 0u64.. {
        let seed = blake3::hash(format!("{name}/{batch}").as_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, seed.as_bytes());
        let config = Config {
            cases: fixed.unwrap_or(cases),
            failure_persistence: None,
            ..Config::default()
        };
        let cases = config.cases;
        TestRunner::new_with_rng(config, rng)
            .run(strategy, &test)
            .unwrap_or_else(|e| panic!("{name}, batch {batch}: {e}"));
        total += u64::from(cases);
        if fixed.is_some() || start.elapsed() >= budget {
            break;
        }
    }
    eprintln!(
        "{name}: {total} cases in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    total
}

#[test]
fn metadata_parsing_never_panics() {
    // EXIF dates of any bytes, inside a valid EXIF block.
    let dates = seed_lines("exif/dates.txt");
    fuzz("EXIF dates", 8000, &mutated(dates, 6), |date| {
        let meta = clipdex::library::meta::read_meta(&jpeg_with_exif_date(&date));
        if let Some(taken) = &meta.taken {
            prop_assert!(clipdex::keyword::parse_datetime(taken).is_some(), "{taken}");
        }
        Ok(())
    });
    // Whole files, mutated anywhere (EXIF blocks, XMP packets, containers).
    let mut seeds = seed_images();
    seeds.push(br#"<x:xmpmeta><dc:description><rdf:Alt><rdf:li xml:lang="x-default">caf&#233; &amp; tea</rdf:li></rdf:Alt></dc:description>"#.to_vec());
    fuzz(
        "metadata of whole files",
        8000,
        &mutated(seeds, 8),
        |bytes| {
            let meta = clipdex::library::meta::read_meta(&bytes);
            prop_assert!((1..=8).contains(&meta.orientation));
            Ok(())
        },
    );
}

#[test]
fn query_language_and_filters_never_panic() {
    let queries = seed_lines("queries/seeds.txt");
    fuzz("query language", 20000, &mutated(queries, 6), |bytes| {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(terms) = parse(&text) {
            prop_assert!(!terms.is_empty() && terms.len() <= clipdex::search::query::MAX_TERMS);
            for t in &terms {
                prop_assert!(t.weight.is_finite() && t.weight.abs() <= 100.0);
            }
        }
        let _ = clipdex::keyword::words(&text);
        Ok(())
    });
    let dates: Vec<Vec<u8>> = [
        "2019-07-14",
        "2019-07-14T12:30:05",
        "2000-02-29 00:00:00",
        "1800-01-01",
        "2200-12-31T23:59:60",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let strings = (mutated(dates, 4), ".{0,40}", ".{0,40}");
    fuzz(
        "dates and filters",
        20000,
        &strings,
        |(date, folder, camera)| {
            let date = String::from_utf8_lossy(&date).into_owned();
            if let Some(secs) = clipdex::keyword::parse_datetime(&date) {
                // Within the years the index can store.
                prop_assert!(
                    (-5_364_662_400..=7_289_654_400).contains(&secs),
                    "{date}: {secs}"
                );
            }
            let filters = Filters {
                folder: Some(folder),
                from: Some(date.clone()),
                to: Some(date),
                types: Some(vec![camera.clone()]),
                tags: Some(vec![camera.clone()]),
                camera: Some(camera),
            };
            let _ = filters.validate();
            Ok(())
        },
    );
}

#[test]
fn image_headers_and_decoders_never_panic() {
    let limits = DecodeLimits {
        max_pixels: 4 << 20,
        ..Default::default()
    };
    fuzz(
        "image headers and decoders",
        4000,
        &mutated(seed_images(), 6),
        |bytes| {
            let header = probe(&bytes, &limits, Some(64));
            let decoded = decode_bytes(&bytes, &limits);
            if let (Ok(h), Ok(d)) = (&header, &decoded) {
                prop_assert_eq!((h.width, h.height), (d.stored_width, d.stored_height));
                prop_assert!(d.rgb.width() > 0 && d.rgb.height() > 0);
            }
            Ok(())
        },
    );
}

#[test]
fn library_file_names_never_panic() {
    use std::os::unix::ffi::OsStrExt;
    let name = prop::collection::vec(
        any::<u8>().prop_filter("no slash or NUL", |b| *b != b'/' && *b != 0),
        1..40,
    );
    fuzz(
        "library file names",
        400,
        &prop::collection::vec((name, any::<bool>()), 1..6),
        |names| {
            let dir = tempfile::tempdir().unwrap();
            let mut made = 0;
            for (n, image) in &names {
                let mut n = n.clone();
                if *image {
                    n.extend_from_slice(b".jpg");
                }
                let path = dir.path().join(std::ffi::OsStr::from_bytes(&n));
                if std::fs::write(&path, b"x").is_ok() {
                    made += 1;
                }
            }
            let scan = clipdex::library::scan::scan(dir.path(), &[]);
            for f in &scan.files {
                prop_assert!(!f.rel.is_empty() && !f.rel.starts_with('/'));
            }
            prop_assert!(scan.files.len() + scan.problems.len() <= made);
            Ok(())
        },
    );
}

/// Percent-encodes all but unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Sends each generated request through the router; no answer may be 5xx.
fn never_5xx(name: &str, cases: u32, requests: impl Strategy<Value = Request<Body>>) {
    let served = crate::server::indexed_library();
    let state = crate::server::state(&served, None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    fuzz(name, cases, &requests, |request| {
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let reply = rt.block_on(crate::server::call(&state, request));
        prop_assert!(
            !reply.status.is_server_error(),
            "{method} {uri}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        if !reply.status.is_success() {
            // Errors are JSON with a code, and leak no path.
            let body = reply.json();
            prop_assert!(body["error"]["code"].is_string(), "{body}");
            prop_assert!(
                !body
                    .to_string()
                    .contains(served.dir.path().to_str().unwrap())
            );
        }
        Ok(())
    });
}

#[test]
fn json_bodies_and_query_strings_never_give_5xx() {
    let bodies = mutated(seed_lines("json/seeds.txt"), 6).prop_map(|body| {
        Request::post("/api/search")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap()
    });
    let params = [
        "q",
        "k",
        "offset",
        "folder",
        "from",
        "to",
        "type",
        "camera",
        "min_score",
        "hybrid",
        "exclude",
        "token",
    ];
    let value = prop_oneof![
        Just("cat".to_string()),
        Just("18446744073709551616".to_string()),
        Just("NaN".to_string()),
        Just("2019-02-30".to_string()),
        "[ -~]{0,30}".prop_map(|s| url_encode(&s)),
        "\\PC{0,12}".prop_map(|s| s.bytes().map(|b| format!("%{b:02X}")).collect()),
    ];
    let queries = (
        prop::sample::select(vec![
            "/api/search",
            "/api/photos/1/similar",
            "/api/photos/1",
            "/api/photos/99999999999999999999/similar",
        ]),
        prop::collection::vec((prop::sample::select(params.to_vec()), value), 0..5),
    )
        .prop_map(|(path, pairs)| {
            let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            Request::get(format!("{path}?{}", q.join("&")))
                .body(Body::empty())
                .unwrap()
        });
    never_5xx(
        "JSON bodies and query strings",
        5000,
        prop_oneof![bodies, queries],
    );
}

#[test]
fn multipart_uploads_never_give_5xx() {
    let photo = std::fs::read(fixtures().join("images/photo.png")).unwrap();
    let jpeg = std::fs::read(fixtures().join("images/photo.jpg")).unwrap();
    let field = prop_oneof![
        Just("file"),
        Just("q"),
        Just("weight"),
        Just("k"),
        Just("offset"),
        Just("folder"),
        Just("from"),
        Just("to"),
        Just("type"),
        Just("camera"),
        Just("other"),
    ];
    let value = prop_oneof![
        mutated(vec![photo, jpeg], 4),
        Just(b"NaN".to_vec()),
        Just(b"-1e39".to_vec()),
        Just(b"18446744073709551615".to_vec()),
        "[ -~]{0,20}".prop_map(String::into_bytes),
    ];
    let form = prop::collection::vec((field, value), 1..4).prop_map(|parts| {
        let parts: Vec<(&str, Option<&str>, &[u8])> = parts
            .iter()
            .map(|(name, data)| {
                (
                    *name,
                    (*name == "file").then_some("upload.png"),
                    data.as_slice(),
                )
            })
            .collect();
        crate::server::multipart(&parts)
    });
    // Sometimes the body is cut or edited after it was framed.
    let requests =
        (form, prop::collection::vec(edit(), 0..2)).prop_map(|((content_type, body), edits)| {
            Request::post("/api/search/image")
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(apply(body, &edits)))
                .unwrap()
        });
    never_5xx("multipart uploads", 3000, requests);
}
