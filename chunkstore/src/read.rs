//! Reading a generation without restoring it: path lookup, listing, and its files. This is
//! the one reader of a generation's files: the mount's lazy fetch, the read-only time-travel
//! mount, `owfs cat` and restore all go through it.
//!
//! A file opens as its chunk map (`FileMap`: each chunk and where it starts, checked against
//! the entry's size). A read at an offset fetches only the chunks covering the range, each
//! verified against its hash and length before any byte is returned. A hole's chunk (the zero
//! chunk, `Hash::is_zeros`; docs/decisions/sparse-holes.md) is never fetched: its hash says
//! what it holds. `Reader` adds a bounded in-memory cache of fetched chunks
//! (docs/decisions/one-generation-reader.md).
//!
//! It needs the store alone (`Repo`): no FUSE, no lease.

use std::io::Write;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::repo::Repo;
use crate::tree::{part_starts, ChunkRef, Content, Entry, Kind, Part, Tree};

/// Splits a workspace path (`/a/b`, `a/b`, `/`) into components; `.`, `..` and empty parts
/// are refused rather than interpreted.
pub fn components(path: &str) -> Result<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(Error::BadName {
            name: path.to_string(),
            reason: "paths inside a workspace are plain names from its root; no . or ..".into(),
        });
    }
    Ok(parts)
}

/// The tree of the directory at `path`, or the entry there if it is not a directory.
pub enum Found {
    Dir(Tree),
    Entry(Entry),
}

pub fn lookup(repo: &Arc<Repo>, root: Hash, path: &str, at: &str) -> Result<Found> {
    let mut tree = repo.read_tree(&root, "/")?;
    let parts = components(path)?;
    let mut walked = String::new();
    for (i, part) in parts.iter().enumerate() {
        walked.push('/');
        walked.push_str(part);
        let entry = tree
            .find(part.as_bytes())
            .cloned()
            .ok_or_else(|| Error::UnknownPath {
                at: at.to_string(),
                path: walked.clone(),
            })?;
        match (entry.kind, entry.subtree) {
            (Kind::Dir, Some(h)) => tree = repo.read_tree(&h, &walked)?,
            _ if i + 1 == parts.len() => return Ok(Found::Entry(entry)),
            _ => {
                return Err(Error::UnknownPath {
                    at: at.to_string(),
                    path: format!("{walked} (not a directory)"),
                })
            }
        }
    }
    Ok(Found::Dir(tree))
}

/// The full part list of a file's content (`parts::list`).
pub fn chunk_list(repo: &Repo, content: &Content, path: &str) -> Result<Vec<Part>> {
    crate::parts::list(repo, content, path)
}

/// A file of a generation as its chunk map: its chunks in order and the offset where each
/// starts. Loaded once per open file; the chunks add up to the entry's size, so every byte of
/// the file belongs to exactly one chunk.
#[derive(Debug)]
pub struct FileMap {
    chunks: Arc<Vec<Part>>,
    starts: Vec<u64>,
    size: u64,
}

/// One part of a file, at its place in the file.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    /// Offset of the part's first byte in the file.
    pub start: u64,
    pub part: Part,
}

impl Piece {
    /// Offset just past the part's last byte.
    pub fn end(&self) -> u64 {
        self.start + self.part.len()
    }

    /// Whether this is a hole's chunk: all zeros, known from its hash, never fetched.
    pub fn is_hole(&self) -> bool {
        matches!(self.part, Part::Chunk(c) if c.hash.is_zeros(c.len))
    }
}

impl FileMap {
    /// The chunk map of a file whose entry holds `content` and `size`; chunks that do not add
    /// up to `size` are damage, refused here rather than read as a short or padded file.
    pub fn load(repo: &Repo, content: &Content, size: u64, path: &str) -> Result<FileMap> {
        FileMap::from_parts(Arc::new(chunk_list(repo, content, path)?), size, path)
    }

