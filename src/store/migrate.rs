//! Runs the numbered migrations of `migrations/` on an older index.

use super::{Error, Result};

#[path = "../../migrations/0002_content_hash_index.rs"]
mod m0002;
#[path = "../../migrations/0003_record_count.rs"]
mod m0003;

type Up = fn(&sled::Tree) -> sled::Result<()>;

/// Every migration in order: (version it produces, function).
const MIGRATIONS: &[(u32, Up)] = &[(m0002::VERSION, m0002::up), (m0003::VERSION, m0003::up)];

/// The newest format.
pub const LATEST: u32 = 3;

const _: () = assert!(MIGRATIONS[MIGRATIONS.len() - 1].0 == LATEST);

/// Brings a tree of format `from` to `LATEST`.
pub fn run(tree: &sled::Tree, from: u32) -> Result<()> {
    for &(version, up) in MIGRATIONS {
        if version > from {
            tracing::info!(version, "migrating index");
            up(tree).map_err(|e| Error::Migration {
                version,
                message: e.to_string(),
            })?;
        }
    }
    Ok(())
}
