//! The `clipdex` command line: parses flags, resolves them into settings, and
//! calls the library. Rendering (tables, JSON, progress) lives here; logic
//! does not.

mod embed;
mod index;
mod models;
mod search;
mod serve;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::model::{DEFAULT_MODEL, HubOptions, ModelSource, Precision, Towers};

/// Self-hosted semantic image search with CLIP.
#[derive(Debug, Parser)]
#[command(name = "clipdex", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Worker threads for inference and image decoding (default: all cores).
    #[arg(long, global = true, env = "CLIPDEX_THREADS")]
    pub threads: Option<usize>,

    /// Log filter, e.g. `info` or `clipdex=debug` (also RUST_LOG).
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed texts and images with a model and print the vectors and their similarities.
    Embed(EmbedArgs),
    /// Index a photo library: embed every image into a new or existing index.
    Index(IndexArgs),
    /// Bring an index up to date with its library: new, changed, moved and deleted files.
    Reindex(ReindexArgs),
    /// Show an index: counts, model, library, size, last run, skipped files.
    Status(StatusArgs),
    /// Make a search replica of a shared collection, or bring one up to
    /// date: an index folder that serves every shard's photos without
    /// indexing (`clipdex serve --index DIR` then keeps it up to date).
    Replica(ReplicaArgs),
    /// Serve the search page and API; with --library, index it in the background first.
    Serve(ServeArgs),
    /// Search an index by text (or the query language) and print ranked photos.
    Search(SearchArgs),
    /// Print photos similar to one of the index (by id or path) or to any image file.
    Similar(SimilarArgs),
    /// Tag every photo again from its stored embedding (another vocabulary
    /// or threshold, or none), without reading or embedding a photo.
    Retag(RetagArgs),
    /// List the automatic tags photos have: how many have each, and a cover photo.
    Tags(TagsArgs),
    /// Print groups of photos that are the same picture (resized,
    /// re-encoded, cropped, edited) or near-identical shots. Nothing is
    /// deleted or moved.
    Duplicates(DuplicatesArgs),
    /// Train a CLIP model from scratch or fine-tune one on captioned images.
    Train(TrainArgs),
    /// Evaluate a model: retrieval recall, zero-shot classification, linear probe.
    Eval(EvalArgs),
    /// List the recommended models: family, size, languages, whether cached, speed here.
    Models(ModelsArgs),
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Time each model that is in the local hub cache on this machine.
    #[arg(long)]
    pub measure: bool,

    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training pairs: JSONL {"image", "caption"}, CSV with filepath and title columns,
    /// a folder of images with .txt captions, or a folder of class sub-folders.
    #[arg(long)]
    pub data: PathBuf,

    /// Output folder: a Hugging Face checkpoint, plus checkpoint/ to resume from.
    #[arg(long)]
    pub out: PathBuf,

    /// Fine-tune this checkpoint (folder or hub id).
    #[arg(long)]
    pub init: Option<String>,

    /// Train from scratch: a preset (tiny-32, small-32, small-64, vit-b-32, vit-b-16, vit-l-14) or a config.json.
    #[arg(long)]
    pub config: Option<String>,

    #[arg(long, default_value_t = 10)]
    pub epochs: usize,

    #[arg(long, default_value_t = 64)]
    pub batch: usize,

    /// Peak learning rate (default 5e-4 from scratch, 1e-5 fine-tuning).
    #[arg(long)]
    pub lr: Option<f64>,

    /// Warm-up steps before the cosine decay (default 5% of the run).
    #[arg(long)]
    pub warmup: Option<u64>,

    #[arg(long, default_value_t = 0.2)]
    pub weight_decay: f64,

    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Validation pairs; without it, --val-percent of --data is held out.
    #[arg(long)]
    pub val: Option<PathBuf>,

    #[arg(long, default_value_t = 10.0)]
    pub val_percent: f64,

    /// Keep weights fixed: the image tower, the text tower, or both (only the
    /// projections, or SigLIP's heads, learn).
    #[arg(long, default_value = "none", value_parser = ["none", "image", "text", "towers"])]
    pub freeze: String,

    /// The objective: CLIP's softmax contrastive loss, or SigLIP's pairwise
    /// sigmoid loss with a learned bias. Default: the model family's own.
    #[arg(long, value_parser = ["softmax", "sigmoid"])]
    pub loss: Option<String>,

    /// Prompt templates for class names, one per line with {} (default: 8 of CLIP's).
    #[arg(long)]
    pub templates: Option<PathBuf>,

    /// Save a resumable checkpoint at least every this many seconds.
    #[arg(long, default_value_t = 300)]
    pub checkpoint_every: u64,

    #[arg(long)]
    pub offline: bool,

    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,

    /// The model: a checkpoint folder (e.g. a `clipdex train` output) or a hub id.
    #[arg(long, short = 'm', global = true, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Images per forward pass.
    #[arg(long, global = true, default_value_t = 64)]
    pub batch: usize,

    #[arg(long, global = true)]
    pub offline: bool,

    /// How the model computes: exact (f32, the reference's numbers), fast
    /// (the encoders' dense layers in bf16, on AMX, AVX512-BF16 or AVX2 where the CPU has it) or
    /// int8 (those layers in int8 on AMX-INT8 or AVX512-VNNI: faster still, a little
    /// further from exact).
    /// An index keeps the precision its vectors were made with.
    #[arg(
        long,
        global = true,
        value_name = "exact|fast|int8",
        default_value = "exact",
        env = "CLIPDEX_PRECISION"
    )]
    pub precision: Precision,

    /// Print a JSON record.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Text-to-image and image-to-text recall@1/5/10 and median rank on pairs.
    Retrieval {
        /// Pairs, in any format `train --data` reads.
        #[arg(long)]
        data: PathBuf,
    },
    /// Zero-shot classification accuracy from class names and prompt templates.
    ZeroShot {
        /// A folder of class sub-folders, or JSONL with "image" and "label".
        #[arg(long)]
        data: PathBuf,
        /// Templates, one per line with {} (default: 8 of CLIP's).
        #[arg(long)]
        templates: Option<PathBuf>,
    },
    /// Logistic regression on frozen image features.
    LinearProbe {
        #[arg(long)]
        train: PathBuf,
        #[arg(long)]
        test: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A photo folder to index (created or brought up to date in the background).
    #[arg(long)]
    pub library: Option<PathBuf>,

    /// The index folder.
    #[arg(long, default_value = DEFAULT_INDEX, env = "CLIPDEX_INDEX")]
    pub index: PathBuf,

    /// Model for a new index (default openai/clip-vit-base-patch32); an existing index uses its own.
    #[arg(long, short = 'm', env = "CLIPDEX_MODEL")]
    pub model: Option<String>,

    /// Address to listen on. Anything but loopback requires --token.
    #[arg(long, default_value = "127.0.0.1:7878", env = "CLIPDEX_BIND")]
    pub bind: String,

    /// Token every request must carry (Authorization: Bearer, or ?token= once in the browser).
    #[arg(long, env = "CLIPDEX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Allow cross-origin requests from this origin.
    #[arg(long)]
    pub cors: Option<String>,

    /// Largest image upload, in MiB.
    #[arg(long, default_value_t = 25)]
    pub max_upload_mb: usize,

    /// Memory all image uploads being decoded at once may take, in MiB; a
    /// request past it gets 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_decode_mb: u64,

    /// A host name the server answers to besides localhost and its address,
    /// and accepts as the page's origin (a reverse proxy's name, your LAN
    /// name); repeat for more.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,

    /// Most connections open at once.
    #[arg(long, default_value_t = crate::server::state::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Re-index the existing index's library at start.
    #[arg(long)]
    pub reindex: bool,

    /// Never use the network for the model (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,

    /// How the model computes: exact (f32, the reference's numbers), fast
    /// (the encoders' dense layers in bf16, on AMX, AVX512-BF16 or AVX2 where the CPU has it) or
    /// int8 (those layers in int8 on AMX-INT8 or AVX512-VNNI: faster still, a little
    /// further from exact).
    /// An index keeps the precision its vectors were made with; a new one is
    /// made fast where the CPU has AMX or AVX512-BF16, or AVX2 without AVX-512;
    /// exact elsewhere.
    #[arg(long, value_name = "exact|fast|int8", env = "CLIPDEX_PRECISION")]
    pub precision: Option<Precision>,

    #[command(flatten)]
    pub run: RunArgs,

    /// Tag options apply at the start-up re-index, which they imply.
    #[command(flatten)]
    pub tags: TagArgs,
}

