//! clipdex: self-hosted semantic image search with CLIP.
//!
//! See `ARCHITECTURE.md` for a walk through the modules.

pub mod cli;
pub mod library;
pub mod model;
