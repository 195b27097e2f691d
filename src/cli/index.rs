//! `clipdex index`, `clipdex reindex` and `clipdex status`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{IndexArgs, ReindexArgs, ReplicaArgs, RetagArgs, RunArgs, StatusArgs, TagArgs};
use crate::indexer::tags::{self, Tagging, Vocabulary};
use crate::indexer::{self, Index, Phase, Progress, RunOptions};
use crate::model::{Clip, HubOptions, ModelInfo, ModelSource, Precision};
use crate::store::RunSummary;
use crate::vector::EngineConfig;
use crate::vector::milvus::ShardStatus;

fn run_options(args: &RunArgs) -> RunOptions {
    let mut opts = RunOptions::default();
    if let Some(b) = args.batch {
        opts.batch_size = b.max(1);
    }
    if let Some(w) = args.workers {
        opts.workers = w.max(1);
    }
    if let Some(c) = args.commit_every {
        opts.commit_changes = c.max(1);
    }
    opts.exact_decode = args.exact_decode;
    opts.limits.max_file_bytes = args.max_file_mb.max(1) << 20;
    opts
}

/// What the tag options ask for, the vocabulary file read and checked.
pub(super) fn tagging(args: &TagArgs) -> Result<Tagging> {
    if args.no_tags {
        return Ok(Tagging::Off);
    }
    if let Some(t) = args.tag_threshold {
        tags::check_threshold(t).map_err(anyhow::Error::msg)?;
    }
    let vocabulary = match args.tags.as_deref() {
        None => None,
        Some(tags::BUILTIN_SOURCE) if !Path::new(tags::BUILTIN_SOURCE).exists() => {
            Some((tags::BUILTIN_SOURCE.to_string(), tags::BUILTIN.to_string()))
        }
        Some(file) => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read the tag file {file}"))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("the tag file {file} is not UTF-8 text"))?;
            Vocabulary::parse(&text).with_context(|| format!("the tag file {file}"))?;
            Some((file.to_string(), text))
        }
    };
    if vocabulary.is_none() && args.tag_threshold.is_none() {
        return Ok(Tagging::Keep);
    }
    Ok(Tagging::Change {
        vocabulary,
        threshold: args.tag_threshold,
    })
}

/// A run's options from its arguments.
pub(super) fn options(run: &RunArgs, tags: &TagArgs) -> Result<RunOptions> {
    Ok(RunOptions {
        tags: tagging(tags)?,
        ..run_options(run)
    })
}

pub fn index(args: &IndexArgs) -> Result<()> {
    if !args.library.is_dir() {
        bail!("the library {} is not a folder", args.library.display());
    }
    let opts = options(&args.run, &args.tags)?;
    // Before the model loads: a wrong --vectors or --shard fails at once.
    let engine = engine_asked(args)?;
    // Continuing an index keeps its model and precision unless others are
    // asked for (which the index then refuses, naming `reindex --model` or
    // `--precision`).
    let stored = stored_model(&args.index);
    let source = match (&args.model.model, &stored) {
        (None, Some(model)) => ModelSource::parse(&model.id).with_context(|| {
            format!(
                "the index's model {} is no longer available; restore it, or pass --model",
                model.id
            )
        })?,
        _ => args.model.source()?,
    };
    let precision = match (args.model.precision, &stored) {
        (Some(p), _) => p,
        (None, Some(model)) => model.precision,
        (None, None) => crate::model::default_precision(),
    };
    let clip = args.model.load(&source, precision)?;
    if let Some(token) = &args.vectors_token {
        crate::vector::engine::set_token(token);
    }
    let index = Index::create_or_open_in(&args.index, &args.library, clip.info(), engine.as_ref())?;
    run(&index, &clip, &opts, args.json)
}

/// The engine `--vectors` and `--shard` ask for (`None`: the one the index
/// records, or the embedded engine for a new index).
fn engine_asked(args: &IndexArgs) -> Result<Option<EngineConfig>> {
    let mut engine = args
        .vectors
        .as_deref()
        .map(EngineConfig::parse)
        .transpose()?;
    let Some(shard) = args.shard else {
        return Ok(engine);
    };
    let needs_shared = || {
        anyhow!(
            "--shard splits a library between indexes that write one shared engine: \
             give --vectors milvus://HOST:PORT/COLLECTION"
        )
    };
    match &mut engine {
        Some(EngineConfig::Milvus(m)) => m.shard = Some(shard),
        Some(EngineConfig::Embedded) => return Err(needs_shared()),
        None if indexer::IndexPaths::new(&args.index).exists() => {
            let recorded = EngineConfig::read(&args.index)?;
            if recorded == EngineConfig::Embedded {
                return Err(needs_shared());
            }
            if recorded.shard() != shard {
                bail!(
                    "the index {} writes {}, not shard {shard}: a shard keeps its index folder",
                    args.index.display(),
                    recorded.describe()
                );
            }
        }
        None => return Err(needs_shared()),
    }
    Ok(engine)
}