    /// The map of a part list already in memory (a mount's last committed list of a file,
    /// shared, not copied), checked like `load`'s.
    pub fn from_parts(chunks: Arc<Vec<Part>>, size: u64, path: &str) -> Result<FileMap> {
        let (starts, total) = part_starts(&chunks);
        if total != size {
            return Err(Error::corrupt(format!(
                "{path:?}: chunks hold {total} bytes, the entry says {size}"
            )));
        }
        Ok(FileMap {
            chunks,
            starts,
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunks(&self) -> &[Part] {
        &self.chunks
    }

    /// Every chunk, in file order.
    pub fn pieces(&self) -> impl Iterator<Item = Piece> + '_ {
        self.covering(0, self.size)
    }

    /// The chunks holding bytes of `[start, end)`, in file order (none past the end).
    pub fn covering(&self, start: u64, end: u64) -> impl Iterator<Item = Piece> + '_ {
        let end = end.min(self.size);
        let first = if start < end {
            self.starts
                .partition_point(|s| *s <= start)
                .saturating_sub(1)
        } else {
            self.chunks.len()
        };
        (first..self.chunks.len())
            .take_while(move |&i| self.starts[i] < end)
            .map(|i| Piece {
                start: self.starts[i],
                part: self.chunks[i],
            })
    }
}

/// Checks fetched bytes of a chunk against its length in the file's chunk map (the blob's
/// hash was checked when it was opened): a map and blob that disagree are damage, never
/// bytes at wrong offsets.
pub fn check_chunk(c: &ChunkRef, raw: Vec<u8>, path: &str) -> Result<Vec<u8>> {
    check_len(c, raw.len(), path)?;
    Ok(raw)
}

fn check_len(c: &ChunkRef, len: usize, path: &str) -> Result<()> {
    if len != c.len as usize {
        return Err(Error::corrupt(format!(
            "content of {path:?}: chunk {} holds {len} bytes, its file says {}",
            c.hash.short(),
            c.len
        )));
    }
    Ok(())
}

/// The verified bytes of one part of the file `path`: inline, or from the store (or the
/// node's blob cache); `None` for a hole's chunk, which is not fetched.
pub fn fetch_chunk(repo: &Repo, piece: &Piece, path: &str) -> Result<Option<Vec<u8>>> {
    match piece.part {
        _ if piece.is_hole() => Ok(None),
        Part::Inline(i) => Ok(Some(i.bytes().to_vec())),
        Part::Chunk(c) => fetch_data(repo, &c, path).map(Some),
    }
}

/// How `fetch_pieces` groups chunks into requests: chunks of one pack less than 256 KiB apart
/// share a request of at most 8 MiB, four requests in flight.
const PIECES_PLAN: crate::fetch::FetchPlan = crate::fetch::FetchPlan {
    coalesce_gap: 256 << 10,
    max_range: 8 << 20,
    in_flight: 4,
};

/// The verified bytes of several parts of the file `path` at once (`None` for a hole), in
/// the order given. Chunks written side by side (a database's pages, each its own chunk) are
/// fetched in one range request per run instead of one each; the node's blob cache is asked
/// first.
pub fn fetch_pieces(repo: &Repo, pieces: &[Piece], path: &str) -> Result<Vec<Option<Vec<u8>>>> {
    let what = format!("content of {path:?}");
    let mut out: Vec<Option<Vec<u8>>> = vec![None; pieces.len()];
    let mut wanted: Vec<(usize, crate::pack::PackEntry, Hash)> = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        match p.part {
            _ if p.is_hole() => {}
            Part::Inline(b) => out[i] = Some(b.bytes().to_vec()),
            Part::Chunk(c) => match repo.cached_blob(&c.hash) {
                Some(raw) => out[i] = Some(check_chunk(&c, raw, path)?),
                None => {
                    let (pack, entry) = repo.locate(&c.hash, &what).map_err(|e| e.at_path(path))?;
                    wanted.push((i, entry, pack));
                }
            },
        }
    }
    let locs: Vec<(Hash, crate::pack::PackEntry)> =
        wanted.iter().map(|(_, e, pack)| (*pack, *e)).collect();
    crate::fetch::fetch_blobs(repo, &locs, PIECES_PLAN, |k, raw| {
        let i = wanted[k].0;
        let Part::Chunk(c) = pieces[i].part else {
            unreachable!("only chunks are fetched")
        };
        out[i] = Some(check_chunk(&c, raw.map_err(|e| e.at_path(path))?, path)?);
        Ok(())
    })?;
    Ok(out)
}

