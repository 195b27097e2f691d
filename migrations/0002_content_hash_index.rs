//! Format 2: a content-hash lookup, `h:<32-byte blake3><id big-endian>` ->
//! empty, built from the records of a format-1 index.

/// The format this migration produces.
pub const VERSION: u32 = 2;

pub fn up(tree: &sled::Tree) -> sled::Result<()> {
    let mut batch = sled::Batch::default();
    for kv in tree.scan_prefix(b"p:") {
        let (key, value) = kv?;
        let id = &key[2..];
        let record: serde_json::Value = match serde_json::from_slice(&value) {
            Ok(v) => v,
            // An unreadable record stays as it is; the store reports it when read.
            Err(_) => continue,
        };
        let Some(hash) = record
            .get("hash")
            .and_then(|h| h.as_str())
            .and_then(|h| h.parse::<crate::store::ContentHash>().ok())
        else {
            continue;
        };
        let mut k = b"h:".to_vec();
        k.extend_from_slice(hash.as_bytes());
        k.extend_from_slice(id);
        batch.insert(k, &[]);
    }
    tree.apply_batch(batch)
}
