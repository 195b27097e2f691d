//! The HTTP API through the router (`app().oneshot`), over a real TCP port,
//! against its own OpenAPI description, and under a concurrent re-index.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use clipdex::indexer::RunOptions;
use clipdex::model::{Clip, HubOptions, ModelSource};
use clipdex::search::Engine;
use clipdex::server::{self, AppState, ServerConfig, SharedState};
use serde_json::Value;
use tower::ServiceExt;

use crate::common::{clipdex, fixture_model, fixtures, shared_photos, stderr};

pub struct Served {
    pub dir: tempfile::TempDir,
    pub library: PathBuf,
    pub index: PathBuf,
}

/// A small library of shared photos, indexed with the tiny model.
pub fn indexed_library() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("photos");
    let photos = shared_photos().join("gcompris");
    for (folder, take) in [("fishes", 10), ("monuments", 10), ("tools", 6)] {
        let to = library.join(folder);
        std::fs::create_dir_all(&to).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(photos.join(folder))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names.iter().take(take) {
            std::fs::copy(p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(library.join("misc")).unwrap();
    std::fs::copy(
        fixtures().join("images/photo.png"),
        library.join("misc/IMG_2041.png"),
    )
    .unwrap();
    std::fs::write(
        library.join("monuments/IndiaGate.txt"),
        "a war memorial arch in New Delhi",
    )
    .unwrap();
    index_with_tiny_model(dir, library)
}

/// Indexes `library` into `dir/index` with the tiny fixture model.
fn index_with_tiny_model(dir: tempfile::TempDir, library: PathBuf) -> Served {
    index_with_tiny_model_and(dir, library, &[])
}

/// As [`index_with_tiny_model`], with more options for `clipdex index`.
pub fn index_with_tiny_model_and(
    dir: tempfile::TempDir,
    library: PathBuf,
    extra: &[&str],
) -> Served {
    let index = dir.path().join("index");
    let m = fixture_model("openai-tiny").display().to_string();
    let mut args = vec![
        "index",
        library.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "--model",
        &m,
    ];
    args.extend_from_slice(extra);
    let out = clipdex(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    Served {
        dir,
        library,
        index,
    }
}

pub fn config(index: &Path) -> ServerConfig {
    ServerConfig {
        hub: HubOptions {
            offline: true,
            progress: false,
        },
        run: RunOptions::default(),
        max_upload: 1 << 20,
        ..ServerConfig::for_index(index.to_path_buf())
    }
}

/// The index with the fixture model at the precision its vectors were made
/// with (the CPU's default for a new index, unless a test asked for one).
pub fn engine(index: &Path) -> Engine {
    let index = crate::common::open_index(index);
    let clip = Clip::load_with(
        &ModelSource::Dir(fixture_model("openai-tiny")),
        &HubOptions {
            offline: true,
            progress: false,
        },
        index.meta().model.precision,
    )
    .unwrap();
    Engine::new(Arc::new(index), Arc::new(clip)).unwrap()
}

pub fn state(served: &Served, token: Option<&str>) -> SharedState {
    let mut c = config(&served.index);
    c.token = token.map(String::from);
    AppState::with_engine(c, engine(&served.index))
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn call(state: &SharedState, request: Request<Body>) -> Reply {
    let response = server::app(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .unwrap()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn get(state: &SharedState, uri: &str) -> Reply {
    call(state, Request::get(uri).body(Body::empty()).unwrap()).await
}

pub async fn post_json(state: &SharedState, uri: &str, body: &str) -> Reply {
    call(
        state,
        Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await
}

pub fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "clipdexTESTboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub async fn post_multipart(state: &SharedState, parts: &[(&str, Option<&str>, &[u8])]) -> Reply {
    let (content_type, body) = multipart(parts);
    call(
        state,
        Request::post("/api/search/image")
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap(),
    )
    .await
}

pub fn hits(reply: &Reply) -> Vec<Value> {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()["hits"].as_array().unwrap().clone()
}

pub fn assert_error(reply: &Reply, status: StatusCode, code: &str, served: &Served) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    let dir = served.dir.path().to_str().unwrap();
    assert!(
        !message.contains(dir) && !message.contains("panicked") && !message.contains("/work/"),
        "leaks: {message}"
    );
}

/// Offset paging reaches every photo, past any fixed depth: the pages of
/// a small `k` put together are the one page of a large `k`, each photo
/// once, and a page past the end is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_goes_through_every_result() {
    let served = indexed_library();
    let s = state(&served, None);
    let ids = |v: Vec<Value>| -> Vec<u64> { v.iter().map(|h| h["id"].as_u64().unwrap()).collect() };
    let everything = get(&s, "/api/search?q=a%20photo&k=10000").await;
    let total = everything.json()["hits"].as_array().unwrap().len();
    assert!(total > 20, "{total}");
    assert_eq!(everything.json()["more"], false);
    let mut paged = Vec::new();
    let mut offset = 0;
    loop {
        let page = get(&s, &format!("/api/search?q=a%20photo&k=7&offset={offset}")).await;
        let more = page.json()["more"].as_bool().unwrap();
        let got = ids(hits(&page));
        assert!(got.len() == 7 || !more, "a short page says it is the last");
        offset += got.len();
        paged.extend(got);
        if !more {
            break;
        }
    }
    assert_eq!(paged, ids(hits(&everything)));
    for past in [total, total + 1, usize::MAX] {
        let page = get(&s, &format!("/api/search?q=a%20photo&k=5&offset={past}")).await;
        assert!(hits(&page).is_empty());
        assert_eq!(page.json()["more"], false);
    }
    for bad in ["k=10001", "k=0"] {
        let reply = get(&s, &format!("/api/search?q=a%20photo&{bad}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_endpoints_return_ranked_photos() {
    let served = indexed_library();
    let s = state(&served, None);

    let found = hits(&get(&s, "/api/search?q=fish&k=5").await);
    assert_eq!(found.len(), 5);
    let scores: Vec<f64> = found.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    for h in &found {
        let thumb = get(&s, h["thumbnail"].as_str().unwrap()).await;
        assert_eq!(thumb.status, StatusCode::OK);
        assert_eq!(thumb.headers[header::CONTENT_TYPE], "image/jpeg");
        assert!(image::load_from_memory(&thumb.body).is_ok());
    }
    // Pages do not overlap and carry on where the last stopped.
    let page2 = hits(&get(&s, "/api/search?q=fish&k=5&offset=5").await);
    let ids = |v: &[Value]| {
        v.iter()
            .map(|h| h["id"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let all = hits(&get(&s, "/api/search?q=fish&k=10").await);
    assert_eq!([ids(&found), ids(&page2)].concat(), ids(&all));

    // A file name finds its photo through the keyword index.
    let by_name = hits(&get(&s, "/api/search?q=IMG_2041&k=3").await);
    assert_eq!(by_name[0]["path"], "misc/IMG_2041.png");
    assert_eq!(by_name[0]["keyword_rank"], 1);
    // A caption word too, stemmed ("memorials" finds "memorial").
    let by_caption = hits(&get(&s, "/api/search?q=memorials&k=3").await);
    assert_eq!(by_caption[0]["path"], "monuments/IndiaGate.jpg");
    // Filters: folder prefix and type.
    let in_tools = hits(&get(&s, "/api/search?q=a%20photo&k=50&folder=tools").await);
    assert_eq!(in_tools.len(), 6);
    assert!(
        in_tools
            .iter()
            .all(|h| h["path"].as_str().unwrap().starts_with("tools/"))
    );
    let pngs = hits(&get(&s, "/api/search?q=a%20photo&k=50&type=png").await);
    assert_eq!(pngs.len(), 1);
    let none = hits(&get(&s, "/api/search?q=a%20photo&from=2030-01-01").await);
    assert!(none.is_empty());

    // Photo metadata, original, find-similar (itself excluded).
    let id = found[0]["id"].as_u64().unwrap();
    let photo = get(&s, &format!("/api/photos/{id}")).await;
    assert_eq!(photo.status, StatusCode::OK);
    assert_eq!(photo.json()["id"], id);
    let original = get(&s, &format!("/api/photos/{id}/original")).await;
    assert_eq!(original.status, StatusCode::OK);
    assert_eq!(
        original.body,
        std::fs::read(served.library.join(photo.json()["path"].as_str().unwrap())).unwrap()
    );
    let similar = hits(&get(&s, &format!("/api/photos/{id}/similar?k=5")).await);
    assert_eq!(similar.len(), 5);
    assert!(similar.iter().all(|h| h["id"].as_u64().unwrap() != id));

    // Structured and mixed queries.
    let body = format!(
        r#"{{"terms": [{{"text": "a fish", "weight": 1}}, {{"photo": {id}, "weight": 0.5}}, {{"text": "a hammer", "weight": -0.5}}], "k": 4}}"#
    );
    assert_eq!(hits(&post_json(&s, "/api/search", &body).await).len(), 4);
    let q = format!(
        r#"{{"q": "\"a fish\" + 0.5*image:{id} - \"a hammer\"", "k": 4, "filters": {{"folder": "fishes"}}}}"#
    );
    let mixed = hits(&post_json(&s, "/api/search", &q).await);
    assert!(
        mixed
            .iter()
            .all(|h| h["path"].as_str().unwrap().starts_with("fishes/"))
    );

    // Search by an uploaded picture: a photo of the library finds itself first.
    let path = served.library.join(photo.json()["path"].as_str().unwrap());
    let bytes = std::fs::read(&path).unwrap();
    let by_image =
        hits(&post_multipart(&s, &[("file", Some("x.jpg"), &bytes), ("k", None, b"3")]).await);
    assert_eq!(by_image[0]["id"], id);
    assert!(by_image[0]["similarity"].as_f64().unwrap() > 0.99);

    let status = get(&s, "/api/status").await.json();
    assert_eq!(status["state"], "ready");
    assert_eq!(status["photos"], 27);
    // A new index is made at the CPU's default precision.
    assert_eq!(
        status["precision"],
        clipdex::model::default_precision().name()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_right_status() {
    let served = indexed_library();
    let s = state(&served, None);
    use StatusCode as S;
    assert_error(
        &get(&s, "/api/search?q=").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/search").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/search?q=cat&k=0").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/search?q=cat&k=100000").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/search?q=cat&k=abc").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/search?q=cat&from=yesterday").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/search?q=%22unclosed").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/search?q=image:99999").await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    assert_error(
        &get(&s, "/api/search?q=image:no/such.jpg").await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    assert_error(
        &get(&s, "/api/search?q=-%20%22only%20negative%22").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    // A query far over the limit (a URI cannot hold 1 MB; see the TCP test).
    let long = format!("/api/search?q={}", "a".repeat(60_000));
    assert_error(&get(&s, &long).await, S::BAD_REQUEST, "bad_query", &served);
    let long_json = format!(r#"{{"q": "{}"}}"#, "a".repeat(1 << 20));
    assert_error(
        &post_json(&s, "/api/search", &long_json).await,
        S::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &served,
    );
    assert_error(
        &post_json(&s, "/api/search", "{not json").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &post_json(&s, "/api/search", r#"{"q": "x", "bogus": 1}"#).await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &post_json(&s, "/api/search", r#"{"q": "x", "terms": [{"text": "y"}]}"#).await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &post_json(
            &s,
            "/api/search",
            r#"{"terms": [{"text": "y", "photo": 1}]}"#,
        )
        .await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &post_json(
            &s,
            "/api/search",
            r#"{"terms": [{"text": "y", "weight": 1e30}]}"#,
        )
        .await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    let no_type = call(
        &s,
        Request::post("/api/search")
            .body(Body::from(r#"{"q":"x"}"#))
            .unwrap(),
    )
    .await;
    assert_error(
        &no_type,
        S::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &served,
    );
    // Ids.
    assert_error(
        &get(&s, "/api/photos/424242").await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    assert_error(
        &get(&s, "/api/photos/424242/thumbnail").await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    assert_error(
        &get(&s, "/api/photos/424242/original").await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    assert_error(
        &get(&s, "/api/photos/424242/similar").await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    assert_error(
        &get(&s, "/api/photos/-1").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/photos/..%2F..%2Fetc%2Fpasswd/original").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &get(&s, "/api/nothing/here").await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    // Uploads.
    let big = vec![0u8; 2 << 20];
    assert_error(
        &post_multipart(&s, &[("file", Some("big.jpg"), &big)]).await,
        S::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &served,
    );
    assert_error(
        &post_multipart(&s, &[("file", Some("a.jpg"), b"not an image")]).await,
        S::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &served,
    );
    assert_error(
        &post_multipart(&s, &[("file", Some("a.jpg"), b"")]).await,
        S::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &served,
    );
    let truncated = std::fs::read(fixtures().join("images/truncated.jpg")).unwrap();
    assert_error(
        &post_multipart(&s, &[("file", Some("t.jpg"), &truncated)]).await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &post_multipart(&s, &[("k", None, b"3")]).await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    assert_error(
        &post_multipart(&s, &[("evil", None, b"3")]).await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    let garbage = call(
        &s,
        Request::post("/api/search/image")
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=x")
            .body(Body::from("garbage"))
            .unwrap(),
    )
    .await;
    assert_eq!(garbage.status, S::BAD_REQUEST);
    // Re-index: one at a time.
    let first = call(
        &s,
        Request::post("/api/reindex").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(first.status, S::ACCEPTED);
    let second = call(
        &s,
        Request::post("/api/reindex").body(Body::empty()).unwrap(),
    )
    .await;
    assert_error(&second, S::CONFLICT, "conflict", &served);
    while s.job().running {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Not ready yet: 503.
    let cold = AppState::new(config(&served.index));
    assert_error(
        &get(&cold, "/api/search?q=cat").await,
        S::SERVICE_UNAVAILABLE,
        "not_ready",
        &served,
    );
    assert_error(
        &call(
            &cold,
            Request::post("/api/reindex").body(Body::empty()).unwrap(),
        )
        .await,
        S::SERVICE_UNAVAILABLE,
        "not_ready",
        &served,
    );
    assert_eq!(get(&cold, "/api/status").await.json()["state"], "starting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_every_request() {
    let served = indexed_library();
    let s = state(&served, Some("s3cr3t-token"));
    for uri in [
        "/",
        "/api/status",
        "/api/search?q=fish",
        "/api/photos/1/thumbnail",
        "/api/openapi.json",
    ] {
        let r = get(&s, uri).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(r.json()["error"]["code"], "unauthorized");
    }
    assert_eq!(
        get(&s, "/api/status?token=wrong").await.status,
        StatusCode::UNAUTHORIZED
    );
    let bearer = call(
        &s,
        Request::get("/api/status")
            .header(header::AUTHORIZATION, "Bearer s3cr3t-token")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(bearer.status, StatusCode::OK);
    let page = get(&s, "/?token=s3cr3t-token").await;
    assert_eq!(page.status, StatusCode::OK);
    let cookie = page.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(cookie.contains("HttpOnly"));
    let pair = cookie.split(';').next().unwrap().to_string();
    let with_cookie = call(
        &s,
        Request::get("/api/search?q=fish")
            .header(header::COOKIE, pair)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(with_cookie.status, StatusCode::OK);
    // No CORS headers unless asked for.
    assert!(
        bearer
            .headers
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none()
    );
    let mut c = config(&served.index);
    c.cors = Some("https://photos.example".into());
    drop(s);
    let cors = AppState::with_engine(c, engine(&served.index));
    let pre = call(
        &cors,
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/api/search")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        pre.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://photos.example"
    );
}

/// Checks a JSON value against an OpenAPI 3.1 schema; objects may not carry
/// undocumented fields.
fn validate(value: &Value, schema: &Value, doc: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        return validate(value, &doc["components"]["schemas"][name], doc, at);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            return if options.iter().any(|o| validate(value, o, doc, at).is_ok()) {
                Ok(())
            } else {
                Err(format!("{at}: matches none of {key}"))
            };
        }
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        // The parts describe one object together (a flattened struct): their
        // properties and requirements merged.
        let resolve = |s: &Value| -> Value {
            match s.get("$ref").and_then(Value::as_str) {
                Some(r) => doc["components"]["schemas"]
                    [r.trim_start_matches("#/components/schemas/")]
                .clone(),
                None => s.clone(),
            }
        };
        let mut properties = serde_json::Map::new();
        let mut required = Vec::new();
        for part in all.iter().map(resolve) {
            if let Some(p) = part.get("properties").and_then(Value::as_object) {
                properties.extend(p.clone());
            }
            if let Some(r) = part.get("required").and_then(Value::as_array) {
                required.extend(r.iter().cloned());
            }
        }
        let merged =
            serde_json::json!({"type": "object", "properties": properties, "required": required});
        return validate(value, &merged, doc, at);
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()),
    };
    let ok = types.iter().any(|t| match *t {
        "null" => value.is_null(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => false,
    });
    if !ok {
        return Err(format!("{at}: {value} is not {types:?}"));
    }
    if let (Value::Object(map), Some(props)) =
        (value, schema.get("properties").and_then(Value::as_object))
    {
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = req.as_str().unwrap();
            if !map.contains_key(req) {
                return Err(format!("{at}: missing required {req}"));
            }
        }
        for (k, v) in map {
            let sub = props
                .get(k)
                .ok_or_else(|| format!("{at}: field {k} is not documented"))?;
            validate(v, sub, doc, &format!("{at}.{k}"))?;
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            validate(item, item_schema, doc, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn check_against_doc(doc: &Value, path: &str, method: &str, reply: &Reply) {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let status = reply.status.as_u16().to_string();
    let response = &op["responses"][&status];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which is not documented"
    );
    let content = &response["content"];
    let content_type = reply
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    if content_type.starts_with("application/json") {
        let schema = &content["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path} {status}: no JSON schema documented"
        );
        validate(
            &reply.json(),
            schema,
            doc,
            &format!("{method} {path} {status}"),
        )
        .unwrap();
    } else {
        let documented: Vec<&String> = content
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        assert!(
            documented
                .iter()
                .any(|d| content_type.starts_with(d.as_str())),
            "{method} {path} {status}: {content_type} not in {documented:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_the_real_responses() {
    let served = indexed_library();
    let s = state(&served, None);
    let doc = get(&s, "/api/openapi.json").await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let id = hits(&get(&s, "/api/search?q=fish&k=1").await)[0]["id"]
        .as_u64()
        .unwrap();
    let bytes = std::fs::read(fixtures().join("images/photo.jpg")).unwrap();
    let cases: Vec<(&str, &str, Reply)> = vec![
        (
            "/api/search",
            "get",
            get(&s, "/api/search?q=IMG_2041&k=3").await,
        ),
        ("/api/search", "get", get(&s, "/api/search?q=").await),
        (
            "/api/search",
            "post",
            post_json(
                &s,
                "/api/search",
                r#"{"terms": [{"text": "tools"}], "k": 2}"#,
            )
            .await,
        ),
        (
            "/api/search",
            "post",
            post_json(&s, "/api/search", r#"{"q": "image:31337"}"#).await,
        ),
        (
            "/api/search/image",
            "post",
            post_multipart(&s, &[("file", Some("p.jpg"), &bytes), ("k", None, b"2")]).await,
        ),
        (
            "/api/search/image",
            "post",
            post_multipart(&s, &[("file", Some("p.jpg"), b"nope")]).await,
        ),
        (
            "/api/photos/{id}",
            "get",
            get(&s, &format!("/api/photos/{id}")).await,
        ),
        (
            "/api/photos/{id}",
            "get",
            get(&s, "/api/photos/999999").await,
        ),
        (
            "/api/photos/{id}/similar",
            "get",
            get(&s, &format!("/api/photos/{id}/similar?k=2")).await,
        ),
        (
            "/api/photos/{id}/thumbnail",
            "get",
            get(&s, &format!("/api/photos/{id}/thumbnail")).await,
        ),
        (
            "/api/photos/{id}/original",
            "get",
            get(&s, &format!("/api/photos/{id}/original")).await,
        ),
        ("/api/status", "get", get(&s, "/api/status").await),
        (
            "/api/duplicates",
            "get",
            get(&s, "/api/duplicates?threshold=0&k=2").await,
        ),
        (
            "/api/duplicates",
            "get",
            get(&s, "/api/duplicates?threshold=7").await,
        ),
        ("/api/tags", "get", get(&s, "/api/tags").await),
        (
            "/api/search",
            "get",
            get(&s, "/api/search?q=tag:fish&tag=tool&k=2").await,
        ),
        (
            "/api/reindex",
            "post",
            call(
                &s,
                Request::post("/api/reindex").body(Body::empty()).unwrap(),
            )
            .await,
        ),
    ];
    for (path, method, reply) in &cases {
        check_against_doc(&doc, path, method, reply);
    }
    // Every documented path was exercised.
    let documented: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    for p in documented {
        if p != "/api/reindex/events" {
            assert!(
                cases.iter().any(|(path, _, _)| path == p),
                "{p} is documented but not checked"
            );
        }
    }
    while s.job().running {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let status = get(&s, "/api/status").await;
    check_against_doc(&doc, "/api/status", "get", &status);
}

/// Searches answered during the re-index of the test below; the run waits
/// for eight of them at its first file, so they surely overlap it.
static SEARCHES_DURING_RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_searches_during_a_reindex_stay_consistent() {
    use std::sync::atomic::Ordering;
    let served = indexed_library();
    let mut c = config(&served.index);
    c.run.fail_point = Some(|path: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !path.is_empty()
            && SEARCHES_DURING_RUN.load(Ordering::SeqCst) < 8
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
    let s = AppState::with_engine(c, engine(&served.index));
    // Change the library: remove a folder, add and rename files.
    let removed: Vec<u64> = hits(&get(&s, "/api/search?q=x&k=50&folder=tools").await)
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect();
    assert_eq!(removed.len(), 6);
    std::fs::remove_dir_all(served.library.join("tools")).unwrap();
    std::fs::rename(served.library.join("fishes"), served.library.join("sea")).unwrap();
    let extra = shared_photos().join("gcompris/renewable");
    std::fs::create_dir_all(served.library.join("renewable")).unwrap();
    for e in std::fs::read_dir(&extra).unwrap().take(12) {
        let p = e.unwrap().path();
        std::fs::copy(
            &p,
            served
                .library
                .join("renewable")
                .join(p.file_name().unwrap()),
        )
        .unwrap();
    }
    let start = call(
        &s,
        Request::post("/api/reindex").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(start.status, StatusCode::ACCEPTED);
    let mut searches = 0;
    let mut tasks = Vec::new();
    for query in ["fish", "a wind turbine", "a monument", "IMG_2041"] {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            loop {
                let running = s.job().running;
                let r = get(
                    &s,
                    &format!("/api/search?q={}&k=20", query.replace(' ', "%20")),
                )
                .await;
                assert_eq!(
                    r.status,
                    StatusCode::OK,
                    "{}",
                    String::from_utf8_lossy(&r.body)
                );
                let hs = r.json()["hits"].as_array().unwrap().clone();
                let ids: std::collections::HashSet<u64> =
                    hs.iter().map(|h| h["id"].as_u64().unwrap()).collect();
                assert_eq!(ids.len(), hs.len(), "duplicate hits");
                n += 1;
                if running {
                    SEARCHES_DURING_RUN.fetch_add(1, Ordering::SeqCst);
                }
                if !running {
                    break;
                }
            }
            n
        }));
    }
    for t in tasks {
        searches += t.await.unwrap();
    }
    assert!(searches >= 8, "only {searches} searches ran");
    assert!(
        SEARCHES_DURING_RUN.load(Ordering::SeqCst) >= 8,
        "the run did not wait for the searches"
    );
    let summary = s.job().last_summary.clone().expect("re-index finished");
    assert_eq!(
        (
            summary.counts.added,
            summary.counts.moved,
            summary.counts.removed
        ),
        (12, 10, 6)
    );
    // Afterwards: removed photos are never returned, moved ones keep their ids.
    let all = hits(&get(&s, "/api/search?q=x&k=200").await);
    assert_eq!(all.len(), 27 - 6 + 12);
    assert!(
        all.iter()
            .all(|h| !removed.contains(&h["id"].as_u64().unwrap()))
    );
    for id in &removed {
        assert_eq!(
            get(&s, &format!("/api/photos/{id}")).await.status,
            StatusCode::NOT_FOUND
        );
    }
    let sea = hits(&get(&s, "/api/search?q=x&k=50&folder=sea").await);
    assert_eq!(sea.len(), 10);
}

/// Photos with dates taken, in two folders, one without a date.
fn dated_library() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("photos");
    for (i, (folder, date)) in [
        ("trips/2018", Some("2018:05:01 10:00:00")),
        ("trips/2019", Some("2019:07:14 12:30:05")),
        ("trips/2019", Some("2019:07:30 08:00:00")),
        ("home", Some("2019:12:25 18:00:00")),
        ("home", Some("2020:01:10 09:00:00")),
        ("home", None),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::create_dir_all(library.join(folder)).unwrap();
        let bytes = match date {
            Some(d) => crate::common::jpeg_with_exif_date_tinted(d.as_bytes(), 40 * i as u8),
            None => crate::common::jpeg_with_exif_date_tinted(b"no date", 250),
        };
        std::fs::write(library.join(folder).join(format!("photo{i}.jpg")), bytes).unwrap();
    }
    index_with_tiny_model(dir, library)
}

/// Dates and fields typed in the query: filters that the answer names
/// back, filters alone listing their photos by date, date order, and a
/// clear 400 for what cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_box_takes_dates_and_fields() {
    let served = dated_library();
    let s = state(&served, None);
    let names = |reply: &Reply| -> Vec<String> {
        hits(reply)
            .iter()
            .map(|h| {
                h["path"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };

    // A date phrase alone: its photos, newest first.
    let july = get(&s, "/api/search?q=July%202019").await;
    assert_eq!(names(&july), ["photo2.jpg", "photo1.jpg"]);
    let body = july.json();
    assert_eq!(body["sort"], "newest");
    assert_eq!(body["understood"][0]["field"], "date");
    assert_eq!(body["understood"][0]["label"], "taken in July 2019");
    assert_eq!(body["understood"][0]["text"], "July 2019");

    // Words and filters: the words rank, the filters select.
    let reply = get(
        &s,
        "/api/search?q=a%20photo%20after:2019-07%20before:2020&k=10",
    )
    .await;
    let mut found = names(&reply);
    found.sort();
    assert_eq!(found, ["photo1.jpg", "photo2.jpg", "photo3.jpg"]);
    let fields: Vec<String> = reply.json()["understood"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["field"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(fields, ["after", "before"]);
    // The query box's dates narrow the form's.
    let both = get(&s, "/api/search?q=photo%202019&from=2019-07-20&k=10").await;
    let mut found = names(&both);
    found.sort();
    assert_eq!(found, ["photo2.jpg", "photo3.jpg"]);

    // A folder typed in the box; with sort=oldest, undated photos last.
    let home = get(&s, "/api/search?q=in:home&sort=oldest").await;
    assert_eq!(names(&home), ["photo3.jpg", "photo4.jpg", "photo5.jpg"]);
    assert_eq!(home.json()["sort"], "oldest");

    // Relevant results in date order, through the words too.
    let newest = get(&s, "/api/search?q=a%20photo&sort=newest&k=10").await;
    assert_eq!(
        names(&newest),
        [
            "photo4.jpg",
            "photo3.jpg",
            "photo2.jpg",
            "photo1.jpg",
            "photo0.jpg",
            "photo5.jpg"
        ]
    );
    let post = call(
        &s,
        Request::post("/api/search")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"q": "photo", "sort": "oldest", "k": 2}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(names(&post), ["photo0.jpg", "photo1.jpg"]);

    // What cannot be read is a 400 that says why.
    for (query, says) in [
        ("q=dog%20after:2019-13", "is not a date"),
        ("q=dog%20after:", "needs a value"),
        ("q=tag:a%3Cb", "may not"),
        ("q=in:home&folder=trips", "give one"),
        ("q=dog&sort=sideways", "sort"),
        ("q=type:png&type=jpeg", "no type in common"),
    ] {
        let reply = get(&s, &format!("/api/search?{query}")).await;
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            reply.json()["error"]["code"].as_str().unwrap_or("?"),
            &served,
        );
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains(says), "{query}: {message}");
    }

    // A photo has an address the page opens.
    let page = get(&s, "/photo/3").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&page.body).contains("<script type=\"module\" src=\"/app.js\">")
    );

    // The CLI says which filters it read (once the server's state lets go
    // of the index).
    drop(s);
    let out = clipdex(&[
        "search",
        "photos from summer 2019",
        "--index",
        served.index.to_str().unwrap(),
        "--sort",
        "oldest",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("filters: taken in summer 2019"),
        "{}",
        stderr(&out)
    );
    let listed = crate::common::stdout(&out);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].contains("photo1.jpg") && lines[1].contains("photo2.jpg"),
        "{listed}"
    );
}

/// A file whose name is not UTF-8 (Latin-1, as old cameras and Windows
/// disks write them) is indexed, found, shown with U+FFFD and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_utf8_are_searched_and_served() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("photos");
    std::fs::create_dir_all(&library).unwrap();
    let latin1 = crate::common::jpeg_with_exif_date_tinted(b"2019:07:14 12:30:05", 10);
    std::fs::write(
        library.join(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg")),
        &latin1,
    )
    .unwrap();
    std::fs::write(
        library.join("plain.jpg"),
        crate::common::jpeg_with_exif_date_tinted(b"2019:07:15 12:30:05", 200),
    )
    .unwrap();
    let served = index_with_tiny_model(dir, library);
    let s = state(&served, None);
    let found = hits(&get(&s, "/api/search?q=a%20photo&k=10").await);
    assert_eq!(found.len(), 2, "{found:?}");
    let cafe = found
        .iter()
        .find(|h| h["path"] == "caf\u{fffd}.jpg")
        .expect("shown with the replacement character");
    let id = cafe["id"].as_u64().unwrap();
    let original = get(&s, &format!("/api/photos/{id}/original")).await;
    assert_eq!(original.status, StatusCode::OK);
    assert_eq!(original.body, latin1);
    let thumb = get(&s, &format!("/api/photos/{id}/thumbnail")).await;
    assert_eq!(thumb.status, StatusCode::OK);
    // Its words are searchable as shown ("caf").
    let by_name = hits(&get(&s, "/api/search?q=caf&k=1").await);
    assert_eq!(by_name[0]["id"].as_u64(), Some(id));
    let status = get(&s, "/api/status").await.json();
    assert_eq!(status["photos"], 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hit_says_which_side_of_the_relevance_boundary_it_is() {
    let served = indexed_library();
    let s = state(&served, None);
    let sides = |reply: &Reply| -> Vec<(f64, bool)> {
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        hits(reply)
            .iter()
            .map(|h| {
                (
                    h["similarity"].as_f64().unwrap(),
                    h["relevant"].as_bool().unwrap(),
                )
            })
            .collect()
    };

    // Automatic: one boundary per query, the higher of where its scores
    // split and the contrast prompts' level; relevant above it, in order.
    let auto = get(&s, "/api/search?q=a%20fish&k=100&hybrid=false").await;
    let boundary = auto.json()["boundary"].clone();
    assert_eq!(boundary["cutoff"], "auto");
    let split = boundary["split"].as_f64().unwrap();
    let contrast = boundary["contrast"].as_f64().unwrap();
    let threshold = boundary["threshold"].as_f64().unwrap();
    assert!((threshold - split.max(contrast)).abs() < 1e-6, "{boundary}");
    let found = sides(&auto);
    assert_eq!(found.len(), 27);
    for (similarity, relevant) in &found {
        assert_eq!(
            *relevant,
            *similarity >= threshold - 1e-6,
            "{similarity} {threshold}"
        );
    }
    assert!(found.windows(2).all(|w| w[0].1 >= w[1].1), "relevant first");

    // Fixed scores and none.
    assert!(
        sides(&get(&s, "/api/search?q=a%20fish&k=100&cutoff=none").await)
            .iter()
            .all(|h| h.1)
    );
    assert!(
        sides(&get(&s, "/api/search?q=a%20fish&k=100&cutoff=-1").await)
            .iter()
            .all(|h| h.1)
    );
    let none = get(&s, "/api/search?q=a%20fish&k=100&hybrid=false&cutoff=1").await;
    assert!(sides(&none).iter().all(|h| !h.1));
    assert_eq!(none.json()["boundary"]["threshold"], 1.0);
    assert_eq!(none.json()["boundary"]["cutoff"], "1");
    // A name that matched the words is relevant below any score.
    let named = get(&s, "/api/search?q=IMG_2041&k=5&cutoff=1").await;
    let first = &hits(&named)[0];
    assert_eq!(first["path"], "misc/IMG_2041.png");
    assert_eq!(first["relevant"], true);

    // The same through POST, a picture's similar photos, and filters alone.
    let posted = post_json(
        &s,
        "/api/search",
        r#"{"q": "a fish", "k": 100, "hybrid": false, "cutoff": 1}"#,
    )
    .await;
    assert!(sides(&posted).iter().all(|h| !h.1));
    let posted = post_json(&s, "/api/search", r#"{"q": "a fish", "cutoff": "none"}"#).await;
    assert!(sides(&posted).iter().all(|h| h.1));
    let id = hits(&auto)[0]["id"].as_u64().unwrap();
    let similar = get(&s, &format!("/api/photos/{id}/similar?k=100")).await;
    let boundary = similar.json()["boundary"].clone();
    assert!(boundary["split"].is_number(), "{boundary}");
    assert!(
        boundary.get("contrast").is_none(),
        "a picture has no contrast prompts: {boundary}"
    );
    let similar = sides(&similar);
    assert!(similar.iter().any(|h| h.1) && similar.windows(2).all(|w| w[0].1 >= w[1].1));
    let browse = get(&s, "/api/search?q=in:fishes&k=100").await;
    assert!(sides(&browse).iter().all(|h| h.1));
    assert!(browse.json()["boundary"].get("threshold").is_none());

    // Nonsense is refused, whichever way it comes.
    for bad in ["most", "2", "-1.5", "NaN", "inf"] {
        let reply = get(&s, &format!("/api/search?q=a%20fish&cutoff={bad}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        let reply = get(&s, &format!("/api/photos/{id}/similar?cutoff={bad}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let reply = post_json(&s, "/api/search", r#"{"q": "a fish", "cutoff": 5}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = post_json(&s, "/api/search", r#"{"q": "a fish", "cutoff": "half"}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("auto, none"), "{message}");

    // The CLI prints the boundary as a line, and refuses nonsense.
    drop(s);
    let index = served.index.to_str().unwrap();
    let out = clipdex(&[
        "search",
        "a fish",
        "--index",
        index,
        "-k",
        "5",
        "--no-keywords",
        "--cutoff",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = crate::common::stdout(&out);
    assert_eq!(
        listed.lines().next(),
        Some("     -- less relevant --"),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 6, "{listed}");
    let out = clipdex(&["search", "a fish", "--index", index, "--cutoff", "none"]);
    assert!(!crate::common::stdout(&out).contains("less relevant"));
    let out = clipdex(&[
        "similar",
        &id.to_string(),
        "--index",
        index,
        "--cutoff",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("auto, none or a score"),
        "{}",
        stderr(&out)
    );
}

/// Duplicate groups: an exact copy groups with its photo, the likely
/// original first; a re-index lists only what it changed; nonsense is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_groups_follow_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("photos");
    let photos = shared_photos().join("gcompris");
    std::fs::create_dir_all(library.join("fishes")).unwrap();
    std::fs::create_dir_all(library.join("tools")).unwrap();
    for name in ["fish1.jpg", "fish2.jpg", "fish3.jpg"] {
        std::fs::copy(
            photos.join("fishes").join(name),
            library.join("fishes").join(name),
        )
        .unwrap();
    }
    for name in ["hammer1.jpg", "hammer2.jpg"] {
        std::fs::copy(
            photos.join("tools").join(name),
            library.join("tools").join(name),
        )
        .unwrap();
    }
    // A copy made later: the same picture, newer.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::create_dir_all(library.join("backup")).unwrap();
    std::fs::copy(
        photos.join("fishes/fish1.jpg"),
        library.join("backup/fish1 (copy).jpg"),
    )
    .unwrap();
    let served = index_with_tiny_model(dir, library.clone());
    let index = served.index.to_str().unwrap().to_string();

    let paths = |groups: &Value| -> Vec<Vec<String>> {
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                g["photos"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["path"].as_str().unwrap().to_string())
                    .collect()
            })
            .collect()
    };
    {
        let s = state(&served, None);
        // Identical files have identical embeddings: one group at any threshold.
        let exact = get(&s, "/api/duplicates?threshold=0.9999").await;
        assert_eq!(
            exact.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&exact.body)
        );
        let body = exact.json();
        assert_eq!(
            paths(&body),
            [["fishes/fish1.jpg", "backup/fish1 (copy).jpg"]],
            "{body}"
        );
        let first = &body["groups"][0]["photos"][0];
        assert_eq!(first["likely_original"], true);
        assert_eq!(body["groups"][0]["photos"][1]["likely_original"], false);
        assert!(first["original"].as_str().unwrap().ends_with("/original"));
        assert_eq!(
            (body["total_groups"].as_u64(), body["pending"].as_u64()),
            (Some(1), Some(0))
        );

        // Any threshold: disjoint groups whose every photo appears once, each
        // with one likely original; below the lists' floor the same rules hold.
        for t in ["0", "0.5", "0.8", "0.97"] {
            let reply = get(&s, &format!("/api/duplicates?threshold={t}")).await;
            let body = reply.json();
            let all: Vec<String> = paths(&body).into_iter().flatten().collect();
            let unique: std::collections::HashSet<&String> = all.iter().collect();
            assert_eq!(all.len(), unique.len(), "t={t}: {body}");
            assert_eq!(body["total_photos"].as_u64().unwrap() as usize, all.len());
            for g in body["groups"].as_array().unwrap() {
                let originals = g["photos"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["likely_original"] == true)
                    .count();
                assert_eq!(originals, 1, "{g}");
                assert!(g["similarity"].as_f64().unwrap() >= t.parse::<f64>().unwrap() - 1e-6);
            }
        }
        // Paging through groups.
        let one = get(&s, "/api/duplicates?threshold=0&k=1").await.json();
        assert_eq!(one["groups"].as_array().unwrap().len(), 1);
        assert_eq!(one["more"], one["total_groups"].as_u64().unwrap() > 1);

        for bad in [
            "threshold=2",
            "threshold=-0.1",
            "threshold=NaN",
            "threshold=most",
            "k=0",
            "k=1001",
        ] {
            let reply = get(&s, &format!("/api/duplicates?{bad}")).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        let reply = get(&s, "/api/duplicates?threshold=1.5").await;
        assert!(
            reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("from 0 to 1")
        );
    }

    // The CLI prints the group, the likely original marked.
    let out = clipdex(&["duplicates", "--index", &index, "--threshold", "0.9999"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = crate::common::stdout(&out);
    assert!(listed.starts_with("group 1: 2 photos"), "{listed}");
    assert!(
        listed
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("  * fishes/fish1.jpg"),
        "{listed}"
    );
    let out = clipdex(&[
        "duplicates",
        "--index",
        &index,
        "--threshold",
        "0.9999",
        "--json",
    ]);
    let group: Value =
        serde_json::from_str(crate::common::stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(group["photos"].as_array().unwrap().len(), 2);
    let out = clipdex(&["duplicates", "--index", &index, "--threshold", "1.5"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("from 0 to 1"), "{}", stderr(&out));

    // A re-index lists only the photos it embedded: the copy gone, another
    // copy added, one group each way.
    std::fs::remove_file(library.join("backup/fish1 (copy).jpg")).unwrap();
    std::fs::copy(
        photos.join("tools/hammer2.jpg"),
        library.join("backup/hammer2.jpg"),
    )
    .unwrap();
    let m = fixture_model("openai-tiny").display().to_string();
    let out = crate::common::clipdex_with_env(
        &[
            "index",
            library.to_str().unwrap(),
            "--index",
            &index,
            "--model",
            &m,
            "--log",
            "clipdex=debug",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The log's colours taken out.
    let mut log = String::new();
    let mut escaped = false;
    for c in stderr(&out).chars() {
        match c {
            '\x1b' => escaped = true,
            'm' if escaped => escaped = false,
            _ if escaped => {}
            c => log.push(c),
        }
    }
    assert!(log.contains("near neighbours listed listed=1"), "{log}");
    let s = state(&served, None);
    let body = get(&s, "/api/duplicates?threshold=0.9999").await.json();
    assert_eq!(
        paths(&body),
        [["tools/hammer2.jpg", "backup/hammer2.jpg"]],
        "{body}"
    );
}