/// `clipdex replica`: makes the replica (from `--of`, `--library` and the
/// model) when its folder has none, then syncs it once.
pub fn replica(args: &ReplicaArgs) -> Result<()> {
    if let Some(token) = &args.vectors_token {
        crate::vector::engine::set_token(token);
    }
    let index = if indexer::IndexPaths::new(&args.index).exists() {
        // Made before (perhaps by a run that stopped before its first
        // sync): the same --of again is no error, another one is.
        if let Some(of) = &args.of {
            let recorded = EngineConfig::read(&args.index)?;
            let asked = indexer::replica::replica_of(&EngineConfig::parse(of)?)?;
            if !recorded.same_engine(&asked) {
                bail!(
                    "{} is a replica of {}, not of {of}: a replica keeps its collection",
                    args.index.display(),
                    recorded.describe()
                );
            }
        }
        Index::open(&args.index)?
    } else {
        let (Some(of), Some(library)) = (&args.of, &args.library) else {
            bail!(
                "no replica at {} yet: give --of milvus://HOST:PORT/COLLECTION and --library (where \
                 this machine sees the library) to make one",
                args.index.display()
            );
        };
        let engine = EngineConfig::parse(of)?;
        let precision = args
            .model
            .precision
            .unwrap_or_else(crate::model::default_precision);
        let source = args.model.source()?;
        let clip = args.model.load(&source, precision)?;
        indexer::replica::create_or_open(&args.index, library, clip.info(), &engine)?
    };
    let synced = indexer::replica::sync(&index, args.full)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&synced)?);
    } else {
        println!(
            "replica {} of {}: {} photos ({} added, {} updated, {} removed; {} records read in {:.0} ms)",
            args.index.display(),
            index.vectors().engine(),
            synced.photos,
            synced.added,
            synced.updated,
            synced.removed,
            synced.read,
            synced.took_ms
        );
    }
    Ok(())
}

/// The model of the index at `root`, if there is one to read.
fn stored_model(root: &Path) -> Option<ModelInfo> {
    if !indexer::IndexPaths::new(root).exists() {
        return None;
    }
    Index::read_meta(root).ok().map(|m| m.model)
}

pub fn reindex(args: &ReindexArgs) -> Result<()> {
    let opts = options(&args.run, &args.tags)?;
    if let Some(model) = &args.model {
        // A new model keeps the index's precision unless told otherwise.
        let precision = args
            .precision
            .or_else(|| stored_model(&args.index).map(|m| m.precision))
            .unwrap_or_else(crate::model::default_precision);
        return switch_model(args, opts, model, precision);
    }
    let index = Index::open(&args.index)?;
    let model_id = index.meta().model.id.clone();
    if let Some(asked) = args
        .precision
        .filter(|&p| p != index.meta().model.precision)
    {
        drop(index);
        return switch_model(args, opts, &model_id, asked);
    }
    let clip = index_model(&index, args.offline)?;
    run(&index, &clip, &opts, args.json)
}

/// The model an index was made with, at its precision.
fn index_model(index: &Index, offline: bool) -> Result<Clip> {
    let model_id = &index.meta().model.id;
    let source = ModelSource::parse(model_id).with_context(|| {
        format!(
            "the index's model {model_id} is no longer available; restore it, or build a new index"
        )
    })?;
    let hub = HubOptions::from_env(offline, true);
    Clip::load_with(&source, &hub, index.meta().model.precision)
        .with_context(|| format!("cannot load the index's model {model_id}"))
}

/// `clipdex retag`: every photo tagged again from its embedding.
pub fn retag(args: &RetagArgs) -> Result<()> {
    let tagging = tagging(&args.tags)?;
    let index = match Index::open(&args.index) {
        Err(e @ indexer::Error::InUse { .. }) => bail!(
            "{e}; a server holding the index takes the tag options itself (clipdex serve --tags FILE)"
        ),
        opened => opened?,
    };
    let clip = index_model(&index, args.offline)?;
    let tagger = index.tagger(&clip, &tagging)?;
    let done = index.retag(tagger.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string(&done)?);
        return Ok(());
    }
    match tagger.as_ref().map(|t| t.setup()) {
        Some(setup) => println!(
            "{} photos tagged with {} ({} tags, threshold {}) in {:.1} s: {} have tags, {} changed",
            done.photos,
            setup.source,
            tagger.as_ref().map_or(0, |t| t.names().len()),
            setup.threshold,
            done.seconds,
            done.tagged,
            done.changed
        ),
        None => println!(
            "tags removed from {} photos; the index makes no tags now",
            done.changed
        ),
    }
    Ok(())
}

