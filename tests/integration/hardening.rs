//! Hostile and unlucky inputs, one test per class of defect: numbers from
//! clients, host names and origins, pictures that cost too much, files
//! swapped after indexing, slow clients, memory under concurrent uploads,
//! jobs that die, a pipe closed on the CLI.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use clipdex::server::AppState;

use crate::common::{clipdex, flat_png, stderr, stdout};
use crate::server::{
    Reply, Served, assert_error, call, config, engine, get, hits, indexed_library, post_multipart,
    state,
};
use crate::web::serve;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_number_and_date_from_a_client_is_validated() {
    let served = indexed_library();
    let s = state(&served, None);
    use StatusCode as S;
    let photo = std::fs::read(served.library.join("misc/IMG_2041.png")).unwrap();
    // Multipart weights: NaN once reached the graph and tripped an assertion (500).
    for weight in ["NaN", "nan", "inf", "-inf", "1e30", "-101", "abc", ""] {
        let r = post_multipart(
            &s,
            &[
                ("file", Some("a.png"), &photo),
                ("weight", None, weight.as_bytes()),
            ],
        )
        .await;
        assert_error(&r, S::BAD_REQUEST, "bad_query", &served);
    }
    assert_eq!(
        post_multipart(
            &s,
            &[("file", Some("a.png"), &photo), ("weight", None, b"0.5")]
        )
        .await
        .status,
        S::OK
    );
    // offset + k once overflowed; any offset is a page now, past the end an
    // empty last one.
    let max = usize::MAX;
    let empty_last_page = |r: &Reply| {
        assert_eq!(r.status, S::OK, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["hits"], serde_json::json!([]));
        assert_eq!(r.json()["more"], false);
    };
    empty_last_page(&get(&s, &format!("/api/search?q=cat&offset={max}")).await);
    empty_last_page(&get(&s, &format!("/api/photos/1/similar?offset={max}")).await);
    let r = post_multipart(
        &s,
        &[
            ("file", Some("a.png"), &photo),
            ("offset", None, max.to_string().as_bytes()),
        ],
    )
    .await;
    empty_last_page(&r);
    assert_error(
        &get(&s, "/api/search?q=cat&min_score=NaN").await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    // Impossible dates, dates out of range, and ranges the wrong way round.
    for q in [
        "from=2019-02-30",
        "to=2019-04-31",
        "from=99999-01-01",
        "from=-001-01-01",
        "from=1000-01-01",
        "from=2020-01-01&to=2019-01-01",
        "to=2019-01-01T25:00:00",
    ] {
        assert_error(
            &get(&s, &format!("/api/search?q=cat&{q}")).await,
            S::BAD_REQUEST,
            "bad_query",
            &served,
        );
        let similar = get(&s, &format!("/api/photos/1/similar?{q}")).await;
        assert_error(&similar, S::BAD_REQUEST, "bad_query", &served);
    }
    let r = post_multipart(
        &s,
        &[
            ("file", Some("a.png"), &photo),
            ("from", None, b"2019-02-30"),
        ],
    )
    .await;
    assert_error(&r, S::BAD_REQUEST, "bad_query", &served);
    assert_eq!(
        get(&s, "/api/search?q=cat&from=2019-02-28&to=2019-03-01")
            .await
            .status,
        S::OK
    );
    // A long folder filter once built a regex over its size limit (500); a
    // long one within the limit works, one past it is a clear 400.
    let deep = format!("/api/search?q=cat&folder={}", "deep/".repeat(200));
    assert!(hits(&get(&s, &deep).await).is_empty());
    let too_deep = format!("/api/search?q=cat&folder={}", "a".repeat(5000));
    assert_error(
        &get(&s, &too_deep).await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
    // Folder filters select exactly the folder and below.
    let fishes = hits(&get(&s, "/api/search?q=cat&k=50&folder=/fishes/").await);
    assert_eq!(fishes.len(), 10);
    assert!(hits(&get(&s, "/api/search?q=cat&k=50&folder=fish").await).is_empty());
    // The same rules through the JSON body.
    let body = r#"{"q": "cat", "filters": {"from": "2019-02-30"}}"#;
    assert_error(
        &crate::server::post_json(&s, "/api/search", body).await,
        S::BAD_REQUEST,
        "bad_query",
        &served,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pictures_that_cost_too_much_are_refused_before_decoding() {
    let served = indexed_library();
    let s = state(&served, None);
    use StatusCode as S;
    // 1 x 300,000 pixels in a few KB: shortest-side resizing once took gigabytes.
    let strip = flat_png(1, 300_000);
    assert!(strip.len() < 64 << 10);
    let r = post_multipart(&s, &[("file", Some("strip.png"), &strip)]).await;
    assert_error(&r, S::BAD_REQUEST, "bad_query", &served);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("aspect ratio")
    );
    drop(s);
    // More than the whole decode budget: a clear 413.
    let mut c = config(&served.index);
    c.max_upload = 8 << 20;
    let small_budget = AppState::with_engine(
        c,
        engine(&served.index).with_upload_limits(Default::default(), 1 << 20),
    );
    let picture = flat_png(1000, 1000);
    let r = post_multipart(&small_budget, &[("file", Some("big.png"), &picture)]).await;
    assert_error(&r, S::PAYLOAD_TOO_LARGE, "payload_too_large", &served);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MB")
    );
    assert_eq!(
        post_multipart(
            &small_budget,
            &[("file", Some("ok.png"), &flat_png(200, 200))]
        )
        .await
        .status,
        S::OK
    );
}

fn with_host(uri: &str, host: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::HOST, host)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_answers_only_its_own_names_and_origin() {
    let served = indexed_library();
    let s = state(&served, None);
    let _ = s.local_addr.set("127.0.0.1:7878".parse().unwrap());
    use StatusCode as S;
    // DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1.
    for host in [
        "evil.example:7878",
        "evil.example",
        "127.0.0.1.evil.example:7878",
        "localhost:9999",
    ] {
        let r = call(&s, with_host("/api/photos/1/original", host)).await;
        assert_error(&r, S::FORBIDDEN, "forbidden", &served);
    }
    for host in ["localhost:7878", "127.0.0.1:7878", "[::1]:7878"] {
        assert_eq!(
            call(&s, with_host("/api/status", host)).await.status,
            S::OK,
            "{host}"
        );
    }
    // Cross-site state changes: refused; the page's own origin and non-browser clients: accepted.
    let post = |origin: Option<&str>, site: Option<&str>| {
        let mut r = Request::post("/api/reindex").header(header::HOST, "localhost:7878");
        if let Some(o) = origin {
            r = r.header(header::ORIGIN, o);
        }
        if let Some(f) = site {
            r = r.header("sec-fetch-site", f);
        }
        r.body(Body::empty()).unwrap()
    };
    assert_error(
        &call(&s, post(Some("https://evil.example"), None)).await,
        S::FORBIDDEN,
        "forbidden",
        &served,
    );
    assert_error(
        &call(&s, post(Some("null"), None)).await,
        S::FORBIDDEN,
        "forbidden",
        &served,
    );
    assert_error(
        &call(&s, post(None, Some("cross-site"))).await,
        S::FORBIDDEN,
        "forbidden",
        &served,
    );
    assert_eq!(s.job().running, false, "a refused request started a job");
    assert_eq!(
        call(&s, post(Some("http://localhost:7878"), Some("same-origin")))
            .await
            .status,
        S::ACCEPTED
    );
    while s.job().running {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call(&s, post(None, None)).await.status, S::ACCEPTED);
    while s.job().running {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A wrong method is a JSON error too.
    let r = call(
        &s,
        Request::delete("/api/search").body(Body::empty()).unwrap(),
    )
    .await;
    assert_error(&r, S::METHOD_NOT_ALLOWED, "method_not_allowed", &served);
    let r = call(
        &s,
        Request::get("/api/reindex").body(Body::empty()).unwrap(),
    )
    .await;
    assert_error(&r, S::METHOD_NOT_ALLOWED, "method_not_allowed", &served);
    drop(s);
    // --allow-host adds a name, as a host and as the page's origin (a reverse proxy's).
    let mut c = config(&served.index);
    c.allow_hosts = vec!["photos.lan".into()];
    let allowing = AppState::with_engine(c, engine(&served.index));
    assert_eq!(
        call(&allowing, with_host("/api/status", "photos.lan:80"))
            .await
            .status,
        S::OK
    );
    assert_eq!(
        call(&allowing, with_host("/api/status", "other.lan"))
            .await
            .status,
        S::FORBIDDEN
    );
    let proxied = Request::post("/api/reindex")
        .header(header::HOST, "127.0.0.1:7878")
        .header(header::ORIGIN, "https://photos.lan")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&allowing, proxied).await.status, S::ACCEPTED);
    while allowing.job().running {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_declares_the_token_and_its_errors() {
    let served = indexed_library();
    let doc = get(&state(&served, None), "/api/openapi.json").await.json();
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer", "{schemes}");
    assert_eq!(schemes["cookie"]["in"], "cookie", "{schemes}");
    assert!(doc["security"].as_array().is_some_and(|s| s.len() == 3));
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for code in ["401", "403"] {
                assert!(
                    op["responses"].get(code).is_some(),
                    "{method} {path} lacks {code}"
                );
            }
            if path.contains("{id}") {
                assert!(
                    op["responses"].get("404").is_some(),
                    "{method} {path} lacks 404"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn originals_are_served_only_as_indexed() {
    let served = indexed_library();
    let s = state(&served, None);
    use StatusCode as S;
    let all = hits(&get(&s, "/api/search?q=a%20photo&k=50").await);
    let id = |path: &str| {
        all.iter().find(|h| h["path"] == path).unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    let original = |id: u64| {
        let s = s.clone();
        async move { get(&s, &format!("/api/photos/{id}/original")).await }
    };
    let tool = all
        .iter()
        .find(|h| h["path"].as_str().unwrap().starts_with("tools/"))
        .unwrap();
    let swapped_id = tool["id"].as_u64().unwrap();
    let swapped = served.library.join(tool["path"].as_str().unwrap());

    // A link swapped in after indexing, pointing outside the library: refused.
    let secret = served.dir.path().join("secret.txt");
    std::fs::write(&secret, "not a photo").unwrap();
    let kept = std::fs::read(&swapped).unwrap();
    std::fs::remove_file(&swapped).unwrap();
    std::os::unix::fs::symlink(&secret, &swapped).unwrap();
    assert_error(
        &original(swapped_id).await,
        S::CONFLICT,
        "conflict",
        &served,
    );
    // A link to a copy of the very same content (outside the library): its content is checked, and served.
    let copy = served.dir.path().join("copy.jpg");
    std::fs::write(&copy, &kept).unwrap();
    std::fs::remove_file(&swapped).unwrap();
    std::os::unix::fs::symlink(&copy, &swapped).unwrap();
    let r = original(swapped_id).await;
    assert_eq!(r.status, S::OK);
    assert_eq!(r.body, kept);
    // A FIFO where the photo was: refused at once, never opened for reading.
    std::fs::remove_file(&swapped).unwrap();
    crate::common::mkfifo(&swapped);
    assert_error(
        &original(swapped_id).await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    // Changed content of the same size: refused.
    std::fs::remove_file(&swapped).unwrap();
    let mut changed = kept.clone();
    let last = changed.len() - 3;
    changed[last] ^= 0x55;
    std::fs::write(&swapped, &changed).unwrap();
    assert_error(
        &original(swapped_id).await,
        S::CONFLICT,
        "conflict",
        &served,
    );
    // Deleted: 404.
    std::fs::remove_file(&swapped).unwrap();
    assert_error(
        &original(swapped_id).await,
        S::NOT_FOUND,
        "not_found",
        &served,
    );
    // Unchanged files are served as before.
    let png = id("misc/IMG_2041.png");
    let r = original(png).await;
    assert_eq!(r.status, S::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "image/png");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reindex_job_that_dies_is_reported_and_can_run_again() {
    let served = indexed_library();
    let mut c = config(&served.index);
    c.run.fail_point = Some(|path: &str| {
        if path.is_empty() {
            panic!("injected failure at the start of the run");
        }
    });
    let s = AppState::with_engine(c, engine(&served.index));
    for _ in 0..2 {
        let started = call(
            &s,
            Request::post("/api/reindex").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(
            started.status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&started.body)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.job().running {
            assert!(Instant::now() < deadline, "the job never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = get(&s, "/api/status").await.json();
        assert_eq!(status["reindex"]["running"], false);
        assert!(
            status["reindex"]["last_error"]
                .as_str()
                .unwrap()
                .contains("internal error"),
            "{status}"
        );
    }
}

/// One HTTP/1.1 request on a new connection; `None` if the connection fails.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).ok()?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

/// Peak and current resident memory of a process, bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Decode memory the memory test gives the server, MiB.
const DECODE_BUDGET_MB: u64 = 512;
/// What the server may hold besides the decodes: the tiny model, the index,
/// eight upload bodies, the runtime.
const SERVER_OVERHEAD_MB: u64 = 300;

#[test]
fn concurrent_worst_case_uploads_stay_within_the_memory_budget() {
    let served = indexed_library();
    let budget = DECODE_BUDGET_MB.to_string();
    let server = serve(
        &served.index,
        &["--max-decode-mb", &budget, "--max-upload-mb", "8"],
    );
    let (_, idle) = memory(server.child.id());
    // 8,000 x 8,000 RGB (64 megapixels, 192 MB decoded, about 200 KB as a PNG):
    // 384 MB of decode budget each, so one fits in the budget at a time.
    let big = flat_png(8000, 8000);
    eprintln!("upload of {} KB", big.len() >> 10);
    let (content_type, body) = crate::server::multipart(&[("file", Some("big.png"), &big)]);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    http(
                        server.addr(),
                        "POST",
                        "/api/search/image",
                        &[("Content-Type", &content_type)],
                        &body,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().map_or(0, |(status, _)| status))
            .collect()
    });
    eprintln!("statuses of 8 concurrent uploads: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    // The extreme strip costs nothing either.
    let strip = flat_png(1, 300_000);
    let (strip_type, strip_body) = crate::server::multipart(&[("file", Some("strip.png"), &strip)]);
    assert_eq!(
        http(
            server.addr(),
            "POST",
            "/api/search/image",
            &[("Content-Type", &strip_type)],
            &strip_body
        )
        .unwrap()
        .0,
        400
    );
    let (peak, _) = memory(server.child.id());
    let bound = idle + (DECODE_BUDGET_MB + SERVER_OVERHEAD_MB) * (1 << 20);
    eprintln!(
        "server memory: idle {} MB, peak {} MB, bound {} MB",
        idle >> 20,
        peak >> 20,
        bound >> 20
    );
    assert!(
        peak < bound,
        "peak resident memory {} MB over the bound {} MB",
        peak >> 20,
        bound >> 20
    );
    // Busy answers say when to come back.
    if statuses.contains(&503) {
        let reply = std::thread::scope(|scope| {
            let others: Vec<_> = (0..3)
                .map(|_| {
                    scope.spawn(|| {
                        http(
                            server.addr(),
                            "POST",
                            "/api/search/image",
                            &[("Content-Type", &content_type)],
                            &body,
                        )
                    })
                })
                .collect();
            others
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .find(|(s, _)| *s == 503)
        });
        if let Some((_, text)) = reply {
            assert!(
                text.to_ascii_lowercase().contains("retry-after: 1"),
                "{text}"
            );
        }
    }
    // And the memory goes back: within a few seconds the server is near idle again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, now) = memory(server.child.id());
        if now < idle + (150 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resident memory stayed at {} MB (idle {} MB)",
            now >> 20,
            idle >> 20
        );
        // Any request lets the runtime's threads run their allocator's purge.
        let _ = http(server.addr(), "GET", "/api/status", &[], b"");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn slow_clients_are_cut_off_and_connections_are_capped() {
    let served = indexed_library();
    let server = serve(&served.index, &["--max-connections", "8"]);
    let start = Instant::now();
    // One trickles its headers, one its body, both a byte every second.
    let trickle = |request: &'static [u8], split: usize| {
        let addr = server.addr().to_string();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&request[..split]).unwrap();
            for b in &request[split..] {
                std::thread::sleep(Duration::from_secs(1));
                if s.write_all(std::slice::from_ref(b)).is_err() {
                    return (start.elapsed(), String::from("closed"));
                }
            }
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            (
                start.elapsed(),
                String::from_utf8_lossy(&reply).into_owned(),
            )
        })
    };
    let headers: &'static [u8] = b"GET /api/status HTTP/1.1\r\nHost: localhost\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let body: &'static [u8] = b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"q\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}";
    let slow_headers = trickle(headers, 10);
    let slow_body = trickle(body, 100);
    // Connections past the cap are closed at once.
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // The readiness poll's own connection can still hold a slot for a
    // moment on a loaded machine, and a slot it frees then goes to the next
    // connection. A connection that is served keeps its slot (keep-alive),
    // so a second or third try must be refused; without a cap none would be.
    let mut buf = [0u8; 64];
    let mut served_extras = Vec::new();
    let refused = (0..3).any(|_| {
        let mut extra = TcpStream::connect(server.addr()).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = extra.write_all(b"GET /api/status HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let closed = matches!(extra.read(&mut buf), Ok(0) | Err(_));
        served_extras.push(extra);
        closed
    });
    assert!(refused, "every connection past the cap was served");
    drop(served_extras);
    // Idle connections are closed by the header timeout, which frees their slots.
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = c.read(&mut buf);
    }
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "idle connections held for {:?}",
        start.elapsed()
    );
    assert_eq!(
        http(server.addr(), "GET", "/api/status", &[], b"")
            .unwrap()
            .0,
        200
    );
    let (took, reply) = slow_headers.join().unwrap();
    assert!(
        took < Duration::from_secs(20),
        "a trickled header held its connection {took:?}: {reply}"
    );
    let (took, reply) = slow_body.join().unwrap();
    assert!(
        took < Duration::from_secs(25),
        "a trickled body held its connection {took:?}"
    );
    assert!(reply == "closed" || reply.contains(" 408 "), "{reply}");
}

#[test]
fn serve_waits_for_an_index_another_process_holds() {
    let served = indexed_library();
    // Hold the index the way `clipdex index` does: open it in this process.
    let held = crate::common::open_index(&served.index);
    let server = crate::web::start(&served.index, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        if let Some((200, body)) = http(server.addr(), "GET", "/api/status", &[], b"") {
            if body.contains("waiting for another clipdex process") {
                break body;
            }
            assert!(!body.contains("\"failed\""), "{body}");
        }
        assert!(
            Instant::now() < deadline,
            "the server never said it was waiting"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !waiting.contains(served.dir.path().to_str().unwrap()),
        "leaks a path: {waiting}"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, body)) = http(server.addr(), "GET", "/api/status", &[], b"") {
            if body.contains("\"ready\"") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the server did not take the index once it was free"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    let served: Served = indexed_library();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_clipdex"))
        .args([
            "status",
            "--index",
            served.index.to_str().unwrap(),
            "--json",
        ])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
    // With a reader, the same command works.
    let ok = clipdex(&[
        "status",
        "--index",
        served.index.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("\"photos\""));
}

#[test]
fn large_files_cost_memory_only_when_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    std::fs::create_dir_all(&root).unwrap();
    // 8,000 x 8,000 BMP: 192 MB on disk, above the size hashed as a stream.
    let mut bmp = Vec::new();
    image::RgbImage::from_pixel(8000, 8000, image::Rgb([10, 120, 200]))
        .write_to(&mut std::io::Cursor::new(&mut bmp), image::ImageFormat::Bmp)
        .unwrap();
    std::fs::write(root.join("big.bmp"), &bmp).unwrap();
    drop(bmp);
    std::fs::copy(
        crate::common::fixtures().join("images/photo.png"),
        root.join("small.png"),
    )
    .unwrap();
    let index = dir.path().join("index");
    let model = crate::common::fixture_model("openai-tiny");
    // A run reports its process's peak memory (VmHWM; getrusage would
    // count this test process's memory too, inherited across fork and exec).
    let summary = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = summary(clipdex(&[
        "index",
        root.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--json",
    ]));
    let first_peak = first["peak_memory_bytes"].as_u64().unwrap();
    // Moved, and a 2 GiB (sparse) caption sidecar beside it: the content is
    // known, so the file is only hashed as it streams by; the sidecar is
    // read only as far as a caption goes.
    std::fs::rename(root.join("big.bmp"), root.join("moved.bmp")).unwrap();
    std::fs::File::create(root.join("moved.txt"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let run = summary(clipdex(&[
        "reindex",
        "--index",
        index.to_str().unwrap(),
        "--json",
    ]));
    let peak = run["peak_memory_bytes"].as_u64().unwrap();
    assert_eq!(
        (run["moved"].as_u64(), run["embedded"].as_u64()),
        (Some(1), Some(0)),
        "{run}"
    );
    eprintln!(
        "peak memory: index with the decode {} MB, reindex of the moved file {} MB",
        first_peak >> 20,
        peak >> 20
    );
    assert!(
        first_peak > 192 << 20,
        "the first run decoded the picture: {} MB",
        first_peak >> 20
    );
    // The process itself (the model, the graph's buffers) takes about 126
    // MB; a run that read the file whole would take its 192 MB on top.
    assert!(
        peak < 192 << 20 && peak < first_peak / 2,
        "hashing a known 192 MB file took {} MB",
        peak >> 20
    );
}
