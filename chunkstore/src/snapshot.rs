//! Committing a plain directory as a tree: walk, chunk what changed, reuse what did not
//! (size, mtime, inode and ctime equal to the parent generation's entry), write trees
//! bottom-up. The mount's committer reuses the blob writer and the tree format.
//!
//! The walk takes no stack and no path per level, so a tree of any depth Linux allows is
//! committed: it is iterative (one frame per directory on the way down, in a `Vec`), every
//! call is relative to the directory's descriptor (`statat`, `openat`, `readlinkat`), and at
//! most [`OPEN_DIRS`] directory descriptors are open at once (see [`DirChain`]). The helpers
//! of this walk are shared with `restore`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, CWD};

use crate::chunker::Chunker;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::layout::{self, Layout};
use crate::pack::BlobKind;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::tree::{Content, Entry, Kind, Part, Tree};
use crate::writer::{BlobWriter, WriteStats};

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

// ---------------------------------------------------------------------------------------
// Descriptor-relative walking, shared with `restore`

/// Directory descriptors a walk keeps open at most (besides its root's): the deepest ones.
pub(crate) const OPEN_DIRS: usize = 64;

/// The directories from a walk's root down to the one it is in, by descriptor. Only the
/// root's and the [`OPEN_DIRS`] deepest descriptors stay open, whatever the depth; a closed
/// one is reopened from its child with `..` when the walk goes back up to it, and must then
/// be the directory (device and inode) that was entered, or the walk stops: a directory was
/// moved under it.
pub(crate) struct DirChain {
    fds: Vec<Option<OwnedFd>>,
    ids: Vec<(u64, u64)>,
}

impl DirChain {
    pub(crate) fn new(root: OwnedFd) -> std::io::Result<DirChain> {
        let mut chain = DirChain {
            fds: Vec::new(),
            ids: Vec::new(),
        };
        chain.push(root)?;
        Ok(chain)
    }

    /// The directory the walk is in.
    pub(crate) fn current(&self) -> BorrowedFd<'_> {
        self.fds
            .last()
            .and_then(|f| f.as_ref())
            .expect("the current directory is open")
            .as_fd()
    }

    /// The directory at `depth` (0: the root), if its descriptor is open.
    pub(crate) fn at(&self, depth: usize) -> Option<BorrowedFd<'_>> {
        self.fds.get(depth)?.as_ref().map(|f| f.as_fd())
    }

    /// Enters `fd`, a subdirectory of the current directory.
    pub(crate) fn push(&mut self, fd: OwnedFd) -> std::io::Result<()> {
        let st = rustix::fs::fstat(&fd)?;
        self.ids.push(file_id(&st));
        self.fds.push(Some(fd));
        let n = self.fds.len();
        if n > OPEN_DIRS + 1 {
            self.fds[n - 1 - OPEN_DIRS] = None;
        }
        Ok(())
    }

    /// Leaves the current directory (not the root) for its parent, reopened if it was closed,
    /// and returns the left directory's descriptor.
    pub(crate) fn pop(&mut self) -> std::io::Result<OwnedFd> {
        assert!(self.fds.len() > 1, "the root is never left");
        let fd = self
            .fds
            .pop()
            .flatten()
            .expect("the current directory is open");
        self.ids.pop();
        let want = *self.ids.last().expect("the root stays");
        let slot = self.fds.last_mut().expect("the root stays");
        if slot.is_none() {
            let parent = rustix::fs::openat(
                &fd,
                "..",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| std::io::Error::other(format!("reopening its parent with ..: {e}")))?;
            if file_id(&rustix::fs::fstat(&parent)?) != want {
                return Err(std::io::Error::other(
                    "its parent directory was moved during the walk",
                ));
            }
            *slot = Some(parent);
        }
        Ok(fd)
    }
}

/// (device, inode).
#[allow(clippy::unnecessary_cast)]
pub(crate) fn file_id(st: &Stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// What the walks use of a `stat`, in fixed types.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub kind: FileType,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub dev: u64,
    pub ino: u64,
    pub rdev: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Meta {
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn of(st: &Stat) -> Meta {
        let (dev, ino) = file_id(st);
        Meta {
            kind: FileType::from_raw_mode(st.st_mode as _),
            mode: st.st_mode as u32 & 0o7777,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            nlink: st.st_nlink as u64,
            dev,
            ino,
            rdev: st.st_rdev as u64,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
        }
    }
}

/// `name` in `dir`, not following a symlink.
pub(crate) fn stat_at(dir: BorrowedFd, name: &[u8]) -> rustix::io::Result<Meta> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map(|st| Meta::of(&st))
}