/// Filters shared by search commands.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Only photos in this folder (relative to the library) or below.
    #[arg(long)]
    pub folder: Option<String>,
    /// Only photos taken on or after this date (YYYY-MM-DD).
    #[arg(long)]
    pub from: Option<String>,
    /// Only photos taken on or before this date (YYYY-MM-DD).
    #[arg(long)]
    pub to: Option<String>,
    /// Only these file types (comma-separated: jpeg,png).
    #[arg(long = "type")]
    pub types: Option<String>,
    /// Only photos from a camera matching these words.
    #[arg(long)]
    pub camera: Option<String>,
    /// Only photos with every one of these automatic tags (comma-separated).
    #[arg(long)]
    pub tag: Option<String>,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// What to look for: text, or the query language, e.g. '"beach" + 0.5*image:42 - "people"';
    /// filters may be typed in it: after:2019-06 before:2020 in:holidays camera:canon type:png,
    /// and dates in words ("beach July 2023", "summer 2019", "last year", "2018-2020").
    pub query: String,

    /// Number of results.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub k: usize,

    /// Results to skip.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,

    /// Text whose meaning the results should avoid.
    #[arg(long)]
    pub exclude: Option<String>,

    /// Drop results below this score: cosine similarity (-1 to 1) for CLIP
    /// models, match probability (0 to 1) for SigLIP models.
    #[arg(long)]
    pub min_score: Option<f32>,

    /// Rank by meaning only, without keyword matches on names and captions.
    #[arg(long)]
    pub no_keywords: bool,

    /// relevance (default), newest or oldest: the most relevant results in
    /// date order.
    #[arg(long, default_value = "relevance")]
    pub sort: crate::search::Sort,

    /// Where relevant results end: auto (per query), none, or a score
    /// (cosine similarity; a probability for SigLIP models). Results below
    /// it are printed after a "less relevant" line.
    #[arg(long, default_value = "auto", value_name = "auto|none|SCORE")]
    pub cutoff: crate::search::Cutoff,

    #[command(flatten)]
    pub filters: FilterArgs,

    #[command(flatten)]
    pub query_index: QueryTarget,

    /// Print JSON lines, one per result.
    #[arg(long)]
    pub json: bool,

    /// Every result, best first, as JSON lines while they are found (the
    /// whole library when no filter or --min-score narrows it); -k and
    /// --offset do not apply.
    #[arg(long, conflicts_with_all = ["k", "offset"])]
    pub all: bool,
}

