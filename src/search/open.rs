//! Opening an engine: an index on disk and the model it was built with (or
//! the one named for a new index), as `clipdex serve` and `clipdex search`
//! need them. Waits while another process holds the index, if asked to.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Engine;
use crate::indexer::{self, Holder, Index, IndexPaths};
use crate::model::{Clip, DEFAULT_MODEL, ModelSource, Precision};
pub use crate::model::{HubOptions, Towers};

/// Where an engine comes from.
#[derive(Clone, Debug)]
pub struct OpenOptions<'a> {
    pub index: &'a Path,
    /// The library of a new index (an existing one must match).
    pub library: Option<&'a Path>,
    /// The model of a new index; an existing one uses its own.
    pub model: Option<&'a str>,
    /// The model's precision; an existing index uses its own, and refuses
    /// another.
    pub precision: Option<Precision>,
    pub hub: &'a HubOptions,
    /// When the model's image tower loads: a server's at once, a one-off
    /// text query's only if an image is embedded after all.
    pub towers: Towers,
    /// While another process holds the index: `Some(stop)` waits (until
    /// `stop` is set), `None` fails at once with `InUse`.
    pub wait: Option<&'a AtomicBool>,
}

/// What opening is doing, for a front end to show.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    ReadingIndex,
    LoadingModel(String),
    OpeningIndex,
    /// Another process holds the index; retrying every few seconds.
    WaitingFor(Holder),
}

/// Why an engine could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "no index yet: index a library first (`clipdex serve --library <PHOTOS>` or `clipdex index <PHOTOS>`)"
    )]
    NoIndex,
    #[error("the index's model {id} cannot be loaded: {source}")]
    Model {
        id: String,
        source: crate::model::Error,
    },
    #[error(transparent)]
    Index(#[from] indexer::Error),
    #[error("stopped while waiting for the index")]
    Stopped,
}

impl OpenError {
    /// The error in words fit for a client of a server: no paths, no chains.
    pub fn public_message(&self) -> String {
        match self {
            OpenError::NoIndex | OpenError::Stopped => self.to_string(),
            OpenError::Model { id, .. } => {
                format!("the model {id} cannot be loaded; see the server log")
            }
            OpenError::Index(indexer::Error::InUse { holder, .. }) => {
                format!("another clipdex process holds the index ({holder})")
            }
            OpenError::Index(indexer::Error::ModelMismatch {
                index_model,
                asked_model,
                ..
            }) => {
                format!("the index was built with model {index_model}, not {asked_model}")
            }
            OpenError::Index(indexer::Error::PrecisionMismatch {
                index_precision,
                asked_precision,
                ..
            }) => format!(
                "the index holds {index_precision}-precision embeddings, not {asked_precision}"
            ),
            OpenError::Index(indexer::Error::LibraryMismatch { .. }) => {
                "the index belongs to another library".into()
            }
            OpenError::Index(_) => "the index cannot be opened; see the server log".into(),
        }
    }
}

/// How often opening tries again for an index another process holds.
const LOCK_RETRY: Duration = Duration::from_secs(2);

/// Runs `open` until the index is free (or fails at once without `wait`).
fn unlocked<T>(
    wait: Option<&AtomicBool>,
    on_step: &mut dyn FnMut(Step),
    mut open: impl FnMut() -> indexer::Result<T>,
) -> Result<T, OpenError> {
    loop {
        match (open(), wait) {
            (Err(indexer::Error::InUse { holder, .. }), Some(stop)) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(OpenError::Stopped);
                }
                on_step(Step::WaitingFor(holder));
                std::thread::sleep(LOCK_RETRY);
            }
            (Err(indexer::Error::NotFound(_)), _) => return Err(OpenError::NoIndex),
            (other, _) => return Ok(other?),
        }
    }
}

/// Opens (or, with a library, creates) the index and loads its model.
pub fn open(opts: &OpenOptions, on_step: &mut dyn FnMut(Step)) -> Result<Engine, OpenError> {
    // The model named, else the index's own, else the default for a new
    // index; the precision asked, else the index's, else the default.
    let built = match IndexPaths::new(opts.index).exists() {
        true => {
            on_step(Step::ReadingIndex);
            Some(unlocked(opts.wait, on_step, || Index::read_meta(opts.index))?.model)
        }
        false => None,
    };
    let precision = opts
        .precision
        .or(built.as_ref().map(|b| b.precision))
        .unwrap_or_else(crate::model::default_precision);
    let model_id = match (opts.model, built) {
        (Some(m), _) => m.to_string(),
        (None, Some(built)) => built.id,
        (None, None) if opts.library.is_some() => DEFAULT_MODEL.to_string(),
        (None, None) => return Err(OpenError::NoIndex),
    };
    on_step(Step::LoadingModel(model_id.clone()));
    let model_error = |source| OpenError::Model {
        id: model_id.clone(),
        source,
    };
    let source = ModelSource::parse(&model_id).map_err(model_error)?;
    let clip = Clip::load_towers(&source, opts.hub, precision, opts.towers).map_err(model_error)?;
    on_step(Step::OpeningIndex);
    let index = unlocked(opts.wait, on_step, || match opts.library {
        Some(library) => Index::create_or_open(opts.index, library, clip.info()),
        None => Index::open(opts.index),
    })?;
    Ok(Engine::new(Arc::new(index), Arc::new(clip))?)
}
