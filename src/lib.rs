//! clipdex: self-hosted semantic image search with CLIP.
//!
//! See `ARCHITECTURE.md` for a walk through the modules.

pub mod cli;
pub mod common;
pub mod eval;
pub mod indexer;
pub mod keyword;
pub mod library;
pub mod model;
pub mod search;
pub mod server;
pub mod store;
pub mod train;
pub mod vector;
