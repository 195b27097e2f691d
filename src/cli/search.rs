//! `clipdex search` and `clipdex similar`: the search engine in a terminal.
//! When a `clipdex serve` holds the index, the query goes to that server's
//! API instead (the same engine answers).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::{FilterArgs, SearchArgs, SimilarArgs};
use crate::indexer::{self, Index};
use crate::model::{Clip, HubOptions, ModelSource};
use crate::search::{self, Engine, Filters, Query, SearchResults, Term, TermKind};

fn filters(f: &FilterArgs) -> Filters {
    Filters {
        folder: f.folder.clone(),
        from: f.from.clone(),
        to: f.to.clone(),
        types: f.types.as_ref().map(|t| vec![t.clone()]),
        camera: f.camera.clone(),
    }
}

enum Backend {
    Local(Engine),
    /// A running `clipdex serve` that holds the index.
    Remote(String),
}

fn backend(index: &Path, offline: bool) -> Result<Backend> {
    match Index::open(index) {
        Ok(index) => {
            let model_id = index.meta().model.id.clone();
            let source = ModelSource::parse(&model_id)
                .with_context(|| format!("the index's model {model_id} is no longer available"))?;
            let clip = Clip::load(&source, &HubOptions::from_env(offline, true))
                .with_context(|| format!("cannot load the index's model {model_id}"))?;
            Ok(Backend::Local(Engine::new(Arc::new(index), Arc::new(clip))?))
        }
        Err(indexer::Error::InUse { holder, .. }) if holder.contains("clipdex serve at ") => {
            let url = holder.split("clipdex serve at ").nth(1).unwrap_or("").trim_end_matches(')').trim().to_string();
            Ok(Backend::Remote(url))
        }
        Err(e) => Err(e.into()),
    }
}

fn remote_get(base: &str, path_and_query: &str) -> Result<SearchResults> {
    let url = format!("{base}{path_and_query}");
    let mut request = ureq::get(&url);
    if let Ok(token) = std::env::var("CLIPDEX_TOKEN") {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request.config().http_status_as_error(false).build().call().with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    let body: serde_json::Value = response.body_mut().read_json().context("bad answer from the server")?;
    if !status.is_success() {
        bail!("{}", body["error"]["message"].as_str().unwrap_or("the server refused the query"));
    }
    Ok(serde_json::from_value(body)?)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn filter_params(f: &Filters) -> String {
    let mut out = String::new();
    for (k, v) in [("folder", &f.folder), ("from", &f.from), ("to", &f.to), ("camera", &f.camera)] {
        if let Some(v) = v {
            out.push_str(&format!("&{k}={}", encode(v)));
        }
    }
    if let Some(t) = &f.types {
        out.push_str(&format!("&type={}", encode(&t.join(","))));
    }
    out
}

fn print(results: &SearchResults, json: bool) -> Result<()> {
    if json {
        for hit in &results.hits {
            println!("{}", serde_json::to_string(hit)?);
        }
        return Ok(());
    }
    if results.hits.is_empty() {
        eprintln!("no photos match");
    }
    for (i, hit) in results.hits.iter().enumerate() {
        let mark = if hit.keyword_rank.is_some() { " (name/caption match)" } else { "" };
        println!("{:>3}. {:.4}  {}  [id {}]{mark}", results.offset + i + 1, hit.similarity, hit.path, hit.id);
    }
    Ok(())
}

pub fn search(args: &SearchArgs) -> Result<()> {
    let f = filters(&args.filters);
    let results = match backend(&args.index, args.offline)? {
        Backend::Local(engine) => {
            let mut terms = search::parse(&args.query).map_err(|e| anyhow::anyhow!("bad query: {e}"))?;
            if let Some(ex) = args.exclude.as_deref().filter(|s| !s.trim().is_empty()) {
                terms.push(Term { kind: TermKind::Text(ex.to_string()), weight: -0.5 });
            }
            let mut q = Query::new(terms);
            q.k = args.k;
            q.offset = args.offset;
            q.min_score = args.min_score;
            q.hybrid = !args.no_keywords;
            q.filters = f;
            engine.search(&q)?
        }
        Backend::Remote(base) => {
            let mut pq = format!("/api/search?q={}&k={}&offset={}", encode(&args.query), args.k, args.offset);
            if let Some(ex) = &args.exclude {
                pq.push_str(&format!("&exclude={}", encode(ex)));
            }
            if let Some(m) = args.min_score {
                pq.push_str(&format!("&min_score={m}"));
            }
            if args.no_keywords {
                pq.push_str("&hybrid=false");
            }
            pq.push_str(&filter_params(&f));
            remote_get(&base, &pq)?
        }
    };
    print(&results, args.json)
}

pub fn similar(args: &SimilarArgs) -> Result<()> {
    let f = filters(&args.filters);
    let file = Path::new(&args.target);
    let results = match backend(&args.index, args.offline)? {
        Backend::Local(engine) => {
            let library = engine.index().library();
            let in_library = std::fs::canonicalize(file)
                .ok()
                .and_then(|p| p.strip_prefix(&library).ok().map(|r| r.to_string_lossy().replace('\\', "/")));
            let by_path = match &in_library {
                Some(rel) => engine.index().store().id_for_path(rel)?,
                None if !file.exists() => engine.index().store().id_for_path(args.target.trim_matches('/'))?,
                None => None,
            };
            let by_id = if file.exists() { None } else { args.target.parse::<u64>().ok() };
            match by_path.or(by_id) {
                Some(id) => engine.similar(id, args.k, 0, f)?,
                None if file.is_file() => {
                    // Any image file: query by picture.
                    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
                    let v = engine.embed_image(&bytes)?;
                    let mut q = Query::new(vec![Term { kind: TermKind::Vector(v), weight: 1.0 }]);
                    q.k = args.k;
                    q.filters = f;
                    engine.search(&q)?
                }
                None => bail!("{} is neither a photo of the index (id or path) nor an image file", args.target),
            }
        }
        Backend::Remote(base) => match args.target.parse::<u64>() {
            Ok(id) if !file.exists() => remote_get(&base, &format!("/api/photos/{id}/similar?k={}{}", args.k, filter_params(&f)))?,
            _ => {
                // A path of the library: ask for one more and leave the photo itself out.
                let path = args.target.trim_matches('/').to_string();
                let q = format!("image:{path}");
                let mut r = remote_get(&base, &format!("/api/search?q={}&k={}{}", encode(&q), args.k + 1, filter_params(&f)))?;
                r.hits.retain(|h| h.path != path);
                r.hits.truncate(args.k);
                r
            }
        },
    };
    print(&results, args.json)
}
