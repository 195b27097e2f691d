//! Small types and helpers that every layer may use, and that belong to
//! none of them: an RGB view and Pillow's resampler (model preprocessing,
//! thumbnails, training crops), a file's signature, content hash and
//! caption source (library and store), dates (metadata, filters, the keyword index),
//! crash-safe file writes, a seeded random source, a model's identity
//! (model and store), and the shards a library is split into (indexer and
//! vector engine). Nothing here knows about models, indexes or HTTP.

pub mod file;
pub mod fs;
pub mod hash;
pub mod model_id;
pub mod pixels;
pub mod rel_path;
pub mod rng;
pub mod shard;
pub mod time;

pub use file::{CaptionSource, FileSig};
pub use hash::ContentHash;
pub use model_id::{ModelInfo, Precision};
pub use pixels::{Resample, RgbView, resample};

/// The message a panic carried (`panic!` with a literal or a formatted
/// string), for reporting a caught panic as an error.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