/// Opens the directory at `path` (a walk's root, given by the user) for reading.
pub(crate) fn open_dir_path(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `name` of `dir` for reading; never through a symlink.
pub(crate) fn open_dir(dir: BorrowedFd, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The names in `dir` (without `.` and `..`), sorted.
pub(crate) fn list_dir(dir: BorrowedFd) -> std::io::Result<Vec<Vec<u8>>> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

/// Calls `f(dir, name, rel)` for every regular file below `root`, at any depth: iterative,
/// descriptor-relative, a bounded number of descriptors open (see [`DirChain`]). `rel` is the
/// file's path relative to `root`, starting with `/`. Symlinks are not followed.
pub fn for_each_file(
    root: &Path,
    mut f: impl FnMut(BorrowedFd, &[u8], &str) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut chain = DirChain::new(open_dir_path(root)?)?;
    // Per level: the names still to visit, and the length of `rel` before the level's name.
    let mut levels = vec![(list_dir(chain.current())?, 0usize)];
    let mut rel = String::new();
    while let Some((names, _)) = levels.last_mut() {
        let Some(name) = names.pop() else {
            let (_, len) = levels.pop().expect("a level");
            if !levels.is_empty() {
                chain.pop()?;
            }
            rel.truncate(len);
            continue;
        };
        let Ok(m) = stat_at(chain.current(), &name) else {
            continue; // gone meanwhile
        };
        let len = rel.len();
        rel.push('/');
        rel.push_str(&String::from_utf8_lossy(&name));
        if m.kind == FileType::Directory {
            chain.push(open_dir(chain.current(), &name)?)?;
            levels.push((list_dir(chain.current())?, len));
            continue;
        }
        if m.kind == FileType::RegularFile {
            f(chain.current(), &name, &rel)?;
        }
        rel.truncate(len);
    }
    Ok(())
}

/// A short path naming `name` in `dir` whatever the directory's depth, for the calls that
/// have no descriptor-relative form (xattrs of entries that cannot be opened: symlinks,
/// FIFOs, devices). Use it with the `l*` calls: the last component is not followed.
pub(crate) fn proc_path(dir: BorrowedFd, name: &[u8]) -> PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(OsString::from_vec(p))
}

/// The path of an entry relative to the walk's root, as bytes (`/a/b`): each level pushes
/// its name and truncates it back. Messages show it shortened when it is long.
#[derive(Default)]
pub(crate) struct RelPath {
    buf: Vec<u8>,
}

/// A shown path keeps this many bytes at each end.
const SHOWN_EDGE: usize = 200;

impl RelPath {
    /// Appends `/name`; returns the length to truncate back to.
    pub(crate) fn push(&mut self, name: &[u8]) -> usize {
        let len = self.buf.len();
        self.buf.push(b'/');
        self.buf.extend_from_slice(name);
        len
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        self.buf.truncate(len);
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// The path for messages ("" for the root): lossy UTF-8, and past 2 x [`SHOWN_EDGE`]
    /// bytes its first and last [`SHOWN_EDGE`] bytes around how many were left out (a path
    /// 10,000 levels deep would make a 20 KB message).
    pub(crate) fn show(&self) -> String {
        let b = &self.buf;
        if b.len() <= 2 * SHOWN_EDGE + 32 {
            return String::from_utf8_lossy(b).into_owned();
        }
        // Cut between characters (a UTF-8 continuation byte starts none).
        let cont = |i: usize| b[i] & 0xC0 == 0x80;
        let mut head = SHOWN_EDGE;
        while head > SHOWN_EDGE - 3 && cont(head) {
            head -= 1;
        }
        let mut tail = b.len() - SHOWN_EDGE;
        while tail < b.len() - SHOWN_EDGE + 3 && cont(tail) {
            tail += 1;
        }
        format!(
            "{}[… {} bytes …]{}",
            String::from_utf8_lossy(&b[..head]),
            tail - head,
            String::from_utf8_lossy(&b[tail..])
        )
    }
}

/// `root` joined with a shown relative path: what an I/O error names.
pub(crate) fn under(root: &Path, rel: &str) -> PathBuf {
    match rel.trim_start_matches('/') {
        "" => root.to_path_buf(),
        r => root.join(r),
    }
}

// ---------------------------------------------------------------------------------------
// Extended attributes

/// `user.*` extended attributes (the namespace a workload owns), sorted.
pub fn read_user_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    user_xattrs(
        |buf| rustix::fs::llistxattr(path, buf),
        |name, val| rustix::fs::lgetxattr(path, name, val),
    )
}

/// [`read_user_xattrs`] of an open file or directory.
pub(crate) fn read_user_xattrs_fd(fd: BorrowedFd) -> Vec<(Vec<u8>, Vec<u8>)> {
    user_xattrs(
        |buf| rustix::fs::flistxattr(fd, buf),
        |name, val| rustix::fs::fgetxattr(fd, name, val),
    )
}

fn user_xattrs(
    list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    get: impl Fn(&OsStr, &mut [u8]) -> rustix::io::Result<usize>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = match list(&mut names) {
        Ok(n) => n,
        Err(rustix::io::Errno::RANGE) => {
            names = vec![0u8; 65536];
            list(&mut names).unwrap_or(0)
        }
        Err(_) => 0,
    };
    let mut out = Vec::new();
    for name in names[..n]
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let mut val = vec![0u8; 65536];
        if let Ok(len) = get(OsStr::from_bytes(name), &mut val) {
            val.truncate(len);
            out.push((name.to_vec(), val));
        }
    }
    out.sort();
    out
}

