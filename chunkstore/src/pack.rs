//! Packs: many blobs (chunks, trees, segments) in one immutable object, so that a commit of
//! 10,000 small files is a handful of PUTs. A pack ends with a trailer listing its blobs, so
//! the index can always be rebuilt from the packs alone.

use serde::{Deserialize, Serialize};

use crate::codec::{self, ObjKind};
use crate::error::{Error, Result};
use crate::hash::Hash;

const PACK_MAGIC: &[u8; 4] = b"OWPK";

/// Largest raw size of a data blob: FastCDC's largest maximum chunk size, 16 MiB
/// (`fastcdc::v2020::MAXIMUM_MAX`). Data blobs are chunks, and `repo::decode_config` refuses a
/// store whose `chunk_max` exceeds it (the default is 256 KiB). An entry claiming more is
/// refused before anything is fetched or allocated.
pub const MAX_DATA_BLOB: usize = fastcdc::v2020::MAXIMUM_MAX;

/// Largest raw size of a tree or segment blob: 1 GiB. A segment holds at most 4,096 chunk
/// references (about 150 KiB); a tree is one directory, about 100 bytes an entry, so this is
/// some ten million entries in one directory. An entry claiming more is refused before
/// anything is fetched or allocated (docs/decisions/hostile-store-contents.md).
pub const MAX_META_BLOB: usize = 1 << 30;

/// Largest raw size of a blob of `kind`: what decompressing it may allocate at most.
pub fn max_raw_len(kind: BlobKind) -> usize {
    match kind {
        BlobKind::Data => MAX_DATA_BLOB,
        BlobKind::Tree | BlobKind::Segment => MAX_META_BLOB,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlobKind {
    Data,
    Tree,
    Segment,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub hash: Hash,
    pub kind: BlobKind,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub compressed: bool,
}

pub fn pack_key(name: &Hash) -> String {
    let hex = name.to_hex();
    format!("packs/{}/{}", &hex[..2], hex)
}

/// Builds one pack in memory.
#[derive(Default)]
pub struct PackBuilder {
    pub data: Vec<u8>,
    pub entries: Vec<PackEntry>,
    pub raw_bytes: u64,
}

impl PackBuilder {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a blob already prepared by `compress` (so compression can run outside a lock).
    pub fn push(
        &mut self,
        hash: Hash,
        kind: BlobKind,
        stored: &[u8],
        raw_len: usize,
        compressed: bool,
    ) {
        let offset = self.data.len();
        assert!(offset < u32::MAX as usize / 2, "pack too large");
        self.data.extend_from_slice(stored);
        self.entries.push(PackEntry {
            hash,
            kind,
            offset: offset as u32,
            stored_len: stored.len() as u32,
            raw_len: raw_len as u32,
            compressed,
        });
        self.raw_bytes += raw_len as u64;
    }

    /// Moves every blob of `other` to the end of this pack.
    pub fn append(&mut self, other: PackBuilder) {
        for e in &other.entries {
            let at = e.offset as usize;
            self.push(
                e.hash,
                e.kind,
                &other.data[at..at + e.stored_len as usize],
                e.raw_len as usize,
                e.compressed,
            );
        }
    }

    /// Seals the pack: appends the trailer and returns (name, bytes, entries).
    pub fn finish(self) -> (Hash, Vec<u8>, Vec<PackEntry>) {
        let (data, entries) = self.finish_at(0);
        (Hash::of(&data), data, entries)
    }

    /// Seals the pack for storing after `base` bytes of another object (a generation
    /// record's JSON, docs/decisions/one-request-a-commit.md): offsets in the trailer and the
    /// entries count from the start of that object, so the object as a whole reads as a
    /// pack. Returns the bytes to append and the entries.
    pub fn finish_at(mut self, base: usize) -> (Vec<u8>, Vec<PackEntry>) {
        assert!(
            base + self.data.len() < u32::MAX as usize / 2,
            "pack too large"
        );
        for e in &mut self.entries {
            e.offset += base as u32;
        }
        let trailer = codec::encode(ObjKind::PackTrailer, &self.entries);
        self.data.extend_from_slice(&trailer);
        self.data
            .extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        self.data.extend_from_slice(PACK_MAGIC);
        (self.data, self.entries)
    }
}

thread_local! {
    /// One zstd context per thread: creating one per blob cost ~10% of a small-file commit.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        f(&mut c.as_mut().expect("just set").1)
    })
}

/// Decompresses zstd frames into at most `capacity` bytes (an error beyond): the only
/// allocation is the output, of `capacity` or the size the frames declare if smaller.
pub(crate) fn decompress(stored: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("just set").decompress(stored, capacity)
    })
}

/// The stored form of a blob: zstd when that saves at least 1/16 of it, else the raw bytes.
pub fn compress(raw: &[u8], zstd_level: i32) -> (std::borrow::Cow<'_, [u8]>, bool) {
    if zstd_level > 0 && raw.len() >= 64 {
        if let Ok(c) = with_compressor(zstd_level, |z| z.compress(raw)) {
            if c.len() < raw.len() - raw.len() / 16 {
                return (std::borrow::Cow::Owned(c), true);
            }
        }
    }
    (std::borrow::Cow::Borrowed(raw), false)
}