fn fetch_data(repo: &Repo, c: &ChunkRef, path: &str) -> Result<Vec<u8>> {
    let raw = repo
        .read_blob(&c.hash, &format!("content of {path:?}"))
        .map_err(|e| e.at_path(path))?;
    check_chunk(c, raw, path)
}

/// Streams a file's content to `out`, verifying every chunk (`owfs cat`).
pub fn write_file(repo: &Arc<Repo>, entry: &Entry, path: &str, out: &mut dyn Write) -> Result<u64> {
    let map = FileMap::load(repo, &entry.content, entry.size, path)?;
    let mut zeros = Vec::new();
    for p in map.pieces() {
        let written = match fetch_chunk(repo, &p, path)? {
            Some(data) => out.write_all(&data),
            None => {
                zeros.resize(p.part.len() as usize, 0);
                out.write_all(&zeros)
            }
        };
        written.map_err(|e| Error::io("<output>", e))?;
    }
    Ok(map.size())
}

/// Fetched chunks kept in memory, bounded by their total size.
type ChunkCache = quick_cache::sync::Cache<Hash, Arc<Vec<u8>>, ChunkWeight>;

/// A cached chunk weighs its length.
#[derive(Clone)]
struct ChunkWeight;

impl quick_cache::Weighter<Hash, Arc<Vec<u8>>> for ChunkWeight {
    fn weight(&self, _: &Hash, data: &Arc<Vec<u8>>) -> u64 {
        (data.len() as u64).max(1)
    }
}

/// Reads files of generations at any offset, keeping recently fetched chunks in memory: a
/// chunk read again (the kernel's page cache dropped it, a program reads a page at a time)
/// costs no store request. Two threads that want the same missing chunk fetch it once.
pub struct Reader {
    repo: Arc<Repo>,
    cache: Option<ChunkCache>,
}

impl Reader {
    /// A reader whose cache holds up to `cache_bytes` of chunks (0: no cache).
    pub fn new(repo: Arc<Repo>, cache_bytes: u64) -> Reader {
        let cache = (cache_bytes > 0).then(|| {
            // Each shard holds at least a few of the largest chunks this store makes, else a
            // large chunk would not fit in its shard and never be cached.
            let largest = repo.chunk_params().max.max(1) as u64;
            let avg = repo.chunk_params().avg.max(1) as u64;
            let shards = (cache_bytes / (4 * largest)).clamp(1, 16);
            let options = quick_cache::OptionsBuilder::new()
                .shards(1 << shards.ilog2())
                .estimated_items_capacity((cache_bytes / avg).max(1) as usize)
                .weight_capacity(cache_bytes)
                .build()
                .expect("chunk cache options");
            ChunkCache::with_options(options, ChunkWeight, Default::default(), Default::default())
        });
        Reader { repo, cache }
    }

    pub fn repo(&self) -> &Arc<Repo> {
        &self.repo
    }

    /// Opens a file of a generation from its entry's content and size.
    pub fn open(&self, content: &Content, size: u64, path: &str) -> Result<FileMap> {
        FileMap::load(&self.repo, content, size, path)
    }

    /// One chunk's verified bytes, from the cache or fetched (and then cached); `None` for a
    /// hole's chunk.
    pub fn chunk(&self, piece: &Piece, path: &str) -> Result<Option<Arc<Vec<u8>>>> {
        let c = match piece.part {
            _ if piece.is_hole() => return Ok(None),
            Part::Inline(i) => return Ok(Some(Arc::new(i.bytes().to_vec()))),
            Part::Chunk(c) => c,
        };
        let fetch = || fetch_data(&self.repo, &c, path).map(Arc::new);
        let data = match &self.cache {
            Some(cache) => cache.get_or_insert_with(&c.hash, fetch)?,
            None => fetch()?,
        };
        // A cached chunk was checked against the length of the map that fetched it; another
        // map may name the same hash with another length (a damaged tree).
        check_len(&c, data.len(), path)?;
        Ok(Some(data))
    }