/// The index a query goes to, and how its model is found.
#[derive(Debug, Args)]
pub struct QueryTarget {
    /// The index folder.
    #[arg(long, default_value = DEFAULT_INDEX, env = "CLIPDEX_INDEX")]
    pub index: PathBuf,

    /// Never use the network for the model.
    #[arg(long)]
    pub offline: bool,

    /// The precision queries are embedded with; the index's own by default
    /// (another one is refused: its vectors would not match).
    #[arg(long, value_name = "exact|fast|int8")]
    pub precision: Option<Precision>,
}

#[derive(Debug, Args)]
pub struct SimilarArgs {
    /// A photo id, a path in the library, or any image file.
    pub target: String,

    /// Number of results.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub k: usize,

    /// Where relevant results end: auto, none or a score.
    #[arg(long, default_value = "auto", value_name = "auto|none|SCORE")]
    pub cutoff: crate::search::Cutoff,

    #[command(flatten)]
    pub filters: FilterArgs,

    #[command(flatten)]
    pub query_index: QueryTarget,

    /// Print JSON lines, one per result.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DuplicatesArgs {
    /// Cosine similarity two photos' embeddings need to be grouped, 0 to 1
    /// (below 0.8 every photo's neighbours are searched again: slower).
    #[arg(long, default_value_t = crate::search::duplicates::DEFAULT_THRESHOLD)]
    pub threshold: f32,

    #[command(flatten)]
    pub query_index: QueryTarget,

    /// Print JSON lines, one per group.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RetagArgs {
    /// The index folder.
    #[arg(long, default_value = DEFAULT_INDEX, env = "CLIPDEX_INDEX")]
    pub index: PathBuf,

    #[command(flatten)]
    pub tags: TagArgs,

    /// Never use the network for the model (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,

