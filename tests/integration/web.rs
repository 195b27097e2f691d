//! `clipdex serve` as a user runs it: a real TCP port, the CLI beside it, and
//! the page in headless Chromium (driven through chromedriver's WebDriver
//! API): type a query, see results, open a photo, find similar, upload an
//! image, move with the keyboard, fit a phone screen.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{clipdex, fixtures, stderr, stdout};
use crate::server::indexed_library;

/// A `clipdex serve` child process, killed on drop.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Server {
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `clipdex serve` on a free port and waits until it is ready.
pub fn serve(index: &Path, extra: &[&str]) -> Server {
    let server = start(index, extra);
    let token = extra
        .iter()
        .position(|a| *a == "--token")
        .map(|i| format!("?token={}", extra[i + 1]))
        .unwrap_or_default();
    wait_for(Duration::from_secs(60), || {
        get_json(&server.url, &format!("/api/status{token}")).1["state"] == "ready"
    });
    server
}

/// Starts `clipdex serve` on a free port; returns once it listens.
pub fn start(index: &Path, extra: &[&str]) -> Server {
    let bind = if extra.contains(&"--bind") {
        vec![]
    } else {
        vec!["--bind", "127.0.0.1:0"]
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_clipdex"))
        .args(["serve", "--index", index.to_str().unwrap(), "--offline"])
        .args(bind)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("serve printed no address");
        if let Some(url) = line.strip_prefix("clipdex is up at ") {
            break url.trim().to_string();
        }
    };
    Server { child, url }
}

