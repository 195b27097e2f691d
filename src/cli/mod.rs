//! The `clipdex` command line: parses flags, resolves them into settings, and
//! calls the library. Rendering (tables, JSON, progress) lives here; logic
//! does not.

mod embed;
mod index;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::model::{HubOptions, ModelSource, DEFAULT_MODEL};

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
    /// Embed texts and images with a CLIP model and print the vectors and their similarities.
    Embed(EmbedArgs),
    /// Index a photo library: embed every image into a new or existing index.
    Index(IndexArgs),
    /// Bring an index up to date with its library: new, changed, moved and deleted files.
    Reindex(ReindexArgs),
    /// Show an index: counts, model, library, size, last run, skipped files.
    Status(StatusArgs),
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

    /// Decode JPEGs at full size instead of reduced size in the DCT: slower,
    /// but pixel-exact with the reference preprocessing.
    #[arg(long)]
    pub exact_decode: bool,
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

    /// Print the run's summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReindexArgs {
    /// The index folder.
    #[arg(long, default_value = DEFAULT_INDEX, env = "CLIPDEX_INDEX")]
    pub index: PathBuf,

    /// Never use the network for the index's model (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,

    #[command(flatten)]
    pub run: RunArgs,

    /// Print the run's summary as JSON.
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
    /// A checkpoint folder in Hugging Face layout, or a hub id (owner/name[@revision]).
    #[arg(long, short = 'm', default_value = DEFAULT_MODEL, env = "CLIPDEX_MODEL")]
    pub model: String,

    /// Never use the network: read hub models from the local cache only (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

impl ModelArgs {
    pub fn source(&self) -> Result<ModelSource> {
        Ok(ModelSource::parse(&self.model)?)
    }

    pub fn hub(&self, progress: bool) -> HubOptions {
        HubOptions::from_env(self.offline, progress)
    }
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
    }
}
