//! What identifies a model, as an index stores it.

use serde::{Deserialize, Serialize};

/// What identifies a model: stored with an index so that a query embedded by
/// another model is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Hub id or canonical folder path.
    pub id: String,
    /// Hash of the architecture, preprocessing and a sample of the weights.
    pub fingerprint: String,
    pub embedding_dim: usize,
    pub image_size: usize,
    pub context_length: usize,
    /// "clip" or "siglip" (indexes from before SigLIP are CLIP's).
    #[serde(default = "clip_family")]
    pub family: String,
}

fn clip_family() -> String {
    "clip".into()
}
