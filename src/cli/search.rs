//! `clipdex search` and `clipdex similar`: the search engine in a terminal.
//! When a `clipdex serve` holds the index, the query goes to that server's
//! API instead (the same engine answers).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{DuplicatesArgs, FilterArgs, QueryTarget, SearchArgs, SimilarArgs, TagsArgs};
use crate::indexer;
use crate::model::{Precision, Towers};
use crate::search::{
    self, Engine, Filters, Hit, HubOptions, OpenError, OpenOptions, Request, SearchResults, Term,
    TermKind,
};

impl From<&FilterArgs> for Filters {
    fn from(f: &FilterArgs) -> Self {
        Filters::from_flat(
            f.folder.clone(),
            f.from.clone(),
            f.to.clone(),
            f.types.clone(),
            f.camera.clone(),
        )
        .with_tags(f.tag.clone())
    }
}

enum Backend {
    Local(Engine),
    /// A running `clipdex serve` that holds the index, by its URL.
    Remote(String),
}

fn backend(target: &QueryTarget) -> Result<Backend> {
    let QueryTarget {
        index,
        offline,
        precision,
    } = target;
    let precision = *precision;
    let hub = HubOptions::from_env(*offline, true);
    let opts = OpenOptions {
        index,
        library: None,
        model: None,
        precision,
        hub: &hub,
        towers: Towers::TextFirst,
        wait: None,
    };
    match search::open(&opts, &mut |_| {}) {
        Ok(engine) => Ok(Backend::Local(engine)),
        // The lock file says where the server that holds the index answers,
        // and its fingerprint the precision it embeds with.
        Err(OpenError::Index(indexer::Error::InUse {
            holder:
                indexer::Holder {
                    url: Some(url),
                    fingerprint,
                    ..
                },
            ..
        })) => {
            if let (Some(asked), Some(fingerprint)) = (precision, &fingerprint) {
                let serving = fingerprint
                    .rsplit_once('/')
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap_or(Precision::Exact);
                if serving != asked {
                    bail!(
                        "the server at {url} embeds queries with {serving} precision, as its index \
                         was made; --precision {asked} would not match"
                    );
                }
            }
            Ok(Backend::Remote(url))
        }
        Err(e) => Err(e.into()),
    }
}

/// The request with the bearer token of `CLIPDEX_TOKEN`, when set.
fn with_token<B>(request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
    match std::env::var("CLIPDEX_TOKEN") {
        Ok(token) => request.header("Authorization", &format!("Bearer {token}")),
        Err(_) => request,
    }
}

/// The server's JSON answer, or its error message.
fn answer<T: serde::de::DeserializeOwned>(
    response: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    base: &str,
) -> Result<T> {
    let mut response = response.with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    let answer: serde_json::Value = response
        .body_mut()
        .read_json()
        .context("bad answer from the server")?;
    if !status.is_success() {
        bail!(
            "{}",
            answer["error"]["message"]
                .as_str()
                .unwrap_or("the server refused the request")
        );
    }
    Ok(serde_json::from_value(answer)?)
}

/// Sends a request to the server and reads its results.
fn remote(
    request: ureq::RequestBuilder<ureq::typestate::WithBody>,
    body: &impl Serialize,
    base: &str,
) -> Result<SearchResults> {
    let response = with_token(request)
        .config()
        .http_status_as_error(false)
        .build()
        .send_json(body);
    answer(response, base)
}

/// `POST /api/search` with the same request the local engine would run.
fn remote_search(base: &str, request: &Request) -> Result<SearchResults> {
    remote(ureq::post(&format!("{base}/api/search")), request, base)
}

fn print(results: &SearchResults, json: bool) -> Result<()> {
    if json {
        for hit in &results.hits {
            println!("{}", serde_json::to_string(hit)?);
        }
        return Ok(());
    }
    if !results.understood.is_empty() {
        let labels: Vec<&str> = results
            .understood
            .iter()
            .map(|u| u.label.as_str())
            .collect();
        eprintln!("filters: {}", labels.join(", "));
    }
    if results.hits.is_empty() {
        eprintln!("no photos match");
    }
    let by_relevance = results.sort == search::Sort::Relevance;
    let mut above = true;
    for (i, hit) in results.hits.iter().enumerate() {
        if by_relevance && above && !hit.relevant {
            above = false;
            println!("     -- less relevant --");
        }
        let mark = if hit.keyword_rank.is_some() {
            " (name/caption match)"
        } else {
            ""
        };
        // SigLIP: the match probability; CLIP: the cosine similarity.
        let score = match hit.probability {
            Some(p) => format!("{:>5.1}%", p * 100.0),
            None => format!("{:.4}", hit.similarity),
        };
        println!(
            "{:>3}. {score}  {}  [id {}]{mark}",
            results.offset + i + 1,
            hit.path,
            hit.id
        );
    }
    Ok(())
}

