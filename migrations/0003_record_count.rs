//! Format 3: the number of photo records, `m:count` -> u64 little-endian,
//! kept by every commit in the same batch as the records, so that counting
//! a million photos (`clipdex status`, `/api/status`) reads one key instead
//! of every record. Counted here from the records of a format-2 index.

/// The format this migration produces.
pub const VERSION: u32 = 3;

pub fn up(tree: &sled::Tree) -> sled::Result<()> {
    let mut count = 0u64;
    for key in tree.scan_prefix(b"p:").keys() {
        key?;
        count += 1;
    }
    tree.insert(crate::store::COUNT_KEY, &count.to_le_bytes())?;
    Ok(())
}