pub fn get_json(base: &str, path: &str) -> (u16, Value) {
    let mut r = ureq::get(&format!("{base}{path}"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_json::<Value>().unwrap_or(Value::Null);
    (status, body)
}

fn wait_for(timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serves_over_tcp_and_the_cli_goes_through_it() {
    let served = indexed_library();
    let server = serve(&served.index, &[]);
    let (status, body) = get_json(&server.url, "/api/search?q=fish&k=3");
    assert_eq!(status, 200);
    assert_eq!(body["hits"].as_array().unwrap().len(), 3);

    // A 1 MB query is refused with a status, before the server reads it
    // all, and the server keeps serving.
    {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let head = format!(
            "GET /api/search?q={} HTTP/1.1\r\nHost: {}\r\n\r\n",
            "a".repeat(1 << 20),
            server.addr()
        );
        // The server may close before the whole line is sent; the answer is what counts.
        let _ = stream.write_all(head.as_bytes());
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        let status_line = String::from_utf8_lossy(&reply)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        assert!(
            status_line.starts_with("HTTP/1.1 431") || status_line.starts_with("HTTP/1.1 414"),
            "answer to a 1 MB query: {status_line:?}"
        );
    }
    assert_eq!(get_json(&server.url, "/api/status").0, 200);

    // The CLI finds the index held by the server and asks it.
    let idx = served.index.to_str().unwrap();
    let out = clipdex(&["search", "IMG_2041", "--index", idx, "--json", "-k", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first: Value = serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(first["path"], "misc/IMG_2041.png");
    let out = clipdex(&["similar", "misc/IMG_2041.png", "--index", idx, "-k", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2);
    // Writing is refused while the server holds the index, naming the server.
    let out = clipdex(&["reindex", "--index", idx]);
    assert!(
        !out.status.success() && stderr(&out).contains("clipdex serve at http://127.0.0.1:"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_public_address_needs_a_token() {
    let served = indexed_library();
    let out = clipdex(&[
        "serve",
        "--index",
        served.index.to_str().unwrap(),
        "--bind",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--token"), "{}", stderr(&out));
    let server = serve(
        &served.index,
        &["--bind", "0.0.0.0:0", "--token", "letmein"],
    );
    let port = server.url.rsplit(':').next().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get_json(&base, "/api/status").0, 401);
    assert_eq!(get_json(&base, "/api/status?token=letmein").0, 200);
}

#[test]
fn cli_search_and_similar_on_a_closed_index() {
    let served = indexed_library();
    let idx = served.index.to_str().unwrap();
    let out = clipdex(&["search", "IMG_2041", "--index", idx, "-k", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.lines().next().unwrap().contains("misc/IMG_2041.png"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 3);

    let out = clipdex(&[
        "search", "a photo", "--index", idx, "--folder", "tools", "--json", "-k", "50",
    ]);
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert!(
        lines
            .iter()
            .all(|h| h["path"].as_str().unwrap().starts_with("tools/"))
    );

    // Similar by library path, by id, and by a file outside the library.
    let by_path = clipdex(&[
        "similar",
        served.library.join("misc/IMG_2041.png").to_str().unwrap(),
        "--index",
        idx,
        "--json",
        "-k",
        "3",
    ]);
    assert!(by_path.status.success(), "{}", stderr(&by_path));
    let id = serde_json::from_str::<Value>(
        stdout(&clipdex(&[
            "search", "IMG_2041", "--index", idx, "--json", "-k", "1",
        ]))
        .lines()
        .next()
        .unwrap(),
    )
    .unwrap()["id"]
        .clone();
    let by_id = clipdex(&[
        "similar",
        &id.to_string(),
        "--index",
        idx,
        "--json",
        "-k",
        "3",
    ]);
    assert_eq!(stdout(&by_id), stdout(&by_path));
    assert!(
        stdout(&by_id)
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["id"] != id)
    );
    let outside = clipdex(&[
        "similar",
        fixtures().join("images/photo.png").to_str().unwrap(),
        "--index",
        idx,
        "--json",
        "-k",
        "1",
    ]);
    let top: Value = serde_json::from_str(stdout(&outside).lines().next().unwrap()).unwrap();
    assert_eq!(top["path"], "misc/IMG_2041.png"); // the same picture
    assert!(top["similarity"].as_f64().unwrap() > 0.99);

    for bad in [
        vec!["search", "\"unclosed"],
        vec!["similar", "no/such/photo.jpg"],
        vec!["search", "x", "--from", "soon"],
    ] {
        let mut args = bad.clone();
        args.extend(["--index", idx]);
        let out = clipdex(&args);
        assert!(
            !out.status.success() && !stderr(&out).contains("panicked"),
            "{bad:?}: {}",
            stderr(&out)
        );
    }
}

/// A minimal WebDriver client.
struct Browser {
    base: String,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start() -> Option<Self> {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let driver_bin = ["/usr/bin/chromedriver"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let (Some(chromium), Some(driver_bin)) = (chromium, driver_bin) else {
            if std::env::var("CLIPDEX_SKIP_BROWSER").as_deref() == Ok("1") {
                eprintln!("browser test skipped (CLIPDEX_SKIP_BROWSER=1)");
                return None;
            }
            panic!(
                "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver), or CLIPDEX_SKIP_BROWSER=1"
            );
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        wait_for(Duration::from_secs(20), || {
            ureq::get(&format!("{base}/status")).call().is_ok()
        });
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display()),
            ]}
        }}});
        let mut b = Browser {
            base,
            session: String::new(),
            driver,
            _profile: profile,
        };
        let created = b.post("/session", caps);
        b.session = created["sessionId"].as_str().expect("session").to_string();
        Some(b)
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let mut r = ureq::post(&url)
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(body)
            .unwrap();
        let v: Value = r.body_mut().read_json().unwrap();
        assert!(r.status().is_success(), "{path}: {v}");
        v["value"].clone()
    }

    fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let url = format!("{}/session/{}/screenshot", self.base, self.session);
        let png: Value = ureq::get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, base64_decode(png["value"].as_str().unwrap_or(""))).unwrap();
        path
    }

    fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
    }

    fn find(&self, css: &str) -> String {
        self.post("/element", json!({"using": "css selector", "value": css}))[ELEMENT]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn click(&self, css: &str) {
        let el = self.find(css);
        self.post(&format!("/element/{el}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.post(&format!("/element/{el}/value"), json!({"text": text}));
    }

    fn wait(&self, what: &str, script: &str) {
        let start = Instant::now();
        loop {
            if self.js(script) == Value::Bool(true) {
                return;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let shot = self.screenshot("browser-failure.png");
                panic!(
                    "timed out waiting for {what}; screenshot at {}",
                    shot.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let table = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(table) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn the_page_in_a_real_browser() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let served = indexed_library();
    // Tags the fixture model gives (three tags, so each photo's best one
    // passes 0.2).
    let vocabulary = served.dir.path().join("tags.txt");
    std::fs::write(&vocabulary, "fish\ntool\nmonument\n").unwrap();
    let out = crate::common::clipdex(&[
        "retag",
        "--index",
        served.index.to_str().unwrap(),
        "--tags",
        vocabulary.to_str().unwrap(),
        "--tag-threshold",
        "0.2",
    ]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let server = serve(&served.index, &[]);
    browser.post("/url", json!({"url": format!("{}/", server.url)}));
    browser.wait(
        "the status line",
        "return document.getElementById('status-text').textContent.includes('27 photos')",
    );

    // Type a query, see results with loaded thumbnails.
    browser.type_into("#q", "a fish");
    browser.wait(
        "results",
        "return document.querySelectorAll('#grid .tile').length >= 10",
    );
    browser.wait("thumbnails", "return [...document.querySelectorAll('#grid .tile img')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)");
    assert_eq!(
        browser.js("return document.getElementById('intro').hidden"),
        Value::Bool(true)
    );
    // Results are a list of buttons, each in its list item (and the
    // relevance divider's heading in its own).
    let listed = "return [...document.getElementById('grid').children].every(li => li.tagName === 'LI' && (li.firstElementChild.matches('button.tile') || li.matches('.divider')))";
    assert_eq!(browser.js(listed), Value::Bool(true));

    // Open a photo: the viewer shows its metadata.
    browser.click("#grid .tile");
    browser.wait("the viewer", "return document.getElementById('viewer').open && document.querySelectorAll('#v-meta dt').length > 0");
    browser.screenshot("browser-viewer.png");
    let title = browser.js("return document.getElementById('v-title').textContent");
    // The dialog is named by the photo's title.
    let label = browser.js("const v = document.getElementById('viewer'); return document.getElementById(v.getAttribute('aria-labelledby')).textContent");
    assert_eq!(label, title);
    assert!(
        title.as_str().unwrap().ends_with(".jpg") || title.as_str().unwrap().ends_with(".png"),
        "{title}"
    );

    // Find similar: results exclude the photo itself.
    browser.click("#v-similar");
    // The grid is busy until the similar photos replace the text results.
    browser.wait("similar photos", "return !document.getElementById('viewer').open && document.querySelector('#chips .chip') !== null && document.getElementById('grid').getAttribute('aria-busy') === 'false' && document.querySelectorAll('#grid .tile').length > 0");
    let titles =
        browser.js("return [...document.querySelectorAll('#grid .tile')].map(t => t.title)");
    assert!(
        !titles.as_array().unwrap().contains(&title),
        "{title} is among its own similar photos"
    );

    // Search by an uploaded image: the same picture comes first.
    let file = served.library.join("misc/IMG_2041.png");
    let input = browser.find("#file");
    browser.post(
        &format!("/element/{input}/value"),
        json!({"text": file.to_str().unwrap()}),
    );
    browser.wait("image results", "return document.querySelector('#chips .chip')?.textContent.includes('picture') && document.querySelector('#grid .tile')?.title === 'misc/IMG_2041.png'");

    // Keyboard: from the search box, arrow down into the grid, Enter opens.
    browser.js("document.getElementById('q').focus()");
    browser.post(
        "/actions",
        json!({"actions": [{"type": "key", "id": "kb", "actions": [
            {"type": "keyDown", "value": "\u{E015}"}, {"type": "keyUp", "value": "\u{E015}"},
            {"type": "keyDown", "value": "\u{E014}"}, {"type": "keyUp", "value": "\u{E014}"},
            {"type": "keyDown", "value": "\u{E007}"}, {"type": "keyUp", "value": "\u{E007}"}
        ]}]}),
    );
    browser.wait(
        "keyboard open",
        "return document.getElementById('viewer').open",
    );
    browser.post(
        "/actions",
        json!({"actions": [{"type": "key", "id": "kb2", "actions": [
            {"type": "keyDown", "value": "\u{E00C}"}, {"type": "keyUp", "value": "\u{E00C}"}
        ]}]}),
    );
    browser.wait(
        "Escape closes",
        "return !document.getElementById('viewer').open",
    );

    // An error state: a malformed query shows a message, not a blank page.
    browser.js("document.querySelectorAll('#chips button').forEach(b => b.click())");
    browser.js(
        "const q = document.getElementById('q'); q.value = '\"unclosed'; q.form.requestSubmit();",
    );
    browser.wait("an error message", "return !document.getElementById('error').hidden && document.getElementById('error').textContent.includes('quote')");

    // The address holds the search: back goes to the search before.
    browser
        .js("const q = document.getElementById('q'); q.value = 'a fish'; q.form.requestSubmit();");
    let settled = "document.getElementById('grid').getAttribute('aria-busy') === 'false' && document.querySelectorAll('#grid .tile').length > 0";
    browser.wait(
        "the fish search in the address",
        &format!("return new URLSearchParams(location.search).get('q') === 'a fish' && {settled}"),
    );
    let fish = browser.js("return document.querySelector('#grid .tile').title");
    browser
        .js("const q = document.getElementById('q'); q.value = 'a tool'; q.form.requestSubmit();");
    browser.wait(
        "the tool search in the address",
        &format!("return new URLSearchParams(location.search).get('q') === 'a tool' && {settled}"),
    );
    browser.post("/back", json!({}));
    browser.wait(
        "back to the fish",
        &format!("return document.getElementById('q').value === 'a fish' && {settled} && document.querySelector('#grid .tile').title === {fish}"),
    );

    // An open photo is an address; loading it afresh opens the photo over its search.
    browser.click("#grid .tile");
    browser.wait(
        "the photo's address",
        "return document.getElementById('viewer').open && /^\\/photo\\/\\d+$/.test(location.pathname)",
    );
    let photo_url = browser.js("return location.href");
    let photo_title = browser.js("return document.getElementById('v-title').textContent");
    browser.post("/url", json!({"url": photo_url}));
    browser.wait(
        "the photo from its address",
        &format!("return document.getElementById('viewer').open && document.getElementById('v-title').textContent === {photo_title} && document.getElementById('q').value === 'a fish'"),
    );
    browser.click("#v-close");
    browser.wait(
        "the search's address again",
        "return !document.getElementById('viewer').open && location.pathname === '/' && new URLSearchParams(location.search).get('q') === 'a fish'",
    );

    // Filters typed in the box come back as chips; removing one takes its words out.
    browser.js("const q = document.getElementById('q'); q.value = 'a fish after:2019 in:fishes'; q.form.requestSubmit();");
    browser.wait(
        "two filter chips",
        "return document.querySelectorAll('#chips .chip.filter').length === 2 && document.getElementById('grid').getAttribute('aria-busy') === 'false'",
    );
    // The fixture photos have no date: nothing is taken after 2019.
    assert_eq!(
        browser.js("return document.querySelectorAll('#grid .tile').length"),
        json!(0)
    );
    browser.click("#chips .chip.filter[data-field='after'] button");
    browser.wait(
        "the folder filter alone",
        &format!("return document.getElementById('q').value === 'a fish in:fishes' && {settled} && [...document.querySelectorAll('#grid .tile')].every(t => t.title.startsWith('fishes/'))"),
    );
    assert_eq!(
        browser.js("return new URLSearchParams(location.search).get('q')"),
        json!("a fish in:fishes")
    );

    // Date order groups by month (these photos have none: one group).
    browser.js("const s = document.getElementById('f-sort'); s.value = 'newest'; s.dispatchEvent(new Event('change'));");
    browser.wait(
        "results by date",
        &format!("return new URLSearchParams(location.search).get('sort') === 'newest' && {settled} && document.querySelector('#grid li.month h2')?.textContent === 'No date'"),
    );
    browser.js("const s = document.getElementById('f-sort'); s.value = 'relevance'; s.dispatchEvent(new Event('change'));");

    // Where relevance ends: a "Less relevant" divider before the first
    // less relevant photo, none of those above it; "only relevant" stops there.
    browser
        .js("const q = document.getElementById('q'); q.value = 'a fish'; q.form.requestSubmit();");
    let boundary = "const items = [...document.querySelectorAll('#grid > li')]; const d = items.findIndex(li => li.classList.contains('divider'));";
    browser.wait(
        "the relevance divider",
        &format!("{boundary} return {settled} && new URLSearchParams(location.search).get('sort') === null && d > 0 && items.slice(0, d).every(li => !li.querySelector('.tile.less')) && items[d + 1].querySelector('.tile.less') !== null && items[d].textContent === 'Less relevant'"),
    );
    let above = browser.js(&format!("{boundary} return d"));
    browser.js("const s = document.getElementById('f-cutoff'); s.value = 'only'; s.dispatchEvent(new Event('change'));");
    browser.wait(
        "only the relevant photos",
        &format!("return new URLSearchParams(location.search).get('cutoff') === 'only' && {settled} && !document.querySelector('#grid li.divider') && !document.querySelector('#grid .tile.less') && document.querySelectorAll('#grid .tile').length === {above}"),
    );
    browser.js("const s = document.getElementById('f-cutoff'); s.value = 'auto'; s.dispatchEvent(new Event('change'));");
    browser.wait(
        "the boundary marked again",
        &format!("return new URLSearchParams(location.search).get('cutoff') !== 'only' && {settled} && document.querySelector('#grid li.divider') !== null"),
    );

    // A photo's tags are chips in the viewer; one searches tag:NAME, shown
    // as a filter chip, every result having the tag.
    browser.click("#grid .tile");
    browser.wait(
        "tag chips",
        "return document.getElementById('viewer').open && document.querySelectorAll('#v-tags .tag-chip').length > 0",
    );
    let tag = browser.js("return document.querySelector('#v-tags .tag-chip').textContent");
    let tag = tag.as_str().unwrap().to_string();
    let (_, tagged) = get_json(&server.url, &format!("/api/search?q=tag:{tag}&k=100"));
    let tagged = tagged["hits"].as_array().unwrap().len();
    browser.click("#v-tags .tag-chip");
    browser.wait(
        "the photos with the tag",
        &format!("return !document.getElementById('viewer').open && new URLSearchParams(location.search).get('q') === 'tag:{tag}' && {settled} && document.querySelector(\"#chips .chip.filter[data-field='tag']\") !== null && document.querySelectorAll('#grid .tile').length === {tagged}"),
    );

    // The tag list: a tile per tag with its cover and count; a tile searches.
    let (_, list) = get_json(&server.url, "/api/tags");
    let tiles = list["tags"].as_array().unwrap().len();
    browser.click("#tags-link");
    browser.wait(
        "the tags view",
        &format!("return location.pathname === '/tags' && !document.getElementById('tags').hidden && document.getElementById('main').hidden && document.querySelectorAll('#t-list .tag-tile').length === {tiles} && [...document.querySelectorAll('#t-list img')].every(i => i.complete && i.naturalWidth > 0)"),
    );
    browser.screenshot("browser-tags.png");
    browser.click("#t-list .tag-tile a");
    browser.wait(
        "a tag's photos from the list",
        &format!("return location.pathname === '/' && document.getElementById('tags').hidden && new URLSearchParams(location.search).get('q').startsWith('tag:') && {settled} && document.querySelectorAll('#grid .tile').length > 0"),
    );

    // The duplicates view: groups side by side, one likely original each;
    // it has its own address, and back returns to the search.
    browser.click("#dup-link");
    browser.wait(
        "the duplicates view",
        "return location.pathname === '/duplicates' && !document.getElementById('dups').hidden && document.getElementById('main').hidden && document.getElementById('d-summary').textContent !== ''",
    );
    browser.js("document.getElementById('d-threshold').value = '0'; document.getElementById('d-form').requestSubmit();");
    browser.wait(
        "groups at threshold 0",
        "const groups = [...document.querySelectorAll('#d-groups .dup-group')]; return new URLSearchParams(location.search).get('threshold') === '0' && groups.length > 0 && groups.every(g => g.querySelectorAll('.dup.original .badge').length === 1 && g.querySelectorAll('.dup img').length >= 2)",
    );
    browser.screenshot("browser-duplicates.png");
    browser.post("/back", json!({}));
    browser.wait(
        "back to the search",
        &format!("return location.pathname === '/' && document.getElementById('dups').hidden && !document.getElementById('main').hidden && {settled}"),
    );

    // A phone screen: several columns, nothing wider than the screen.
    browser.post("/window/rect", json!({"width": 390, "height": 844}));
    browser
        .js("const q = document.getElementById('q'); q.value = 'a tool'; q.form.requestSubmit();");
    browser.wait("results on a phone", "return document.getElementById('grid').getAttribute('aria-busy') === 'false' && document.querySelectorAll('#grid .tile').length > 0 && document.getElementById('error').hidden");
    let fits = browser.js("const g = document.getElementById('grid'); const w = g.children[0].getBoundingClientRect().width; return document.documentElement.scrollWidth <= window.innerWidth + 1 && g.clientWidth / w >= 2.5");
    assert_eq!(fits, Value::Bool(true));
    browser.screenshot("browser-phone.png");
}
