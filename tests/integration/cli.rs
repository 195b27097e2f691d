//! `clipdex embed` as a user runs it: local folders, the hub (a local stand-in
//! server speaking the hub's download protocol), offline mode, bad input.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use crate::common::{
    clipdex, clipdex_with_env, fixture_model, fixture_models, reference, shared_photos, stderr,
    stdout,
};

fn photo(rel: &str) -> String {
    shared_photos().join(rel).display().to_string()
}

#[test]
fn embed_json_matches_reference_embeddings() {
    for name in fixture_models() {
        let dir = fixture_model(&name);
        let r = reference(&name);
        let mut args = vec![
            "embed".to_string(),
            "--model".into(),
            dir.display().to_string(),
            "--json".into(),
        ];
        for text in &r.texts {
            args.extend(["--text".into(), text.clone()]);
        }
        for p in &r.photos {
            args.extend(["--image".into(), photo(p)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = clipdex(&args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let matrix =
            |key: &str| -> Vec<Vec<f32>> { serde_json::from_value(json[key].clone()).unwrap() };
        let text = matrix("text");
        let image = matrix("image");
        let want_text = r.tensors["text_embeds"].to_vec2::<f32>().unwrap();
        let want_image = r.tensors["image_embeds"].to_vec2::<f32>().unwrap();
        let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.iter()
                .flatten()
                .zip(b.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert_eq!(text.len(), r.texts.len());
        assert!(
            max_diff(&text, &want_text) <= 1e-4,
            "{name}: text embeddings"
        );
        assert!(
            max_diff(&image, &want_image) <= 1e-3,
            "{name}: image embeddings"
        );
        for v in text.iter().chain(&image) {
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5);
        }
        let logits = matrix("logits_per_image");
        let want_logits = r.tensors["logits_per_image"].to_vec2::<f32>().unwrap();
        assert!(max_diff(&logits, &want_logits) <= 1e-2, "{name}: logits");
        assert_eq!(json["model"]["embedding_dim"], want_text[0].len());
        assert_eq!(json["similarity"].as_array().unwrap().len(), r.photos.len());
    }
}

#[test]
fn embed_plain_output_shows_similarities() {
    let dir = fixture_model("openai-tiny");
    let out = clipdex(&[
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        "a cat",
        "--text",
        "the moon",
        "--image",
        &photo("wallpapers/pypi_scikit-image/chelsea.jpg"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("text[1]") && text.contains("image[0]") && text.contains("cosine similarity"),
        "{text}"
    );
}

#[test]
fn every_bad_input_is_reported_and_nothing_is_printed() {
    let dir = fixture_model("openai-tiny");
    let images = crate::common::fixtures().join("images");
    let img = |n: &str| images.join(n).display().to_string();
    let out = clipdex(&[
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        "fine",
        "--text",
        "   ",
        "--image",
        &img("photo.jpg"),
        "--image",
        &img("empty.jpg"),
        "--image",
        &img("truncated.jpg"),
        "--image",
        &img("text.jpg"),
        "--image",
        &img("missing.jpg"),
    ]);
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    for expected in [
        "text 1: empty text",
        "image 1",
        "empty file",
        "image 2",
        "file ends early",
        "image 3",
        "not an image",
        "image 4",
        "cannot read",
        "5 of 7 inputs",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn model_errors_are_clear() {
    // No inputs is an error before any model is touched.
    let none = clipdex(&["embed"]);
    assert!(!none.status.success() && stderr(&none).contains("nothing to embed"));

    let out = clipdex(&["embed", "--model", "./no/such/dir", "--text", "x"]);
    assert!(
        !out.status.success() && stderr(&out).contains("no folder named ./no/such/dir"),
        "{}",
        stderr(&out)
    );

    let cache = tempfile::tempdir().unwrap();
    let out = clipdex_with_env(
        &[
            "embed",
            "--model",
            "someone/some-model",
            "--offline",
            "--text",
            "x",
        ],
        &[("HF_HUB_CACHE", cache.path().to_str().unwrap())],
    );
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("config.json not found") && err.contains("offline"),
        "{err}"
    );

    // A folder missing its weights names the missing file.
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_model("openai-tiny");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let out = clipdex(&[
        "embed",
        "--model",
        dir.path().to_str().unwrap(),
        "--text",
        "x",
    ]);
    assert!(
        stderr(&out).contains("model.safetensors not found"),
        "{}",
        stderr(&out)
    );

    // Weights of another architecture: an error naming the tensor, no panic.
    std::fs::copy(
        fixture_model("laion-tiny").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let out = clipdex(&[
        "embed",
        "--model",
        dir.path().to_str().unwrap(),
        "--text",
        "x",
    ]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("weights do not fit the config"),
        "{err}"
    );

    // A corrupt weights file.
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let out = clipdex(&[
        "embed",
        "--model",
        dir.path().to_str().unwrap(),
        "--text",
        "x",
    ]);
    assert!(
        !out.status.success() && !stderr(&out).contains("panicked"),
        "{}",
        stderr(&out)
    );
}

/// Serves a folder the way huggingface.co serves `/{repo}/resolve/{revision}/{file}`.
fn serve_hub(root: PathBuf, repo: &'static str) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range = None;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().to_string());
                }
            }
            if path == "/quit" {
                break;
            }
            let prefix = format!("/{repo}/resolve/main/");
            let file = path.strip_prefix(&prefix).map(|f| root.join(f));
            match file.filter(|f| f.is_file()) {
                None => {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
                Some(f) => {
                    let data = std::fs::read(&f).unwrap();
                    let start: usize = range
                        .as_deref()
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let end = match range.as_deref() {
                        Some("0-0") => 1,
                        _ => data.len(),
                    };
                    let body = &data[start.min(data.len())..end.max(start).min(data.len())];
                    let etag = blake3::hash(&data).to_hex().to_string();
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\n\
                         ETag: \"{etag}\"\r\nX-Repo-Commit: {}\r\nConnection: close\r\n\r\n",
                        body.len(),
                        start,
                        (start + body.len()).saturating_sub(1),
                        data.len(),
                        "0123456789abcdef0123456789abcdef01234567",
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body);
                }
            }
        }
    });
    (addr, handle)
}

#[test]
fn hub_download_then_offline_from_cache() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let (endpoint, server) = serve_hub(fixture_model("laion-tiny"), "clipdex-test/laion-tiny");
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache_dir),
    ];
    let local = clipdex(&[
        "embed",
        "--model",
        fixture_model("laion-tiny").to_str().unwrap(),
        "--text",
        "a dog",
        "--json",
    ]);
    let out = clipdex_with_env(
        &[
            "embed",
            "--model",
            "clipdex-test/laion-tiny",
            "--text",
            "a dog",
            "--json",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let vector = |o: &std::process::Output| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&stdout(o)).unwrap()["text"].clone()
    };
    assert_eq!(vector(&out), vector(&local));
    assert!(
        Path::new(cache_dir)
            .join("models--clipdex-test--laion-tiny")
            .is_dir()
    );

    // A repository the hub does not have: the first missing file is named.
    let out = clipdex_with_env(
        &["embed", "--model", "clipdex-test/absent", "--text", "a dog"],
        &env,
    );
    assert!(
        !out.status.success() && stderr(&out).contains("config.json not found"),
        "{}",
        stderr(&out)
    );

    // Stop the server: offline mode must not need it.
    let _ = std::net::TcpStream::connect(endpoint.trim_start_matches("http://"))
        .and_then(|mut s| s.write_all(b"GET /quit HTTP/1.1\r\n\r\n"));
    server.join().unwrap();
    let out = clipdex_with_env(
        &[
            "embed",
            "--model",
            "clipdex-test/laion-tiny",
            "--text",
            "a dog",
            "--json",
        ],
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HUB_CACHE", cache_dir),
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(vector(&out), vector(&local));
}