/// Reads the trailer of a whole pack (used by gc to re-index a pack).
pub fn read_trailer(pack: &[u8], what: &str) -> Result<Vec<PackEntry>> {
    read_trailer_from_tail(pack, pack.len() as u64, what).map(|t| match t {
        Tail::Entries(e) => e,
        Tail::Needs(_) => unreachable!("the whole pack holds its trailer"),
    })
}

/// What the last bytes of a pack say.
pub enum Tail {
    Entries(Vec<PackEntry>),
    /// The trailer is longer than the bytes given: the last this many bytes hold it.
    Needs(u64),
}

/// The trailer from `tail`, the last bytes of a pack of `size` bytes (a range read that
/// need not fetch the pack).
pub fn read_trailer_from_tail(tail: &[u8], size: u64, what: &str) -> Result<Tail> {
    let n = tail.len();
    if n < 8 || &tail[n - 4..] != PACK_MAGIC || n as u64 > size {
        return Err(Error::corrupt(format!(
            "{what}: no pack trailer (truncated?)"
        )));
    }
    let tlen = u32::from_le_bytes(tail[n - 8..n - 4].try_into().expect("4 bytes")) as u64;
    if tlen > size - 8 {
        return Err(Error::corrupt(format!(
            "{what}: pack trailer length out of range"
        )));
    }
    if tlen + 8 > n as u64 {
        return Ok(Tail::Needs(tlen + 8));
    }
    let tlen = tlen as usize;
    let data_len = size - 8 - tlen as u64;
    let entries: Vec<PackEntry> =
        codec::decode(ObjKind::PackTrailer, &tail[n - 8 - tlen..n - 8], what)?;
    for e in &entries {
        check_entry(e, what)?;
        if e.offset as u64 + e.stored_len as u64 > data_len {
            return Err(Error::corrupt(format!(
                "{what}: blob {} lies outside the pack",
                e.hash.short()
            )));
        }
    }
    Ok(Tail::Entries(entries))
}

/// Refuses an entry (from an index or a trailer) claiming a blob larger than its kind may be
/// (`max_raw_len`), before anything is fetched or allocated for it.
pub fn check_entry(entry: &PackEntry, what: &str) -> Result<()> {
    let cap = max_raw_len(entry.kind);
    if entry.raw_len as usize > cap || entry.stored_len as usize > cap {
        return Err(Error::corrupt(format!(
            "{what}: blob {} claims {} bytes ({} stored), more than a {:?} blob may hold ({cap})",
            entry.hash.short(),
            entry.raw_len,
            entry.stored_len,
            entry.kind
        )));
    }
    Ok(())
}

/// Turns a stored blob back into its raw bytes and verifies it against its hash.
/// Decompression allocates at most the entry's `raw_len`, which `check_entry` bounds.
pub fn open_blob(entry: &PackEntry, stored: &[u8], what: &str) -> Result<Vec<u8>> {
    check_entry(entry, what)?;
    if stored.len() != entry.stored_len as usize {
        return Err(Error::corrupt(format!(
            "{what}: blob {} truncated",
            entry.hash.short()
        )));
    }
    let raw = if entry.compressed {
        decompress(stored, entry.raw_len as usize).map_err(|e| {
            Error::corrupt(format!(
                "{what}: blob {} does not decompress: {e}",
                entry.hash.short()
            ))
        })?
    } else {
        stored.to_vec()
    };
    if raw.len() != entry.raw_len as usize || Hash::of(&raw) != entry.hash {
        return Err(Error::corrupt(format!(
            "{what}: blob {} fails its hash check (stored data damaged)",
            entry.hash.short()
        )));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip_and_damage() {
        let mut b = PackBuilder::default();
        let a = vec![7u8; 10_000];
        let c = b"incompressible?".to_vec();
        for (raw, kind) in [(&a, BlobKind::Data), (&c, BlobKind::Tree)] {
            let (stored, compressed) = compress(raw, 3);
            b.push(Hash::of(raw), kind, &stored, raw.len(), compressed);
        }
        let (name, mut bytes, entries) = b.finish();
        assert_eq!(Hash::of(&bytes), name);
        assert_eq!(read_trailer(&bytes, "p").unwrap(), entries);
        assert!(entries[0].compressed);
        let e = entries[0];
        let stored = &bytes[e.offset as usize..(e.offset + e.stored_len) as usize];
        assert_eq!(open_blob(&e, stored, "p").unwrap(), a);
        bytes[e.offset as usize + 3] ^= 0x40;
        let stored = &bytes[e.offset as usize..(e.offset + e.stored_len) as usize];
        assert!(matches!(
            open_blob(&e, stored, "p"),
            Err(Error::Corrupt { .. })
        ));
    }
}