    /// Print what was done as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TagsArgs {
    #[command(flatten)]
    pub query_index: QueryTarget,

    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The automatic tags' vocabulary and threshold.
#[derive(Debug, Clone, Args)]
pub struct TagArgs {
    /// Tag photos with this vocabulary file (one tag per line, aliases after
    /// "|"; the built-in one, src/indexer/tags.txt, shows the format) instead
    /// of the index's; `built-in` for the built-in one. Photos already
    /// indexed are re-tagged from their embeddings.
    #[arg(long, value_name = "FILE")]
    pub tags: Option<String>,

    /// Zero-shot probability a tag needs, above 0 and at most 1 (default 0.3).
    #[arg(long, value_name = "P")]
    pub tag_threshold: Option<f32>,

    /// No automatic tags; photos lose those they have.
    #[arg(long, conflicts_with_all = ["tags", "tag_threshold"])]
    pub no_tags: bool,
}

/// Where the index lives.
const DEFAULT_INDEX: &str = "index";

/// How an indexing run works.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Images per forward pass of the model (default 16).
    #[arg(long)]
    pub batch: Option<usize>,

    /// Threads reading and decoding files (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Photos per commit, at most (default 256; a commit also comes every
    /// 2 s). A killed run keeps what it committed and redoes the rest.
    #[arg(long)]
    pub commit_every: Option<usize>,

    /// Decode JPEGs at full size instead of reduced size in the DCT: slower,
    /// but pixel-exact with the reference preprocessing.
    #[arg(long)]
    pub exact_decode: bool,

    /// Largest image file read, in MiB; larger files are skipped unread.
    #[arg(long, default_value_t = 1024)]
    pub max_file_mb: u64,
}

#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The folder of photos to index.
    pub library: PathBuf,

    /// The index folder.
    #[arg(long, default_value = DEFAULT_INDEX, env = "CLIPDEX_INDEX")]
    pub index: PathBuf,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub tags: TagArgs,

    /// Where the vectors live, chosen when the index is made: `embedded`
    /// (the default: a graph in the index folder) or
    /// `milvus://HOST:PORT/COLLECTION[?index=hnsw|flat]` (a Milvus server;
    /// the collection is created if there is none). The index folder
    /// records it; every later command uses it.
    #[arg(long, value_name = "embedded|milvus://HOST:PORT/COLLECTION")]
    pub vectors: Option<String>,

    /// Index only shard I of N of the library: the files whose path hashes
    /// to I (every file is in exactly one shard). N processes or machines
    /// then index one library on shared storage into one Milvus collection
    /// at once, each with its own --index folder; `clipdex status` on any
    /// of them shows every shard. Needs --vectors milvus://; the index
    /// folder records it.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::common::shard::Shard>,

    /// Credentials for the vector engine, USER:PASSWORD; never stored (also
    /// CLIPDEX_MILVUS_TOKEN, which every command reads).
    #[arg(long, env = "CLIPDEX_MILVUS_TOKEN", hide_env_values = true)]
    pub vectors_token: Option<String>,

    /// Print the run's summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReindexArgs {
    /// The index folder.
    #[arg(long, default_value = DEFAULT_INDEX, env = "CLIPDEX_INDEX")]
    pub index: PathBuf,

    /// Switch the index to another model (folder or hub id): every photo is
    /// embedded again into a new generation built beside the index
    /// (`INDEX.next`), which then replaces it in one atomic step. A server
    /// holding the index keeps answering from the old one meanwhile; the new
    /// one takes over when the index is next opened.
    #[arg(long, short = 'm')]
    pub model: Option<String>,

    /// Switch the index to another precision, exact (f32), fast (bf16) or
    /// int8:
    /// every photo is embedded again, as with --model.
    #[arg(long, value_name = "exact|fast|int8")]
    pub precision: Option<Precision>,

    /// Never use the network for the model (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub tags: TagArgs,

    /// Print the run's summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReplicaArgs {
    /// The replica's folder (made by the first run).
    #[arg(long, default_value = DEFAULT_INDEX, env = "CLIPDEX_INDEX")]
    pub index: PathBuf,

    /// The collection to serve, milvus://HOST:PORT/COLLECTION (needed to
    /// make the replica; it records it).
    #[arg(long, value_name = "milvus://HOST:PORT/COLLECTION")]
    pub of: Option<String>,

    /// Where this machine sees the library the collection's writers
    /// indexed: originals and thumbnails are read there (needed to make
    /// the replica).
    #[arg(long)]
    pub library: Option<PathBuf>,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Read every record again, not only those written since the last sync.
    #[arg(long)]
    pub full: bool,

    /// Credentials for the vector engine, USER:PASSWORD; never stored.
    #[arg(long, env = "CLIPDEX_MILVUS_TOKEN", hide_env_values = true)]
    pub vectors_token: Option<String>,

    /// Print what the sync did as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The index folder.
    #[arg(long, default_value = DEFAULT_INDEX, env = "CLIPDEX_INDEX")]
    pub index: PathBuf,

    /// Print JSON.
    #[arg(long)]
    pub json: bool,

    /// Also check that the store, vector index and keyword index hold exactly the same photos.
    #[arg(long)]
    pub check: bool,
}

