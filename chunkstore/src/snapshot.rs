//! Committing a plain directory as a tree: walk, chunk what changed, reuse what did not
//! (size, mtime, inode and ctime equal to the parent generation's entry), write trees
//! bottom-up. The mount's committer reuses the blob writer and the tree format.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chunker::Chunker;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::pack::BlobKind;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::tree::{ChunkRef, Content, Entry, Kind, Segment, SegmentRef, Tree};
use crate::writer::{BlobWriter, WriteStats};

/// Files with more chunks than this keep their chunk list in segments.
const SEGMENT_MIN_CHUNKS: usize = 512;
const SEGMENT_MAX_CHUNKS: usize = 4096;
/// The walk recurses once per directory level; give it room for deep trees.
const WALK_STACK_BYTES: usize = 256 << 20;

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub others: u64,
    pub bytes: u64,
    /// Files whose content was read (not reused from the parent).
    pub files_read: u64,
    pub bytes_read: u64,
    /// Sockets are not stored.
    pub skipped: u64,
}

#[derive(Debug, Clone)]
pub struct SnapshotResult {
    pub root: Hash,
    pub tree: TreeStats,
    pub write: WriteStats,
    /// Blobs the new trees refer to that were already stored (what gc safety checks).
    pub reused: std::collections::HashSet<Hash>,
}

struct Walker<'a> {
    repo: &'a Arc<Repo>,
    writer: BlobWriter,
    stats: TreeStats,
    /// (dev, ino) of hard-linked files already seen → their content.
    links: HashMap<(u64, u64), Content>,
    progress: &'a Progress,
    chunker: Chunker,
}

/// Commits `dir` (its contents; the directory's own metadata becomes the root's). With
/// `parent`, files unchanged since that tree are not read again.
pub fn snapshot_dir(
    repo: &Arc<Repo>,
    dir: &Path,
    parent: Option<Hash>,
    progress: &Progress,
) -> Result<SnapshotResult> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::io(dir, std::io::Error::other("not a directory")));
    }
    let writer = BlobWriter::new(repo.clone())?;
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("owfs-walk".into())
            .stack_size(WALK_STACK_BYTES)
            .spawn_scoped(s, || {
                let mut w = Walker {
                    repo,
                    writer,
                    stats: TreeStats::default(),
                    links: HashMap::new(),
                    progress,
                    chunker: Chunker::new(repo.chunk_params()),
                };
                let parent_tree = match parent {
                    Some(h) => Some(repo.read_tree(&h, "/")?),
                    None => None,
                };
                let root = w.walk(dir, "", parent_tree.as_ref())?;
                w.stats.dirs += 1;
                let stats = w.stats;
                let reused = std::mem::take(&mut w.writer.reused);
                let write = w.writer.finish()?;
                Ok(SnapshotResult {
                    root,
                    tree: stats,
                    write,
                    reused,
                })
            })
            .expect("spawning the walker")
            .join()
            .unwrap_or_else(|_| Err(Error::corrupt("the walker panicked")))
    })
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

fn ctime_ns(m: &std::fs::Metadata) -> i64 {
    m.ctime() * 1_000_000_000 + m.ctime_nsec()
}

/// `user.*` extended attributes (the namespace a workload owns), sorted.
pub fn read_user_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(path, &mut names) {
        Ok(n) => n,
        Err(rustix::io::Errno::RANGE) => {
            names = vec![0u8; 65536];
            rustix::fs::llistxattr(path, &mut names).unwrap_or(0)
        }
        Err(_) => 0,
    };
    let mut out = Vec::new();
    for name in names[..n]
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let cname = OsStr::from_bytes(name);
        let mut val = vec![0u8; 65536];
        if let Ok(len) = rustix::fs::lgetxattr(path, cname, &mut val) {
            val.truncate(len);
            out.push((name.to_vec(), val));
        }
    }
    out.sort();
    out
}