    /// Reads the file's bytes at `offset` into `buf`, fetching only the chunks that cover
    /// them; returns how many were read (fewer than `buf.len()` only at the end of the
    /// file). Holes read as zeros. Any damaged or missing chunk fails the whole read.
    pub fn read_at(
        &self,
        file: &FileMap,
        offset: u64,
        buf: &mut [u8],
        path: &str,
    ) -> Result<usize> {
        let end = offset.saturating_add(buf.len() as u64).min(file.size());
        if offset >= end {
            return Ok(0);
        }
        for p in file.covering(offset, end) {
            let (from, to) = (p.start.max(offset), p.end().min(end));
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match self.chunk(&p, path)? {
                Some(data) => {
                    out.copy_from_slice(&data[(from - p.start) as usize..(to - p.start) as usize])
                }
                None => out.fill(0),
            }
        }
        Ok((end - offset) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(lens: &[u32]) -> FileMap {
        let chunks: Vec<Part> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| Part::chunk(Hash::of(&[i as u8]), len))
            .collect();
        let (starts, size) = part_starts(&chunks);
        FileMap {
            chunks: Arc::new(chunks),
            starts,
            size,
        }
    }

    fn starts(m: &FileMap, a: u64, b: u64) -> Vec<u64> {
        m.covering(a, b).map(|p| p.start).collect()
    }

    #[test]
    fn covering_yields_exactly_the_chunks_that_hold_the_range() {
        let m = map(&[10, 20, 30]);
        assert_eq!(starts(&m, 0, 60), [0, 10, 30]);
        assert_eq!(starts(&m, 0, 10), [0]);
        assert_eq!(starts(&m, 9, 11), [0, 10]);
        assert_eq!(starts(&m, 10, 30), [10]);
        assert_eq!(starts(&m, 29, 31), [10, 30]);
        assert_eq!(starts(&m, 59, 1000), [30]);
        assert!(starts(&m, 60, 70).is_empty());
        assert!(starts(&m, 5, 5).is_empty());
        assert!(starts(&map(&[]), 0, 10).is_empty());
    }

    #[test]
    fn a_hole_is_the_zero_chunk_of_a_power_of_two_length() {
        let hole = Piece {
            start: 0,
            part: Part::chunk(Hash::of_zeros(1 << 16), 1 << 16),
        };
        assert!(hole.is_hole());
        let data = Piece {
            part: Part::chunk(Hash::of(b"x"), 1 << 16),
            ..hole
        };
        assert!(!data.is_hole());
    }

    /// A store in a temporary directory holding `blobs` as data chunks.
    struct Env {
        _dir: tempfile::TempDir,
        _rt: tokio::runtime::Runtime,
        repo: Arc<Repo>,
    }

    fn env(blobs: &[&[u8]]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let (rt, repo) = crate::testdata::file_repo(dir.path());
        let mut w = crate::writer::BlobWriter::new(repo.clone()).unwrap();
        for b in blobs {
            w.add(Hash::of(b), crate::pack::BlobKind::Data, b.to_vec())
                .unwrap();
        }
        w.finish().unwrap();
        Env {
            _dir: dir,
            _rt: rt,
            repo,
        }
    }

    fn chunk(data: &[u8]) -> ChunkRef {
        ChunkRef {
            hash: Hash::of(data),
            len: data.len() as u32,
        }
    }

    fn gets(repo: &Repo) -> u64 {
        repo.store.counters().gets
    }

    #[test]
    fn read_at_gives_the_files_bytes_and_never_fetches_a_hole() {
        let (a, b) = (
            crate::testdata::noise(1000, 1),
            crate::testdata::noise(3000, 2),
        );
        let hole = vec![0u8; 1 << 16];
        // The hole's chunk is not in the store: reading it would fail.
        let e = env(&[&a, &b]);
        let content = Content::Chunks(vec![chunk(&a), chunk(&hole), chunk(&b)]);
        let want = [&a[..], &hole, &b].concat();
        let reader = Reader::new(e.repo.clone(), 0);
        let file = reader.open(&content, want.len() as u64, "f").unwrap();
        for (off, len) in [
            (0, want.len()),
            (0, 10),
            (990, 20),
            (5000, 100),
            (want.len() - 5, 5),
            (want.len() - 5, 100),
        ] {
            let mut buf = vec![0xAAu8; len];
            let n = reader.read_at(&file, off as u64, &mut buf, "f").unwrap();
            let end = (off + len).min(want.len());
            assert_eq!(n, end - off, "read at {off}");
            assert_eq!(buf[..n], want[off..end], "read at {off}");
        }
        let mut buf = [0u8; 4];
        assert_eq!(
            reader
                .read_at(&file, want.len() as u64, &mut buf, "f")
                .unwrap(),
            0
        );
        let before = gets(&e.repo);
        let mut buf = vec![1u8; 60_000];
        reader.read_at(&file, 2000, &mut buf, "f").unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        assert_eq!(gets(&e.repo), before, "a hole costs no request");
        let mut out = Vec::new();
        let entry = Entry {
            name: b"f".to_vec(),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: want.len() as u64,
            link: 0,
            ino: 0,
            ctime_ns: 0,
            rdev: 0,
            xattrs: Vec::new(),
            target: Vec::new(),
            subtree: None,
            content,
        };
        assert_eq!(
            write_file(&e.repo, &entry, "f", &mut out).unwrap(),
            want.len() as u64
        );
        assert_eq!(out, want);
    }

    #[test]
    fn the_cache_serves_a_chunk_read_again() {
        let a = crate::testdata::noise(5000, 3);
        let e = env(&[&a]);
        let content = Content::Chunks(vec![chunk(&a)]);
        for (cache, refetched) in [(0, true), (1 << 20, false)] {
            let reader = Reader::new(e.repo.clone(), cache);
            let file = reader.open(&content, 5000, "f").unwrap();
            let mut buf = vec![0u8; 100];
            reader.read_at(&file, 0, &mut buf, "f").unwrap();
            let before = gets(&e.repo);
            reader.read_at(&file, 4000, &mut buf, "f").unwrap();
            assert_eq!(buf, a[4000..4100]);
            assert_eq!(gets(&e.repo) > before, refetched, "cache of {cache} bytes");
        }
    }

    #[test]
    fn damage_fails_the_read_and_gives_no_bytes() {
        let a = crate::testdata::noise(5000, 4);
        let e = env(&[&a]);
        let reader = Reader::new(e.repo.clone(), 1 << 20);
        // Chunks that do not add up to the size.
        let content = Content::Chunks(vec![chunk(&a)]);
        assert!(reader.open(&content, 4999, "f").is_err());
        // A chunk map that says the blob is shorter than it is.
        let short = Content::Chunks(vec![ChunkRef {
            len: 4000,
            ..chunk(&a)
        }]);
        let file = reader.open(&short, 4000, "f").unwrap();
        let err = reader.read_at(&file, 0, &mut [0u8; 10], "f").unwrap_err();
        assert!(err.is_damage(), "{err}");
        // The same, once the right map has put the chunk in the cache.
        let right = reader.open(&content, 5000, "f").unwrap();
        let mut whole = vec![0u8; 5000];
        assert_eq!(reader.read_at(&right, 0, &mut whole, "f").unwrap(), 5000);
        assert_eq!(whole, a);
        let err = reader.read_at(&file, 0, &mut [0u8; 10], "f").unwrap_err();
        assert!(err.is_damage(), "{err}");
        let longer = Content::Chunks(vec![ChunkRef {
            len: 6000,
            ..chunk(&a)
        }]);
        let file = reader.open(&longer, 6000, "f").unwrap();
        let err = reader
            .read_at(&file, 5500, &mut [0u8; 10], "f")
            .unwrap_err();
        assert!(err.is_damage(), "{err}");
        // A chunk no pack holds: the error names it.
        let gone = crate::testdata::noise(100, 5);
        let missing = Content::Chunks(vec![chunk(&gone)]);
        let file = reader.open(&missing, 100, "f").unwrap();
        let err = reader.read_at(&file, 0, &mut [0u8; 10], "f").unwrap_err();
        assert!(err.to_string().contains(&Hash::of(&gone).short()), "{err}");
    }
}