pub fn search(args: &SearchArgs) -> Result<()> {
    let request = Request {
        q: Some(args.query.clone()),
        exclude: args.exclude.clone(),
        filters: Some(Filters::from(&args.filters)),
        k: Some(args.k),
        offset: Some(args.offset),
        min_score: args.min_score,
        hybrid: Some(!args.no_keywords),
        sort: Some(args.sort),
        cutoff: Some(args.cutoff),
        terms: None,
    };
    if args.all {
        return search_all(&args.query_index, request);
    }
    let backend = backend(&args.query_index)?;
    let results = match &backend {
        Backend::Local(engine) => engine.search(&request.into_query()?)?,
        Backend::Remote(base) => remote_search(base, &request)?,
    };
    print(&results, args.json)?;
    end_quickly(backend);
    Ok(())
}

/// Lets the process end without taking the index apart: at a million
/// photos, dropping the graph's million allocations took 2 s of a
/// command's run. Only for commands that wrote nothing (opening the index
/// saves what its reconcile changed itself); the lock goes with the process.
fn end_quickly(backend: Backend) {
    std::mem::forget(backend);
}

/// `clipdex search --all`: every result as a JSON line, written as it is
/// found. A closed pipe (`| head`) ends the process as it ends `cat`'s.
fn search_all(target: &QueryTarget, request: Request) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut failed = None;
    let mut write = |hit: &Hit| {
        let line = serde_json::to_writer(&mut out, hit)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        failed = line.err();
        failed.is_none()
    };
    match backend(target)? {
        Backend::Local(engine) => {
            engine.search_all(&request.into_query()?, |hit| write(&hit))?;
        }
        // The server pages, MAX_K at a time; each photo once even if a
        // re-index moves it between pages.
        Backend::Remote(base) => {
            let mut seen = std::collections::HashSet::new();
            let mut offset = 0;
            'pages: loop {
                let page = Request {
                    k: Some(search::MAX_K),
                    offset: Some(offset),
                    ..request.clone()
                };
                let results = remote_search(&base, &page)?;
                for hit in &results.hits {
                    if seen.insert(hit.id) && !write(hit) {
                        break 'pages;
                    }
                }
                if !results.more {
                    break;
                }
                offset += results.hits.len().max(1);
            }
        }
    }
    if let Some(e) = failed {
        return Err(e).context("cannot write the results");
    }
    out.flush().context("cannot write the results")
}

