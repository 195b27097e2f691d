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
    /// How the vectors were computed (indexes from before `--precision`
    /// are exact).
    #[serde(default)]
    pub precision: Precision,
}

/// How a model's towers compute (`--precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout: the reference implementation's numbers.
    #[default]
    Exact,
    /// The encoders' dense layers in bf16 (on AMX or AVX512-BF16 where the
    /// CPU has them), sums in f32; embeddings within a cosine of 0.995 of
    /// exact ones.
    Fast,
    /// The encoders' dense layers in int8 on AMX-INT8 or AVX512-VNNI
    /// (weights per output channel, activations per token), bf16 where the
    /// CPU lacks them: faster than `fast`, and further from exact.
    Int8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast",
            Precision::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exact" => Ok(Precision::Exact),
            "fast" => Ok(Precision::Fast),
            "int8" => Ok(Precision::Int8),
            other => Err(format!("unknown precision {other:?}: exact, fast or int8")),
        }
    }
}

fn clip_family() -> String {
    "clip".into()
}
