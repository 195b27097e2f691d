//! One part of a library that several indexers split between them
//! (`clipdex index --shard I/N`): which files it takes, and the photo ids
//! it gives out, so that N processes write one collection at once without
//! two of them taking a file or an id.
//!
//! A file belongs to the shard its path hashes to (blake3 of the path as
//! the index keeps it, the same on every machine), so a file is in exactly
//! one shard whatever the order or the machine it is seen from. Shard `I`
//! numbers its photos from `I * 2^40 + 1`: ids say which shard made them.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Bits of a photo id that one shard counts in (a trillion photos each).
const SHARD_BITS: u32 = 40;
/// Most shards one library is split into: ids stay below 2^52, exact as
/// the page's JavaScript numbers (and far below Milvus's 2^63).
pub const MAX_SHARDS: u32 = 1 << 12;

/// Shard `index` of `count` (from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `I/N`: shard I (from 0) of N.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a shard: expected I/N, shard I (from 0) of N");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u32 = i.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || count > MAX_SHARDS {
            return Err(format!(
                "{s:?}: the number of shards must be 1 to {MAX_SHARDS}"
            ));
        }
        if index >= count {
            return Err(format!(
                "{s:?}: shards of {count} are numbered 0 to {}",
                count - 1
            ));
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// The whole library as one shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Whether the file at `rel` (a path as the index keeps it) is in this shard.
    pub fn owns(&self, rel: &str) -> bool {
        self.count <= 1 || shard_of(rel, self.count) == self.index
    }

    /// The ids this shard gives out. The whole library (one shard) has
    /// every id Milvus can hold.
    pub fn ids(&self) -> Range<u64> {
        if self.count <= 1 {
            return 0..i64::MAX as u64;
        }
        let start = u64::from(self.index) << SHARD_BITS;
        start..start + (1 << SHARD_BITS)
    }

    /// The first id of a new index of this shard.
    pub fn first_id(&self) -> u64 {
        self.ids().start.max(1)
    }
}

/// The shard of `count` the file at `rel` falls in.
pub fn shard_of(rel: &str, count: u32) -> u32 {
    let hash = blake3::hash(rel.as_bytes());
    let head = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
    (head % u64::from(count.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_refuse_what_is_not_one() {
        assert_eq!("1/4".parse::<Shard>(), Ok(Shard { index: 1, count: 4 }));
        assert_eq!("0/1".parse::<Shard>(), Ok(Shard::WHOLE));
        for bad in ["", "1", "4/4", "0/0", "-1/2", "a/2", "1/2/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert_eq!(Shard { index: 3, count: 8 }.to_string(), "3/8");
    }

    #[test]
    fn every_file_is_in_exactly_one_shard_and_ids_do_not_meet() {
        let paths: Vec<String> = (0..2000)
            .map(|i| format!("trip {}/img_{i}.jpg", i % 7))
            .collect();
        for count in [1u32, 2, 3, 16] {
            let shards: Vec<Shard> = (0..count).map(|index| Shard { index, count }).collect();
            let mut sizes = vec![0usize; count as usize];
            for p in &paths {
                let owners: Vec<&Shard> = shards.iter().filter(|s| s.owns(p)).collect();
                assert_eq!(owners.len(), 1, "{p} in {count} shards");
                sizes[owners[0].index as usize] += 1;
            }
            // A hash spreads the files evenly.
            let even = paths.len() / count as usize;
            assert!(sizes.iter().all(|&n| n > even * 3 / 4), "{sizes:?}");
            for pair in shards.windows(2) {
                assert_eq!(pair[0].ids().end, pair[1].ids().start);
                assert!(pair[0].ids().start < pair[0].ids().end);
            }
        }
        // The same path is in the same shard on every machine.
        assert_eq!(
            shard_of("trip 1/img_8.jpg", 16),
            shard_of("trip 1/img_8.jpg", 16)
        );
        let last = Shard {
            index: MAX_SHARDS - 1,
            count: MAX_SHARDS,
        };
        assert!(last.ids().end <= 1 << 52);
        assert_eq!(Shard::WHOLE.first_id(), 1);
        assert_eq!(Shard { index: 2, count: 3 }.first_id(), 2 << 40);
    }
}