impl Walker<'_> {
    fn walk(&mut self, dir: &Path, rel: &str, parent: Option<&Tree>) -> Result<Hash> {
        let mut names: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(dir, e))?;
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(OsStr::from_bytes(&name));
            let rel_child = format!("{rel}/{}", String::from_utf8_lossy(&name));
            let prev = parent.and_then(|t| t.find(&name));
            if let Some(e) = self.entry(&path, &rel_child, name, prev)? {
                entries.push(e);
            }
        }
        let tree = Tree { entries };
        let bytes = tree.encode();
        let hash = Hash::of(&bytes);
        self.writer.add(hash, BlobKind::Tree, bytes)?;
        Ok(hash)
    }

    fn entry(
        &mut self,
        path: &PathBuf,
        rel: &str,
        name: Vec<u8>,
        prev: Option<&Entry>,
    ) -> Result<Option<Entry>> {
        let m = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            // Vanished between listing and stat: it is not part of this cut.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let ft = m.file_type();
        let mut e = Entry {
            name,
            kind: Kind::File,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns: mtime_ns(&m),
            size: 0,
            link: 0,
            ino: m.ino(),
            ctime_ns: ctime_ns(&m),
            rdev: 0,
            xattrs: read_user_xattrs(path),
            target: Vec::new(),
            subtree: None,
            content: Content::Empty,
        };
        if ft.is_dir() {
            e.kind = Kind::Dir;
            let prev_tree = match prev {
                Some(p) if p.kind == Kind::Dir => match p.subtree {
                    Some(h) => Some(self.repo.read_tree(&h, rel)?),
                    None => None,
                },
                _ => None,
            };
            e.subtree = Some(self.walk(path, rel, prev_tree.as_ref())?);
            self.stats.dirs += 1;
        } else if ft.is_symlink() {
            e.kind = Kind::Symlink;
            e.target = std::fs::read_link(path)
                .map_err(|err| Error::io(path, err))?
                .as_os_str()
                .as_bytes()
                .to_vec();
            e.size = e.target.len() as u64;
            self.stats.symlinks += 1;
        } else if ft.is_file() {
            self.file(path, rel, &m, &mut e, prev)?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            e.kind = if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_char_device() {
                Kind::CharDev
            } else {
                Kind::BlockDev
            };
            e.rdev = m.rdev();
            self.stats.others += 1;
        } else {
            self.stats.skipped += 1;
            return Ok(None);
        }
        Ok(Some(e))
    }

    fn file(
        &mut self,
        path: &Path,
        rel: &str,
        m: &std::fs::Metadata,
        e: &mut Entry,
        prev: Option<&Entry>,
    ) -> Result<()> {
        self.stats.files += 1;
        if m.nlink() > 1 {
            e.link = m.ino();
            if let Some(content) = self.links.get(&(m.dev(), m.ino())) {
                e.content = content.clone();
                e.size = m.size();
                self.stats.bytes += e.size;
                return Ok(());
            }
        }
        let unchanged = prev.filter(|p| {
            p.kind == Kind::File
                && p.size == m.size()
                && p.mtime_ns == e.mtime_ns
                && p.ino == e.ino
                && p.ctime_ns == e.ctime_ns
        });
        if let Some(p) = unchanged {
            e.content = p.content.clone();
            e.size = p.size;
            self.note_reused(&e.content);
        } else {
            let (content, size) = self.read_content(path, rel)?;
            e.content = content;
            e.size = size;
            self.stats.files_read += 1;
            self.stats.bytes_read += size;
        }
        self.stats.bytes += e.size;
        self.progress.add(1, e.size);
        if m.nlink() > 1 {
            self.links.insert((m.dev(), m.ino()), e.content.clone());
        }
        Ok(())
    }

    fn note_reused(&mut self, content: &Content) {
        match content {
            Content::Empty => {}
            Content::Chunks(cs) => cs.iter().for_each(|c| self.writer.note_reused(c.hash)),
            Content::Segments(ss) => ss.iter().for_each(|s| self.writer.note_reused(s.hash)),
        }
    }

    fn read_content(&mut self, path: &Path, rel: &str) -> Result<(Content, u64)> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let writer = &mut self.writer;
        let size = self
            .chunker
            .chunk(f, |data| -> Result<()> {
                let hash = Hash::of(data);
                chunks.push(ChunkRef {
                    hash,
                    len: data.len() as u32,
                });
                writer.add(hash, BlobKind::Data, data.to_vec())
            })
            .map_err(|e| match e {
                Error::Io { source, .. } => Error::io(path, source),
                other => other.at_path(rel),
            })?;
        Ok((encode_content(writer, chunks)?, size))
    }
}

/// A chunk list as stored in a tree entry: inline when short, else segmented by chunk hash.
pub fn encode_content(writer: &mut BlobWriter, chunks: Vec<ChunkRef>) -> Result<Content> {
    if chunks.is_empty() {
        return Ok(Content::Empty);
    }
    if chunks.len() <= SEGMENT_MIN_CHUNKS {
        return Ok(Content::Chunks(chunks));
    }
    let mut segs = Vec::new();
    let mut cur: Vec<ChunkRef> = Vec::new();
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let boundary = c.hash.0[31] == 0 && cur.len() >= 32;
        cur.push(c);
        if boundary || cur.len() >= SEGMENT_MAX_CHUNKS || i + 1 == n {
            let seg = Segment {
                chunks: std::mem::take(&mut cur),
            };
            let bytes_len: u64 = seg.chunks.iter().map(|c| c.len as u64).sum();
            let count = seg.chunks.len() as u32;
            let data = seg.encode();
            let hash = Hash::of(&data);
            writer.add(hash, BlobKind::Segment, data)?;
            segs.push(SegmentRef {
                hash,
                bytes: bytes_len,
                chunks: count,
            });
        }
    }
    Ok(Content::Segments(segs))
}
