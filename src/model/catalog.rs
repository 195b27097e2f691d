//! The checkpoints clipdex recommends, with what a user chooses by: family,
//! embedding size, languages, download size.
//!
//! Download sizes are the f32 `model.safetensors` of each repository (its
//! parameter count times four bytes), rounded.

use super::config::Family;

/// One recommended checkpoint.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Recommended {
    /// Hub id.
    pub id: &'static str,
    pub family: Family,
    /// Image tower and input size.
    pub architecture: &'static str,
    pub embedding_dim: usize,
    /// "en", or "multilingual".
    pub languages: &'static str,
    /// Approximate download, MB.
    pub download_mb: u32,
    /// Why one would pick it.
    pub note: &'static str,
}

/// Best first within each use: English photo search, then multilingual, then the largest.
pub const RECOMMENDED: &[Recommended] = &[
    Recommended {
        id: "google/siglip2-base-patch16-256",
        family: Family::Siglip,
        architecture: "ViT-B/16, 256 px",
        embedding_dim: 768,
        languages: "multilingual",
        download_mb: 1500,
        note: "best quality per cost; queries in many languages",
    },
    Recommended {
        id: "google/siglip2-base-patch32-256",
        family: Family::Siglip,
        architecture: "ViT-B/32, 256 px",
        embedding_dim: 768,
        languages: "multilingual",
        download_mb: 1500,
        note: "about 4x faster indexing than patch16, a little less exact",
    },
    Recommended {
        id: "google/siglip-base-patch16-224",
        family: Family::Siglip,
        architecture: "ViT-B/16, 224 px",
        embedding_dim: 768,
        languages: "en",
        download_mb: 810,
        note: "English SigLIP; smaller download",
    },
    Recommended {
        id: "google/siglip-base-patch16-256-multilingual",
        family: Family::Siglip,
        architecture: "ViT-B/16, 256 px",
        embedding_dim: 768,
        languages: "multilingual",
        download_mb: 1480,
        note: "SigLIP trained on multilingual WebLI",
    },
    Recommended {
        id: "openai/clip-vit-base-patch32",
        family: Family::Clip,
        architecture: "ViT-B/32, 224 px",
        embedding_dim: 512,
        languages: "en",
        download_mb: 605,
        note: "the default: fastest, the 2021 baseline",
    },
    Recommended {
        id: "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        family: Family::Clip,
        architecture: "ViT-B/32, 224 px",
        embedding_dim: 512,
        languages: "en",
        download_mb: 605,
        note: "the default's speed, trained on LAION-2B: better retrieval",
    },
    Recommended {
        id: "timm/resnet50_clip.openai",
        family: Family::Clip,
        architecture: "ResNet-50 (the paper's), 224 px",
        embedding_dim: 1024,
        languages: "en",
        download_mb: 410,
        note: "the paper's modified ResNet, in open_clip's layout",
    },
    Recommended {
        id: "openai/clip-vit-base-patch16",
        family: Family::Clip,
        architecture: "ViT-B/16, 224 px",
        embedding_dim: 512,
        languages: "en",
        download_mb: 600,
        note: "finer detail than patch32 at about 4x the indexing cost",
    },
    Recommended {
        id: "openai/clip-vit-large-patch14",
        family: Family::Clip,
        architecture: "ViT-L/14, 224 px",
        embedding_dim: 768,
        languages: "en",
        download_mb: 1710,
        note: "OpenAI's largest common CLIP; slow on a CPU",
    },
    Recommended {
        id: "google/siglip-so400m-patch14-384",
        family: Family::Siglip,
        architecture: "SoViT-400M/14, 384 px",
        embedding_dim: 1152,
        languages: "en",
        download_mb: 3510,
        note: "the strongest here; for a GPU-less machine only with patience",
    },
];
