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
    /// Packs that live inside another object (a small commit's pack inside its generation
    /// record, docs/decisions/one-request-a-commit.md), by that object's key; the others are
    /// at `pack_key(name)`. Format version 3 on; empty in older index objects.
    pub homes: Vec<(Hash, String)>,
}

/// What index objects of format version 2 and older hold.
#[derive(Deserialize)]
struct IndexFileV2 {
    packs: Vec<(Hash, Vec<PackEntry>)>,
}

/// The format version of index objects this owfs writes (other kinds write
/// `codec::FORMAT_VERSION`).
pub const INDEX_VERSION: u8 = 3;

/// Largest decompressed body of an index object of `stored` bytes: 16 times its size plus
/// 1 MiB. An index body is mostly BLAKE3 hashes (32 of the 36 to 49 bytes of an entry), which
/// do not compress, so a real one expands less than 2 times; anything beyond this bound is a
/// decompression bomb or damage, refused after allocating at most the bound.
pub fn max_body_len(stored: usize) -> usize {
    stored.saturating_mul(16).saturating_add(1 << 20)
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        let body = codec::encode_version(ObjKind::Index, INDEX_VERSION, self);
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
        match codec::check_header(ObjKind::Index, &body, INDEX_VERSION, what)? {
            INDEX_VERSION => codec::decode_body(&body, what),
            _ => codec::decode_body::<IndexFileV2>(&body, what).map(|f| IndexFile {
                packs: f.packs,
                homes: Vec::new(),
            }),
        }
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
    /// Where packs that are not at `pack_key(name)` live, by pack id.
    homes: HashMap<u32, String>,
    /// Packs some index object names (merged, or written by this process): the others are
    /// known only from memory (a commit's, or read from a generation record).
    named: std::collections::HashSet<u32>,
    /// Index objects already merged in.
    pub files: Vec<String>,
}

impl Index {
    pub fn add_pack(&mut self, name: Hash, entries: &[PackEntry]) {
        self.add_pack_at(name, entries, None);
    }

    /// `add_pack` for a pack that lives inside the object `home` (None: at its own key).
    /// A home learnt before stays unless a new one is given.
    pub fn add_pack_at(&mut self, name: Hash, entries: &[PackEntry], home: Option<&str>) {
        let id = *self.pack_ids.entry(name).or_insert_with(|| {
            self.packs.push(name);
            (self.packs.len() - 1) as u32
        });
        if let Some(h) = home {
            self.homes.insert(id, h.to_string());
        }
        for e in entries {
            self.blobs.entry(e.hash).or_insert(Loc {
                pack: id,
                entry: *e,
            });
        }
    }

    /// Adds `packs`; those `homes` names live inside that object.
    pub fn add_packs(&mut self, packs: &[(Hash, Vec<PackEntry>)], homes: &[(Hash, String)]) {
        let home_of: HashMap<&Hash, &str> = homes.iter().map(|(n, h)| (n, h.as_str())).collect();
        for (name, entries) in packs {
            self.add_pack_at(*name, entries, home_of.get(name).copied());
        }
    }

    pub fn merge(&mut self, file: &IndexFile) {
        self.add_packs(&file.packs, &file.homes);
        for (name, _) in &file.packs {
            self.note_named(name);
        }
    }

    /// Whether any blob of `pack` is known (from an index object or from memory).
    pub fn has_pack(&self, pack: &Hash) -> bool {
        self.pack_ids.contains_key(pack)
    }

    /// Records that an index object names `pack`.
    pub fn note_named(&mut self, pack: &Hash) {
        if let Some(&id) = self.pack_ids.get(pack) {
            self.named.insert(id);
        }
    }

    /// Whether an index object names `pack`.
    pub fn is_named(&self, pack: &Hash) -> bool {
        self.pack_ids
            .get(pack)
            .is_some_and(|id| self.named.contains(id))
    }

    /// The object `pack` lives in, when not at its own key.
    pub fn home(&self, pack: &Hash) -> Option<&str> {
        self.pack_ids
            .get(pack)
            .and_then(|id| self.homes.get(id))
            .map(|s| s.as_str())
    }

    /// Every pack that lives inside another object, with that object's key.
    pub fn homed(&self) -> Vec<(Hash, String)> {
        self.homes
            .iter()
            .map(|(&id, home)| (self.packs[id as usize], home.clone()))
            .collect()
    }

    /// Forgets `pack`'s home: it is at its own key now (gc copied it there).
    pub fn clear_home(&mut self, pack: &Hash) {
        if let Some(id) = self.pack_ids.get(pack) {
            self.homes.remove(id);
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