/// `clipdex reindex --model M` (or `--precision P`): builds the next
/// generation with `M` at `precision` beside the index, then puts it in the
/// index's place (see `indexer::generation`).
fn switch_model(
    args: &ReindexArgs,
    mut opts: RunOptions,
    model: &str,
    precision: Precision,
) -> Result<()> {
    let root = &args.index;
    // The current index's library and model: from the index, or from the
    // lock file of the process that holds it (which keeps answering).
    let (library, fingerprint) = match Index::open(root) {
        Ok(index) => {
            // The next generation tags as this one does, unless told otherwise.
            if opts.tags == Tagging::Keep {
                opts.tags = match index.store().tag_setup()? {
                    Some(Some(setup)) => Tagging::Change {
                        vocabulary: Some((setup.source, setup.text)),
                        threshold: Some(setup.threshold),
                    },
                    Some(None) => Tagging::Off,
                    None => Tagging::Keep,
                };
            }
            (index.library(), index.meta().model.fingerprint.clone())
        }
        Err(indexer::Error::InUse { holder, .. }) => {
            if opts.tags == Tagging::Keep {
                eprintln!(
                    "{} is in use, so its tag vocabulary cannot be read: the new generation uses \
                     the built-in one unless --tags names yours",
                    root.display()
                );
            }
            match (holder.library.clone(), holder.fingerprint.clone()) {
                (Some(library), Some(fingerprint)) => (PathBuf::from(library), fingerprint),
                _ => bail!(
                    "{} is in use ({holder}), by a clipdex too old to say its library; stop it first",
                    root.display()
                ),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let source = ModelSource::parse(model)?;
    let clip = super::load_model(&source, args.offline, precision)?;
    let source = match precision {
        Precision::Exact => source.to_string(),
        Precision::Fast | Precision::Int8 => format!("{source} ({precision} precision)"),
    };
    if clip.info().fingerprint == fingerprint {
        eprintln!(
            "{} already uses {source}; bringing it up to date",
            root.display()
        );
        let index = Index::open(root)?;
        return run(&index, &clip, &opts, args.json);
    }
    let engine = crate::vector::EngineConfig::read(root)?;
    if engine != crate::vector::EngineConfig::Embedded {
        bail!(
            "{} keeps its vectors in {}: switching its model or precision would need a second \
             collection, which clipdex does not make yet; index into a new --index folder with \
             --vectors naming a new collection",
            root.display(),
            engine.describe()
        );
    }
    let next = indexer::generation::next_path(root);
    // A next generation begun with another model is started over; one begun
    // with this model resumes where it stopped.
    if next.exists() {
        let same =
            Index::open(&next).map(|n| n.meta().model.fingerprint == clip.info().fingerprint);
        if !matches!(same, Ok(true)) {
            std::fs::remove_dir_all(&next)
                .with_context(|| format!("cannot remove {}", next.display()))?;
        }
    }
    {
        let index = Index::create_or_open(&next, &library, clip.info())?;
        run(&index, &clip, &opts, args.json)?;
    }
    indexer::generation::mark_ready(root)?;
    match indexer::generation::settle(root) {
        Ok(_) => eprintln!("{} now uses {source}", root.display()),
        Err(indexer::Error::InUse { holder, .. }) => eprintln!(
            "the index with {source} is ready in {}; it replaces {} when the index is next opened \
             (it is in use now: {holder}; restart it to switch)",
            next.display(),
            root.display()
        ),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn run(index: &Index, clip: &Clip, opts: &RunOptions, json: bool) -> Result<()> {
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("preparing the automatic tags");
    let mut last_phase = Phase::Tagging;
    let mut callback = |p: &Progress| {
        if p.phase == Phase::Scanning && last_phase != Phase::Scanning {
            bar.set_message("scanning the library");
        }
        if p.phase != last_phase && p.phase == Phase::Indexing {
            bar.set_length(p.to_process);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{wide_bar}] {pos}/{len} files  {msg}  ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        }
        if p.phase == Phase::Finishing && last_phase != Phase::Finishing {
            bar.set_message("removing deleted photos, saving the index");
        }
        last_phase = p.phase;
        if p.phase == Phase::Indexing {
            bar.set_position(p.processed);
            bar.set_message(format!(
                "{:.1} files/s  embedded {}  skipped {}",
                p.files_per_second(),
                p.embedded(),
                p.counts.skipped
            ));
        }
    };
    let stop = AtomicBool::new(false);
    let result = indexer::run(index, clip, opts, &mut callback, &stop);
    bar.finish_and_clear();
    let summary = result?;
    print_summary(index, &summary, json)
}

fn print_summary(index: &Index, s: &RunSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    let secs = (s.finished_at - s.started_at).max(0);
    println!(
        "{} is up to date in {} ({secs} s)",
        index.meta().library,
        index.paths().root.display()
    );
    println!(
        "  {} files: {} added, {} replaced, {} moved, {} duplicates, {} updated, {} removed, {} skipped, {} unchanged",
        s.counts.files_seen,
        s.counts.added,
        s.counts.replaced,
        s.counts.moved,
        s.counts.duplicates,
        s.counts.updated,
        s.counts.removed,
        s.counts.skipped,
        s.counts.unchanged
    );
    println!("  {} photos indexed", index.store().count());
    if s.counts.skipped > 0 {
        println!(
            "  skipped files and reasons: clipdex status --index {}",
            index.paths().root.display()
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct Status {
    index: String,
    library: String,
    /// Where the vectors live: `embedded`, or the Milvus address and
    /// collection (never credentials).
    vectors_engine: String,
    model: crate::model::ModelInfo,
    format_version: u32,
    created_at: i64,
    photos: usize,
    vectors: usize,
    keywords: u64,
    size_on_disk: SizeOnDisk,
    last_run: Option<RunSummary>,
    skipped: Vec<Skipped>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<indexer::Consistency>,
    /// In a shared engine: every shard of the collection (photos there,
    /// last report), read from the engine.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shards: Vec<ShardStatus>,
}

/// Bytes on disk. The thumbnails (one file per photo) are counted only by
/// `status --check`; `total` is the parts counted.
#[derive(Serialize)]
struct SizeOnDisk {
    total: u64,
    store: u64,
    vectors: u64,
    keywords: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    thumbnails: Option<u64>,
}

#[derive(Serialize)]
struct Skipped {
    path: String,
    reason: String,
}

fn dir_size(p: &Path) -> u64 {
    crate::vector::dir_size(p)
}

pub fn status(args: &StatusArgs) -> Result<()> {
    // Without --check nothing loads the graph or walks the thumbnails: at a
    // million photos those take seconds.
    let (overview, check, thumbnails) = if args.check {
        let index = match Index::open(&args.index) {
            Ok(index) => index,
            Err(indexer::Error::InUse { .. }) => return status_in_use(&args.index, args.json),
            Err(e) => return Err(e.into()),
        };
        let check = index.check()?;
        let overview = index.summary()?;
        let thumbnails = dir_size(&overview.paths.thumbs());
        (overview, Some(check), Some(thumbnails))
    } else {
        match Index::overview(&args.index) {
            Ok(overview) => (overview, None, None),
            Err(indexer::Error::InUse { .. }) => return status_in_use(&args.index, args.json),
            Err(e) => return Err(e.into()),
        }
    };
    let paths = &overview.paths;
    let size = SizeOnDisk {
        store: dir_size(&paths.db()),
        vectors: dir_size(&paths.vectors()),
        keywords: dir_size(&paths.keyword()),
        thumbnails,
        total: 0,
    };
    let size = SizeOnDisk {
        total: size.store + size.vectors + size.keywords + size.thumbnails.unwrap_or(0),
        ..size
    };
    let status = Status {
        index: paths.root.display().to_string(),
        library: overview.meta.library.clone(),
        model: overview.meta.model.clone(),
        vectors_engine: crate::vector::EngineConfig::read(&overview.paths.root)?.describe(),
        format_version: overview.meta.format_version,
        created_at: overview.meta.created_at,
        photos: overview.photos,
        vectors: overview.vectors,
        keywords: overview.keywords,
        size_on_disk: size,
        last_run: overview.last_run,
        skipped: overview
            .skipped
            .into_iter()
            .map(|(path, s)| Skipped {
                path: crate::common::rel_path::display(&path).into_owned(),
                reason: s.reason,
            })
            .collect(),
        check,
        shards: overview.shards,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status);
    }
    if let Some(check) = &status.check {
        if !check.consistent {
            bail!("the index's store, vector index and keyword index disagree (see above)");
        }
    }
    Ok(())
}

/// `2026-11-28 05:12:00 UTC` from seconds since the epoch.
fn iso_utc(secs: i64) -> String {
    format!(
        "{} UTC",
        crate::common::time::format_datetime(secs).replacen('T', " ", 1)
    )
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn print_status(s: &Status) {
    println!("index    {}", s.index);
    println!("library  {}", s.library);
    println!("vectors  {}", s.vectors_engine);
    println!(
        "model    {} ({}, {}-d, {} precision, fingerprint {})",
        s.model.id, s.model.family, s.model.embedding_dim, s.model.precision, s.model.fingerprint
    );
    let root = Path::new(&s.index);
    if indexer::generation::pending(root) {
        println!(
            "next     a new generation is ready in {}; it replaces this index when the index is next opened",
            indexer::generation::next_path(root).display()
        );
    }
    println!(
        "format   {} (created {})",
        s.format_version,
        iso_utc(s.created_at)
    );
    println!(
        "photos   {} (vectors {}, keyword documents {})",
        s.photos, s.vectors, s.keywords
    );
    let d = &s.size_on_disk;
    let thumbnails = match d.thumbnails {
        Some(bytes) => human_bytes(bytes),
        None => "counted by --check".to_string(),
    };
    println!(
        "on disk  {} (store {}, vectors {}, keywords {}, thumbnails {thumbnails})",
        human_bytes(d.total),
        human_bytes(d.store),
        human_bytes(d.vectors),
        human_bytes(d.keywords),
    );
    match &s.last_run {
        Some(r) => println!(
            "last run {}, took {} s: {} embedded, {} moved, {} duplicates, {} updated, {} removed, {} skipped, {} unchanged",
            iso_utc(r.finished_at),
            (r.finished_at - r.started_at).max(0),
            r.embedded,
            r.counts.moved,
            r.counts.duplicates,
            r.counts.updated,
            r.counts.removed,
            r.counts.skipped,
            r.counts.unchanged
        ),
        None => println!("last run none completed yet"),
    }
    if s.skipped.is_empty() {
        println!("skipped  none");
    } else {
        println!("skipped  {} files:", s.skipped.len());
        for k in &s.skipped {
            println!("  {}: {}", k.path, k.reason);
        }
    }
    print_shards(&s.shards);
    if let Some(c) = &s.check {
        println!(
            "check    {}: {} records, {} vectors, {} keyword documents",
            if c.consistent {
                "consistent"
            } else {
                "INCONSISTENT"
            },
            c.records,
            c.vectors,
            c.keywords
        );
    }
}

/// The shards of a shared engine's collection, one line each.
fn print_shards(shards: &[ShardStatus]) {
    let Some(first) = shards.first() else {
        return;
    };
    let photos: usize = shards.iter().map(|s| s.photos).sum();
    println!(
        "shards   {} of {} reported, {photos} photos in the collection:",
        shards.len(),
        first.shard.count
    );
    let now = crate::common::time::now_secs();
    for s in shards {
        match &s.report {
            Some(r) => println!(
                "  {:<7} {} photos, {}: {}/{} files read of {} ({} s ago, {} on {})",
                s.shard.to_string(),
                s.photos,
                r.state,
                r.processed,
                r.to_process,
                r.files,
                (now - r.updated).max(0),
                r.folder,
                r.host
            ),
            None => println!(
                "  {:<7} {} photos, no report yet",
                s.shard.to_string(),
                s.photos
            ),
        }
    }
}

/// While another process indexes, report its progress file instead (and,
/// in a shared engine, every shard's progress).
fn status_in_use(root: &PathBuf, json: bool) -> Result<()> {
    let progress = std::fs::read_to_string(root.join("progress.json")).unwrap_or_default();
    let value: serde_json::Value =
        serde_json::from_str(&progress).unwrap_or(serde_json::Value::Null);
    // The store is held; the engine is read without its model's check.
    let shards = match crate::vector::engine::read_shared(&EngineConfig::read(root)?, None) {
        Ok(found) => found.map(|(_, shards)| shards).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "the engine's shards could not be read");
            Vec::new()
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "index": root.display().to_string(),
                "in_use": true,
                "progress": value,
                "shards": shards,
            })
        );
        return Ok(());
    }
    println!(
        "index    {} (in use by another clipdex process)",
        root.display()
    );
    if let Some(p) = value.as_object() {
        let n = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        println!(
            "progress {}: {}/{} files processed, {} added, {} skipped (pid {})",
            p.get("phase").and_then(|v| v.as_str()).unwrap_or("?"),
            n("processed"),
            n("to_process"),
            n("added"),
            n("skipped"),
            n("pid")
        );
    }
    print_shards(&shards);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_times() {
        assert_eq!(super::iso_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::iso_utc(1_563_107_405), "2019-07-14 12:30:05 UTC");
        assert_eq!(super::iso_utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