/// How to pick and fetch a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A checkpoint folder in Hugging Face layout, or a hub id
    /// (owner/name[@revision]). Default: when an index is continued, the
    /// model it was made with; otherwise openai/clip-vit-base-patch32.
    #[arg(long, short = 'm', env = "CLIPDEX_MODEL")]
    pub model: Option<String>,

    /// Never use the network: read hub models from the local cache only (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,

    /// How the model computes: exact (f32, the reference's numbers), fast
    /// (the encoders' dense layers in bf16, on AMX, AVX512-BF16 or AVX2 where the CPU has it) or
    /// int8 (those layers in int8 on AMX-INT8 or AVX512-VNNI: faster still, a little
    /// further from exact).
    /// An index keeps the precision its vectors were made with; a new one is
    /// made fast where the CPU has AMX or AVX512-BF16, or AVX2 without AVX-512;
    /// exact elsewhere. `embed` computes
    /// exact unless told.
    #[arg(long, value_name = "exact|fast|int8", env = "CLIPDEX_PRECISION")]
    pub precision: Option<Precision>,
}

impl ModelArgs {
    /// The model asked for, or the default one.
    pub fn source(&self) -> Result<ModelSource> {
        Ok(ModelSource::parse(
            self.model.as_deref().unwrap_or(DEFAULT_MODEL),
        )?)
    }

    /// Loads `source` (from [`Self::source`], or the index's own model)
    /// at `precision`.
    pub fn load(&self, source: &ModelSource, precision: Precision) -> Result<crate::model::Clip> {
        self.load_towers(source, precision, Towers::Both)
    }

    /// [`Self::load`], the image tower loaded when `towers` says.
    pub fn load_towers(
        &self,
        source: &ModelSource,
        precision: Precision,
        towers: Towers,
    ) -> Result<crate::model::Clip> {
        load_model_towers(source, self.offline, precision, towers)
    }
}

/// Loads `source` at `precision`, showing a hub download's progress; from
/// the hub's cache only when `offline`.
pub(crate) fn load_model(
    source: &ModelSource,
    offline: bool,
    precision: Precision,
) -> Result<crate::model::Clip> {
    load_model_towers(source, offline, precision, Towers::Both)
}

/// [`load_model`], the image tower loaded when `towers` says.
fn load_model_towers(
    source: &ModelSource,
    offline: bool,
    precision: Precision,
    towers: Towers,
) -> Result<crate::model::Clip> {
    use anyhow::Context;
    let hub = HubOptions::from_env(offline, true);
    crate::model::Clip::load_towers(source, &hub, precision, towers)
        .with_context(|| format!("cannot load model {source}"))
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// A text to embed (repeatable).
    #[arg(long = "text", short = 't', value_name = "TEXT")]
    pub texts: Vec<String>,

    /// An image file to embed (repeatable).
    #[arg(long = "image", short = 'i', value_name = "PATH")]
    pub images: Vec<PathBuf>,

    /// Print one JSON document: model, text and image embeddings, similarities.
    #[arg(long)]
    pub json: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed(args) => embed::run(&args),
        Command::Index(args) => index::index(&args),
        Command::Reindex(args) => index::reindex(&args),
        Command::Status(args) => index::status(&args),
        Command::Replica(args) => index::replica(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Search(args) => search::search(&args),
        Command::Similar(args) => search::similar(&args),
        Command::Duplicates(args) => search::duplicates(&args),
        Command::Retag(args) => index::retag(&args),
        Command::Tags(args) => search::tags(&args),
        Command::Train(args) => train::train(&args),
        Command::Eval(args) => train::eval(&args),
        Command::Models(args) => models::run(&args),
    }
}
