//! The index: where each blob lives (pack, offset, length). Index objects are immutable and
//! named by time (`index/<unix_ms>-<hash>`), so a reader can fetch only the new ones.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::codec::{self, ObjKind};
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::pack::{BlobKind, PackEntry};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct IndexFile {
    pub packs: Vec<(Hash, Vec<PackEntry>)>,
}

/// Largest decompressed body of an index object of `stored` bytes: 16 times its size plus
/// 1 MiB. An index body is mostly BLAKE3 hashes (32 of the 36 to 49 bytes of an entry), which
/// do not compress, so a real one expands less than 2 times; anything beyond this bound is a
/// decompression bomb or damage, refused after allocating at most the bound.
pub fn max_body_len(stored: usize) -> usize {
    stored.saturating_mul(16).saturating_add(1 << 20)
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        let body = codec::encode(ObjKind::Index, self);
        zstd::bulk::compress(&body, 3).expect("zstd compression of an in-memory buffer")
    }

    /// Decompresses into at most `max_body_len(bytes.len())` bytes, in one pass (no window
    /// buffer sized by the frame header).
    pub fn decode(bytes: &[u8], what: &str) -> Result<IndexFile> {
        let limit = max_body_len(bytes.len());
        let body = crate::pack::decompress(bytes, limit).map_err(|e| {
            Error::corrupt(format!(
                "{what}: does not decompress within {limit} bytes ({e}); truncated or damaged"
            ))
        })?;
        codec::decode(ObjKind::Index, &body, what)
    }

    pub fn key(&self, now_ms: u64, bytes: &[u8]) -> String {
        format!("index/{now_ms:016}-{}", &Hash::of(bytes).to_hex()[..16])
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Loc {
    pub pack: u32,
    pub entry: PackEntry,
}

/// All known blobs of a store, in memory.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<Hash>,
    pack_ids: HashMap<Hash, u32>,
    blobs: HashMap<Hash, Loc>,
    /// Index objects already merged in.
    pub files: Vec<String>,
}

impl Index {
    pub fn add_pack(&mut self, name: Hash, entries: &[PackEntry]) {
        let id = *self.pack_ids.entry(name).or_insert_with(|| {
            self.packs.push(name);
            (self.packs.len() - 1) as u32
        });
        for e in entries {
            self.blobs.entry(e.hash).or_insert(Loc {
                pack: id,
                entry: *e,
            });
        }
    }

    pub fn merge(&mut self, file: &IndexFile) {
        for (name, entries) in &file.packs {
            self.add_pack(*name, entries);
        }
    }

    pub fn get(&self, hash: &Hash) -> Option<(Hash, PackEntry)> {
        self.blobs
            .get(hash)
            .map(|l| (self.packs[l.pack as usize], l.entry))
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.blobs.contains_key(hash)
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    pub fn pack_names(&self) -> &[Hash] {
        &self.packs
    }

    /// Every blob, grouped by pack: what gc walks.
    pub fn by_pack(&self) -> HashMap<Hash, Vec<PackEntry>> {
        let mut out: HashMap<Hash, Vec<PackEntry>> = HashMap::new();
        for loc in self.blobs.values() {
            out.entry(self.packs[loc.pack as usize])
                .or_default()
                .push(loc.entry);
        }
        out
    }

    pub fn kind_of(&self, hash: &Hash) -> Option<BlobKind> {
        self.blobs.get(hash).map(|l| l.entry.kind)
    }
}