/// Whether [`proc_path`] works here (it needs /proc): checked on the walk's root, since
/// xattrs read through it would otherwise be lost without a word.
pub(crate) fn check_proc_path(root: BorrowedFd, shown: &Path) -> Result<()> {
    let p = PathBuf::from(format!("/proc/self/fd/{}", root.as_raw_fd()));
    let same = match (
        rustix::fs::statat(CWD, &p, AtFlags::empty()),
        rustix::fs::fstat(root),
    ) {
        (Ok(a), Ok(b)) => file_id(&a) == file_id(&b),
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(Error::io(
            shown,
            std::io::Error::other(
                "/proc/self/fd is unusable (is /proc mounted?); it is needed to read the xattrs of entries at any depth",
            ),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// The walk

struct Walker<'a> {
    repo: &'a Arc<Repo>,
    writer: BlobWriter,
    stats: TreeStats,
    /// (dev, ino) of hard-linked files already seen → their content.
    links: HashMap<(u64, u64), Content>,
    progress: &'a Progress,
    chunker: Chunker,
    /// The walked directory, as given (for messages).
    root: &'a Path,
    chain: DirChain,
    rel: RelPath,
}

/// One directory being walked: the names still to visit, the entries made so far.
struct Frame {
    names: std::vec::IntoIter<Vec<u8>>,
    entries: Vec<Entry>,
    /// This directory in the parent tree, if it was a directory there.
    prev: Option<Tree>,
    /// This directory's own entry (its subtree is set when its frame is done); None for the
    /// root.
    entry: Option<Entry>,
    /// The relative path's length before this directory's name.
    rel_len: usize,
}

enum Visit {
    /// A socket, or gone since the listing.
    Skip,
    Leaf(Entry),
    /// A directory, entered (the chain is in it): its entry, the parent generation's tree
    /// of it, its names.
    Dir(Entry, Option<Tree>, Vec<Vec<u8>>),
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
    let root_fd = open_dir_path(dir).map_err(|e| Error::io(dir, e))?;
    check_proc_path(root_fd.as_fd(), dir)?;
    let names = list_dir(root_fd.as_fd()).map_err(|e| Error::io(dir, e))?;
    let chain = DirChain::new(root_fd).map_err(|e| Error::io(dir, e))?;
    let writer = BlobWriter::new(repo.clone())?;
    let mut w = Walker {
        repo,
        writer,
        stats: TreeStats::default(),
        links: HashMap::new(),
        progress,
        chunker: Chunker::new(repo.chunk_params()),
        root: dir,
        chain,
        rel: RelPath::default(),
    };
    let parent_tree = match parent {
        Some(h) => Some(repo.read_tree(&h, "/")?),
        None => None,
    };
    let root = w.walk(names, parent_tree)?;
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
}

impl Walker<'_> {
    /// Walks the tree from the root (whose sorted names are given) without recursion; each
    /// directory's tree is written when its last entry is done. Returns the root tree.
    fn walk(&mut self, names: Vec<Vec<u8>>, parent: Option<Tree>) -> Result<Hash> {
        let mut frames = vec![Frame {
            names: names.into_iter(),
            entries: Vec::new(),
            prev: parent,
            entry: None,
            rel_len: 0,
        }];
        loop {
            let top = frames
                .last_mut()
                .expect("the root's frame is the last one done");
            if let Some(name) = top.names.next() {
                let len = self.rel.push(&name);
                let rel = self.rel.show();
                let prev = top.prev.as_ref().and_then(|t| t.find(&name));
                match self.entry(&rel, name, prev)? {
                    Visit::Skip => {}
                    Visit::Leaf(e) => top.entries.push(e),
                    Visit::Dir(e, prev, names) => {
                        frames.push(Frame {
                            names: names.into_iter(),
                            entries: Vec::new(),
                            prev,
                            entry: Some(e),
                            rel_len: len,
                        });
                        continue;
                    }
                }
                self.rel.truncate(len);
                continue;
            }
            let done = frames.pop().expect("a frame is on the stack");
            let tree = Tree {
                entries: done.entries,
            };
            let bytes = tree.encode_checked(&self.rel.show())?;
            let hash = Hash::of(&bytes);
            self.writer.add(hash, BlobKind::Tree, bytes)?;
            let Some(mut e) = done.entry else {
                return Ok(hash);
            };
            self.chain
                .pop()
                .map_err(|err| Error::io(under(self.root, &self.rel.show()), err))?;
            e.subtree = Some(hash);
            self.stats.dirs += 1;
            frames
                .last_mut()
                .expect("a directory's parent is on the stack")
                .entries
                .push(e);
            self.rel.truncate(done.rel_len);
        }
    }

    /// Visits `name` in the current directory; a directory is entered.
    fn entry(&mut self, rel: &str, name: Vec<u8>, prev: Option<&Entry>) -> Result<Visit> {
        let root = self.root;
        let io = |err: std::io::Error| Error::io(under(root, rel), err);
        let m = match stat_at(self.chain.current(), &name) {
            Ok(m) => m,
            // Vanished between listing and stat: it is not part of this cut.
            Err(rustix::io::Errno::NOENT) => return Ok(Visit::Skip),
            Err(e) => return Err(io(e.into())),
        };
        let mut e = Entry {
            name,
            kind: Kind::File,
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime_ns: m.mtime_ns,
            size: 0,
            link: 0,
            ino: m.ino,
            ctime_ns: m.ctime_ns,
            rdev: 0,
            xattrs: Vec::new(),
            target: Vec::new(),
            subtree: None,
            content: Content::Empty,
        };
        if m.kind == FileType::Directory {
            e.kind = Kind::Dir;
            let prev_tree = match prev {
                Some(p) if p.kind == Kind::Dir => match p.subtree {
                    Some(h) => Some(self.repo.read_tree(&h, rel)?),
                    None => None,
                },
                _ => None,
            };
            let fd = open_dir(self.chain.current(), &e.name).map_err(|err| io(err.into()))?;
            e.xattrs = read_user_xattrs_fd(fd.as_fd());
            let names = list_dir(fd.as_fd()).map_err(io)?;
            self.chain.push(fd).map_err(io)?;
            return Ok(Visit::Dir(e, prev_tree, names));
        }
        // Entries that cannot all be opened: their xattrs through /proc (`l*` calls).
        e.xattrs = read_user_xattrs(&proc_path(self.chain.current(), &e.name));
        match m.kind {
            FileType::Symlink => {
                e.kind = Kind::Symlink;
                e.target = rustix::fs::readlinkat(self.chain.current(), &e.name, Vec::new())
                    .map_err(|err| io(err.into()))?
                    .into_bytes();
                e.size = e.target.len() as u64;
                self.stats.symlinks += 1;
            }
            FileType::RegularFile => self.file(rel, &m, &mut e, prev)?,
            FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => {
                e.kind = match m.kind {
                    FileType::Fifo => Kind::Fifo,
                    FileType::CharacterDevice => Kind::CharDev,
                    _ => Kind::BlockDev,
                };
                e.rdev = m.rdev;
                self.stats.others += 1;
            }
            _ => {
                self.stats.skipped += 1;
                return Ok(Visit::Skip);
            }
        }
        Ok(Visit::Leaf(e))
    }

    fn file(&mut self, rel: &str, m: &Meta, e: &mut Entry, prev: Option<&Entry>) -> Result<()> {
        self.stats.files += 1;
        if m.nlink > 1 {
            e.link = m.ino;
            if let Some(content) = self.links.get(&(m.dev, m.ino)) {
                e.content = content.clone();
                e.size = m.size;
                self.stats.bytes += e.size;
                return Ok(());
            }
        }
        let unchanged = prev.filter(|p| {
            p.kind == Kind::File
                && p.size == m.size
                && p.mtime_ns == e.mtime_ns
                && p.ino == e.ino
                && p.ctime_ns == e.ctime_ns
        });
        if let Some(p) = unchanged {
            e.content = p.content.clone();
            e.size = p.size;
            self.note_reused(&e.content);
        } else {
            let (content, size) = self.read_content(&e.name, rel)?;
            e.content = content;
            e.size = size;
            self.stats.files_read += 1;
            self.stats.bytes_read += size;
        }
        self.stats.bytes += e.size;
        self.progress.add(1, e.size);
        if m.nlink > 1 {
            self.links.insert((m.dev, m.ino), e.content.clone());
        }
        Ok(())
    }

    fn note_reused(&mut self, content: &Content) {
        for h in content.direct_blobs() {
            self.writer.note_reused(h);
        }
    }

    fn read_content(&mut self, name: &[u8], rel: &str) -> Result<(Content, u64)> {
        let path = || under(self.root, rel);
        let fd = rustix::fs::openat(
            self.chain.current(),
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(path(), e.into()))?;
        let f = File::from(fd);
        let mut chunks: Vec<Part> = Vec::new();
        let writer = &mut self.writer;
        let io_err = |e: Error| match e {
            Error::Io { source, .. } => Error::io(under(self.root, rel), source),
            other => other.at_path(rel),
        };
        let len = f.metadata().map_err(|e| Error::io(path(), e))?.len();
        let layout = layout::detect_file(&f, len).map_err(|e| Error::io(path(), e))?;
        let size = if layout == Layout::Content {
            self.chunker
                .chunk(f, |data| -> Result<()> {
                    let hash = Hash::of(data);
                    chunks.push(Part::chunk(hash, data.len() as u32));
                    writer.add(hash, BlobKind::Data, data.to_vec())
                })
                .map_err(io_err)?
        } else {
            // A SQLite database or WAL: cut at its pages (docs/decisions/sqlite-pages.md).
            let params = self.chunker.params();
            let (parts, _) = layout::relayout(layout, &f, len, &[], Vec::new(), params, |d, h| {
                writer.add(h, BlobKind::Data, d.to_vec())
            })
            .map_err(io_err)?;
            chunks = parts;
            len
        };
        Ok((encode_content(writer, chunks)?, size))
    }
}

/// A part list as stored in a tree entry (`parts::encode`).
pub fn encode_content(writer: &mut BlobWriter, parts: Vec<Part>) -> Result<Content> {
    crate::parts::encode(writer, parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_shown_shortened() {
        let mut rel = RelPath::default();
        assert_eq!(rel.show(), "");
        let len = rel.push(b"a");
        assert_eq!((len, rel.show()), (0, "/a".to_string()));
        for _ in 0..10_000 {
            rel.push("é".as_bytes());
        }
        rel.push(b"last");
        let shown = rel.show();
        assert!(shown.len() < 2 * SHOWN_EDGE + 40, "{}", shown.len());
        assert!(
            shown.starts_with("/a/é/é") && shown.ends_with("/é/é/last"),
            "{shown}"
        );
        assert!(shown.contains(" bytes …]"), "{shown}");
        assert!(
            !shown.contains('\u{FFFD}'),
            "cut inside a character: {shown}"
        );
        rel.truncate(len);
        assert_eq!(rel.show(), "");
        assert_eq!(under(Path::new("/t"), ""), Path::new("/t"));
        assert_eq!(under(Path::new("/t"), "/a/b"), Path::new("/t/a/b"));
    }
}