pub fn similar(args: &SimilarArgs) -> Result<()> {
    let file = Path::new(&args.target);
    let request = Request {
        k: Some(args.k),
        filters: Some(Filters::from(&args.filters)),
        cutoff: Some(args.cutoff),
        ..Request::default()
    };
    let backend = backend(&args.query_index)?;
    let results = match &backend {
        Backend::Local(engine) => {
            let library = engine.index().library();
            let in_library = std::fs::canonicalize(file).ok().and_then(|p| {
                p.strip_prefix(&library)
                    .ok()
                    .map(|r| r.to_string_lossy().replace('\\', "/"))
            });
            let by_path = match &in_library {
                Some(rel) => engine.index().store().id_for_path(rel)?,
                None if !file.exists() => engine
                    .index()
                    .store()
                    .id_for_path(args.target.trim_matches('/'))?,
                None => None,
            };
            let by_id = if file.exists() {
                None
            } else {
                args.target.parse::<u64>().ok()
            };
            match by_path.or(by_id) {
                Some(id) => engine.similar(id, request)?,
                None if file.is_file() => {
                    // Any image file: query by picture.
                    let bytes = std::fs::read(file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    let picture = Term {
                        kind: TermKind::Vector(engine.embed_image(&bytes)?),
                        weight: 1.0,
                    };
                    engine.search(&request.into_query_with(vec![picture])?)?
                }
                None => bail!(
                    "{} is neither a photo of the index (id or path) nor an image file",
                    args.target
                ),
            }
        }
        Backend::Remote(base) => {
            // A photo of the index, by id or path: ask for one more and leave the photo itself out.
            let target = match args.target.parse::<u64>() {
                Ok(id) if !file.exists() => format!("image:{id}"),
                _ => format!("image:{}", args.target.trim_matches('/')),
            };
            let request = Request {
                q: Some(target.clone()),
                k: Some(args.k + 1),
                hybrid: Some(false),
                ..request
            };
            let mut results = remote_search(base, &request)?;
            let itself = results.hits.iter().position(|h| {
                target == format!("image:{}", h.id) || target == format!("image:{}", h.path)
            });
            match itself {
                Some(i) => drop(results.hits.remove(i)),
                None => results.hits.truncate(args.k),
            }
            results
        }
    };
    print(&results, args.json)?;
    end_quickly(backend);
    Ok(())
}

/// `clipdex duplicates`: every group, largest first.
pub fn duplicates(args: &DuplicatesArgs) -> Result<()> {
    use search::duplicates::{Duplicates, MAX_GROUPS};
    search::duplicates::check_threshold(args.threshold)?;
    let backend = backend(&args.query_index)?;
    // Photos indexed before the lists existed (or by a run that was
    // stopped) are listed now, and kept.
    if let Backend::Local(engine) = &backend {
        let pending = engine.index().store().near_pending()?.len();
        if pending > 0 {
            eprintln!("listing the near neighbours of {pending} photos (once)...");
            engine.index().update_near()?;
        }
    }
    let mut offset = 0;
    let mut shown = 0;
    loop {
        let page: Duplicates = match &backend {
            Backend::Local(engine) => {
                engine.duplicates(Some(args.threshold), offset, MAX_GROUPS)?
            }
            Backend::Remote(base) => {
                let url = format!(
                    "{base}/api/duplicates?threshold={}&k={MAX_GROUPS}&offset={offset}",
                    args.threshold
                );
                let response = with_token(ureq::get(&url))
                    .config()
                    .http_status_as_error(false)
                    .build()
                    .call();
                answer(response, base)?
            }
        };
        if offset == 0 && !args.json {
            eprintln!(
                "{} groups, {} photos (threshold {}, grouped in {:.0} ms){}",
                page.total_groups,
                page.total_photos,
                page.threshold,
                page.took_ms,
                match page.pending {
                    0 => String::new(),
                    n => format!("; {n} photos indexed since the last listing are not grouped yet"),
                }
            );
        }
        for group in &page.groups {
            shown += 1;
            if args.json {
                println!("{}", serde_json::to_string(group)?);
                continue;
            }
            println!(
                "group {shown}: {} photos, similarity {:.3} or more",
                group.photos.len(),
                group.similarity
            );
            for p in &group.photos {
                let photo = &p.photo;
                println!(
                    "  {} {}  {}x{}  {}  {}  [id {}]",
                    if p.likely_original { "*" } else { " " },
                    photo.path,
                    photo.width,
                    photo.height,
                    human_size(photo.size),
                    photo
                        .taken
                        .as_deref()
                        .map_or("no date", |t| &t[..t.len().min(10)]),
                    photo.id
                );
            }
        }
        if !page.more || page.groups.is_empty() {
            break;
        }
        offset += page.groups.len();
    }
    if !args.json && shown > 0 {
        eprintln!("* the likely original: the most pixels, then the largest file, then the oldest");
    }
    end_quickly(backend);
    Ok(())
}

/// `clipdex tags`: the tags photos have, the most common first.
pub fn tags(args: &TagsArgs) -> Result<()> {
    let backend = backend(&args.query_index)?;
    let list: search::tags::TagList = match &backend {
        Backend::Local(engine) => engine.tags()?,
        Backend::Remote(base) => {
            let response = with_token(ureq::get(&format!("{base}/api/tags")))
                .config()
                .http_status_as_error(false)
                .build()
                .call();
            answer(response, base)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&list)?);
    } else if !list.enabled {
        eprintln!("this index makes no tags (clipdex retag --tags FILE starts them)");
    } else {
        eprintln!(
            "{} tags in use of {} in the vocabulary ({}, threshold {})",
            list.tags.len(),
            list.vocabulary_size,
            list.vocabulary.as_deref().unwrap_or("-"),
            list.threshold.unwrap_or_default()
        );
        let width = list
            .tags
            .iter()
            .map(|t| t.name.chars().count())
            .max()
            .unwrap_or(0);
        for tag in &list.tags {
            println!(
                "{:<width$}  {:>7}  {}",
                tag.name,
                tag.count,
                tag.cover.as_ref().map_or("", |p| p.path.as_str())
            );
        }
    }
    end_quickly(backend);
    Ok(())
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.0} KB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
