//! Restoring a tree into a directory, bit-exact: contents (holes kept sparse), modes, owners
//! (when permitted), mtimes, symlinks, hard links, FIFOs and devices, `user.*` xattrs and any
//! name Linux allows. Names are checked before use and nothing is created through a symlink.
//! Data is fetched pack by pack in coalesced ranges, a bounded batch at a time.
//!
//! Any depth Linux allows is restored: the walk is iterative (one frame per directory on the
//! way down, in a `Vec`), every call is relative to a directory descriptor (`mkdirat`,
//! `openat`, `symlinkat`, `mknodat`, `linkat`, `unlinkat`, ...) or made on the entry's own
//! descriptor, and at most `OPEN_DIRS` directory descriptors are open at once (see
//! `snapshot::DirChain`); no path grows with the depth.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::fetch::{fetch_blobs, FetchPlan};
use crate::hash::Hash;
use crate::pack::PackEntry;
use crate::progress::Progress;
use crate::read::{check_chunk, FileMap, Piece};
use crate::repo::Repo;
use crate::snapshot::{
    list_dir, open_dir, open_dir_path, proc_path, stat_at, under, DirChain, RelPath,
};
use crate::tree::{ChunkRef, Entry, Kind, Part};

/// A batch is fetched when it holds this much raw data or this many files.
const BATCH_BYTES: u64 = 64 << 20;
const BATCH_FILES: usize = 256;
/// Blobs of one pack less than 1 MiB apart are fetched with one request; at most
/// 8 MiB x 4 of fetched data is buffered.
const FETCH_PLAN: FetchPlan = FetchPlan {
    coalesce_gap: 1 << 20,
    max_range: 8 << 20,
    in_flight: 4,
};
const MAX_REPORTED_ERRORS: usize = 1000;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub files: u64,
    /// Hard links the target file system refused (too many links to one inode): those names
    /// hold copies, linked among themselves.
    pub link_copies: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// With `keep_going`: every problem met, by path.
    pub errors: Vec<String>,
}

pub struct RestoreOptions<'a> {
    /// Record damage and go on (drills) instead of stopping at the first problem.
    pub keep_going: bool,
    pub progress: &'a Progress,
}

struct PendingFile {
    file: Arc<File>,
    /// Relative to the target, as shown in messages.
    rel: String,
    entry: Entry,
}

struct Job {
    pack: Hash,
    entry: PackEntry,
    file: usize,
    /// The chunk and where it goes in the file.
    piece: Piece,
    chunk: ChunkRef,
}

/// A restored directory: its parent's index in `Restorer::nodes` and its name. The chain of
/// them names any directory of the restore at any depth, to reopen it by descriptor.
struct Node {
    parent: usize,
    name: Box<[u8]>,
}

/// One directory being restored: the entries still to create in it.
struct Frame {
    node: usize,
    entries: std::vec::IntoIter<Entry>,
    /// The directory's own entry, whose metadata is set when the frame is done; None for the
    /// target.
    entry: Option<Entry>,
    /// The relative path's length before this directory's name.
    rel_len: usize,
}

struct Restorer<'a> {
    repo: &'a Arc<Repo>,
    opts: RestoreOptions<'a>,
    report: RestoreReport,
    files: Vec<PendingFile>,
    jobs: Vec<Job>,
    batch_bytes: u64,
    target: &'a Path,
    /// Descriptors of the directories from the target down to the current one (`frames`
    /// has one frame per directory in it).
    chain: DirChain,
    frames: Vec<Frame>,
    rel: RelPath,
    /// Every directory created, the target first (node 0).
    nodes: Vec<Node>,
    /// Hard-link group → its first name: directory node and name.
    links: HashMap<u64, (usize, Box<[u8]>)>,
    /// Directories whose mode denies their owner search permission, set last of all (see
    /// `leave`), children first.
    deferred_modes: Vec<(usize, String, u32)>,
    is_root: bool,
}

pub fn restore_tree(
    repo: &Arc<Repo>,
    root: Hash,
    target: &Path,
    opts: RestoreOptions,
) -> Result<RestoreReport> {
    std::fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
    repo.ensure_index()?;
    let root_fd = open_dir_path(target).map_err(|e| Error::io(target, e))?;
    let chain = DirChain::new(root_fd).map_err(|e| Error::io(target, e))?;
    let mut r = Restorer {
        repo,
        opts,
        // The target itself is the root directory (counted as snapshot counts it).
        report: RestoreReport {
            dirs: 1,
            ..Default::default()
        },
        files: Vec::new(),
        jobs: Vec::new(),
        batch_bytes: 0,
        target,
        chain,
        frames: Vec::new(),
        rel: RelPath::default(),
        nodes: vec![Node {
            parent: 0,
            name: Box::default(),
        }],
        links: HashMap::new(),
        deferred_modes: Vec::new(),
        is_root: rustix::process::geteuid().is_root(),
    };
    r.walk(root)?;
    r.flush()?;
    for (node, rel, mode) in std::mem::take(&mut r.deferred_modes) {
        let res = r
            .open_node(node, OFlags::RDONLY | OFlags::DIRECTORY)
            .and_then(|fd| rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)))
            .map_err(|e| Error::io(under(target, &rel), e.into()));
        r.check(res, &rel)?;
    }
    Ok(r.report)
}

/// Removes whatever is at `name` in `dir` unless it is a directory and `keep_dir` (then it
/// is reused); never follows a symlink.
fn clear(dir: BorrowedFd, name: &[u8], keep_dir: bool) -> std::io::Result<()> {
    match stat_at(dir, name) {
        Ok(m) if m.kind == FileType::Directory && keep_dir => Ok(()),
        Ok(m) if m.kind == FileType::Directory => remove_tree(dir, name),
        Ok(_) => Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?),
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes the directory `path` and everything in it, at any depth (a drill's scratch
/// directory); nothing if it does not exist.
pub fn remove_dir_tree(path: &Path) -> std::io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other(format!(
            "{}: not a removable directory",
            path.display()
        )));
    };
    let parent = open_dir_path(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    })?;
    match remove_tree(parent.as_fd(), name.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes the directory `name` of `dir` and everything in it, without recursion (a stack
/// of directories still to empty) and with a bounded number of open descriptors.
fn remove_tree(dir: BorrowedFd, name: &[u8]) -> std::io::Result<()> {
    let mut chain = DirChain::new(open_dir(dir, name)?)?;
    // Per level: the subdirectories still to remove; below the top, the level's own name.
    let mut pending = vec![empty_out(chain.current())?];
    let mut names: Vec<Vec<u8>> = Vec::new();
    while let Some(level) = pending.last_mut() {
        match level.pop() {
            Some(sub) => {
                chain.push(open_dir(chain.current(), &sub)?)?;
                names.push(sub);
                pending.push(empty_out(chain.current())?);
            }
            None => {
                pending.pop();
                if let Some(done) = names.pop() {
                    let _emptied = chain.pop()?;
                    rustix::fs::unlinkat(chain.current(), &done[..], AtFlags::REMOVEDIR)?;
                }
            }
        }
    }
    drop(chain);
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

/// Unlinks every entry of `dir` but its subdirectories, whose names it returns.
fn empty_out(dir: BorrowedFd) -> std::io::Result<Vec<Vec<u8>>> {
    let mut subdirs = Vec::new();
    for name in list_dir(dir)? {
        match stat_at(dir, &name) {
            Ok(m) if m.kind == FileType::Directory => subdirs.push(name),
            Ok(_) => rustix::fs::unlinkat(dir, &name[..], AtFlags::empty())?,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(subdirs)
}

fn ts(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

fn times(e: &Entry) -> Timestamps {
    let t = ts(e.mtime_ns);
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn owner(e: &Entry) -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(e.uid)), Some(Gid::from_raw(e.gid)))
}

/// Metadata of a file or directory, on its descriptor: owner, mode (unless `mode` is
/// false), xattrs, then times (last, since the others change ctime only).
fn set_meta_fd(fd: BorrowedFd, e: &Entry, is_root: bool, mode: bool) -> std::io::Result<()> {
    let (uid, gid) = owner(e);
    if let Err(err) = rustix::fs::fchown(fd, uid, gid) {
        if is_root {
            return Err(err.into());
        }
    }
    if mode {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode))?;
    }
    for (name, value) in &e.xattrs {
        rustix::fs::fsetxattr(
            fd,
            OsStr::from_bytes(name),
            value,
            rustix::fs::XattrFlags::empty(),
        )?;
    }
    rustix::fs::futimens(fd, &times(e))?;
    Ok(())
}

/// The same for `name` in `dir`, an entry that cannot be opened (symlink, FIFO, device);
/// a symlink has no mode.
fn set_meta_at(dir: BorrowedFd, name: &[u8], e: &Entry, is_root: bool) -> std::io::Result<()> {
    let (uid, gid) = owner(e);
    if let Err(err) = rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW) {
        if is_root {
            return Err(err.into());
        }
    }
    if e.kind != Kind::Symlink {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(e.mode), AtFlags::empty())?;
    }
    if !e.xattrs.is_empty() {
        let path = proc_path(dir, name);
        for (xname, value) in &e.xattrs {
            rustix::fs::lsetxattr(
                &path,
                OsStr::from_bytes(xname),
                value,
                rustix::fs::XattrFlags::empty(),
            )?;
        }
    }
    rustix::fs::utimensat(dir, name, &times(e), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

impl Restorer<'_> {
    fn check(&mut self, res: Result<()>, rel: &str) -> Result<()> {
        match res {
            Ok(()) => Ok(()),
            Err(e) if self.opts.keep_going => {
                if self.report.errors.len() < MAX_REPORTED_ERRORS {
                    self.report.errors.push(format!("{rel}: {e}"));
                }
                Ok(())
            }
            Err(e) => Err(e.at_path(rel)),
        }
    }

    /// Restores the tree `root` into the target, one entry at a time without recursion: a
    /// directory's frame is pushed when it is created and done when its entries are.
    fn walk(&mut self, root: Hash) -> Result<()> {
        let entries = match self.repo.read_tree(&root, "/") {
            Ok(t) => t.entries,
            Err(e) => {
                self.check(Err(e), "/")?;
                Vec::new()
            }
        };
        self.frames.push(Frame {
            node: 0,
            entries: entries.into_iter(),
            entry: None,
            rel_len: 0,
        });
        while let Some(top) = self.frames.last_mut() {
            let Some(e) = top.entries.next() else {
                let done = self.frames.pop().expect("a frame is on the stack");
                self.leave(done)?;
                continue;
            };
            let len = self.rel.push(&e.name);
            let rel = self.rel.show();
            let depth = self.frames.len();
            let res = self.entry(e, &rel);
            self.check(res, &rel)?;
            if self.frames.len() == depth {
                self.rel.truncate(len);
            }
        }
        Ok(())
    }

    /// A directory's entries are all created: back to its parent, then its metadata on its
    /// own descriptor. A read-only mode is thus applied after its children were created;
    /// a mode without search permission for the owner waits until the end (hard links may
    /// still need to reach through it).
    fn leave(&mut self, done: Frame) -> Result<()> {
        let Some(e) = done.entry else {
            // The target: its own metadata is left as it is.
            return Ok(());
        };
        let rel = self.rel.show();
        let target = self.target;
        let io = |err: std::io::Error| Error::io(under(target, &rel), err);
        // Leaving cannot be skipped (keep_going or not): the walk needs its parent.
        let fd = self.chain.pop().map_err(io)?;
        self.report.dirs += 1;
        let searchable = e.mode & 0o100 != 0;
        if !searchable {
            self.deferred_modes.push((done.node, rel.clone(), e.mode));
        }
        let res = set_meta_fd(fd.as_fd(), &e, self.is_root, searchable).map_err(io);
        self.rel.truncate(done.rel_len);
        self.check(res, &rel)
    }

    fn entry(&mut self, e: Entry, rel: &str) -> Result<()> {
        let target = self.target;
        let io = |err: std::io::Error| Error::io(under(target, rel), err);
        let ix = |err: Errno| io(err.into());
        let name: &[u8] = &e.name;
        match e.kind {
            Kind::Dir => {
                let dir = self.chain.current();
                clear(dir, name, true).map_err(io)?;
                match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(err) => return Err(ix(err)),
                }
                let fd = open_dir(dir, name).map_err(ix)?;
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(ix)?;
                let sub = e.subtree.expect("validated: a directory has a subtree");
                let entries = match self.repo.read_tree(&sub, rel) {
                    Ok(t) => t.entries,
                    Err(err) if self.opts.keep_going => {
                        // Recorded; the directory is still made (empty), as its metadata.
                        self.check(Err(err), rel)?;
                        Vec::new()
                    }
                    Err(err) => return Err(err),
                };
                self.chain.push(fd).map_err(io)?;
                let parent = self.frames.last().expect("in a directory").node;
                self.nodes.push(Node {
                    parent,
                    name: name.into(),
                });
                let rel_len = self.rel.len() - 1 - name.len();
                self.frames.push(Frame {
                    node: self.nodes.len() - 1,
                    entries: entries.into_iter(),
                    entry: Some(e),
                    rel_len,
                });
            }
            Kind::File => self.file(e, rel)?,
            Kind::Symlink => {
                let dir = self.chain.current();
                clear(dir, name, false).map_err(io)?;
                rustix::fs::symlinkat(&e.target[..], dir, name).map_err(ix)?;
                set_meta_at(dir, name, &e, self.is_root).map_err(io)?;
            }
            Kind::Fifo | Kind::CharDev | Kind::BlockDev => {
                let dir = self.chain.current();
                clear(dir, name, false).map_err(io)?;
                let ft = match e.kind {
                    Kind::Fifo => FileType::Fifo,
                    Kind::CharDev => FileType::CharacterDevice,
                    _ => FileType::BlockDevice,
                };
                rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(0o600), e.rdev)
                    .map_err(ix)?;
                set_meta_at(dir, name, &e, self.is_root).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Opens the restored directory `node`, from the deepest open directory on its way
    /// (`flags` for it; the directories on the way are opened with `O_PATH`, which needs
    /// only search permission).
    fn open_node(&self, node: usize, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        // The node's directories from depth 1 down to it.
        let mut path = Vec::new();
        let mut n = node;
        while n != 0 {
            path.push(n);
            n = self.nodes[n].parent;
        }
        path.reverse();
        // How deep the node's path and the walk's frames agree, then the deepest open
        // directory there (the target's always is).
        let mut common = 0;
        while common < path.len()
            && common + 1 < self.frames.len()
            && self.frames[common + 1].node == path[common]
        {
            common += 1;
        }
        let (mut start, mut fd) = (common, None);
        while fd.is_none() {
            fd = self.chain.at(start);
            if fd.is_none() {
                start -= 1;
            }
        }
        let from = fd.expect("the target is open");
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if start == path.len() {
            return rustix::fs::openat(from, ".", flags, Mode::empty());
        }
        let mut cur: Option<OwnedFd> = None;
        for (i, &n) in path.iter().enumerate().skip(start) {
            let f = if i + 1 == path.len() {
                flags
            } else {
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
            };
            let at = cur.as_ref().map_or(from, |c| c.as_fd());
            cur = Some(rustix::fs::openat(
                at,
                &self.nodes[n].name[..],
                f,
                Mode::empty(),
            )?);
        }
        Ok(cur.expect("at least one step"))
    }

    fn file(&mut self, e: Entry, rel: &str) -> Result<()> {
        let target = self.target;
        let io = |err: std::io::Error| Error::io(under(target, rel), err);
        let ix = |err: Errno| io(err.into());
        clear(self.chain.current(), &e.name, false).map_err(io)?;
        if e.link != 0 {
            if let Some((node, first)) = self.links.get(&e.link) {
                let from = self
                    .open_node(*node, OFlags::PATH | OFlags::DIRECTORY)
                    .map_err(ix)?;
                match rustix::fs::linkat(
                    &from,
                    &first[..],
                    self.chain.current(),
                    &e.name[..],
                    AtFlags::empty(),
                ) {
                    Ok(()) => return Ok(()),
                    // The target file system allows fewer links to one inode than the
                    // workspace holds (ext4: 65,000): this name starts a copy that the
                    // group's next names link to.
                    Err(Errno::MLINK) => self.report.link_copies += 1,
                    Err(err) => return Err(ix(err)),
                }
            }
            let node = self.frames.last().expect("in a directory").node;
            self.links.insert(e.link, (node, e.name.clone().into()));
        }
        let fd = rustix::fs::openat(
            self.chain.current(),
            &e.name[..],
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(ix)?;
        let file = File::from(fd);
        // Regions never written stay holes.
        file.set_len(e.size).map_err(io)?;
        let map = FileMap::load(self.repo, &e.content, e.size, rel)?;
        let idx = self.files.len();
        for piece in map.pieces() {
            let c = match piece.part {
                // The file stays sparse there, nothing to fetch.
                _ if piece.is_hole() => continue,
                // A few bytes kept in the part list (a WAL's frame header).
                Part::Inline(i) => {
                    file.write_all_at(i.bytes(), piece.start).map_err(io)?;
                    self.opts.progress.add(0, piece.part.len());
                    continue;
                }
                Part::Chunk(c) => c,
            };
            let (pack, entry) = self.repo.locate(&c.hash, &format!("content of {rel:?}"))?;
            self.jobs.push(Job {
                chunk: c,
                pack,
                entry,
                file: idx,
                piece,
            });
        }
        self.batch_bytes += e.size;
        self.report.files += 1;
        self.report.bytes += e.size;
        self.files.push(PendingFile {
            file: Arc::new(file),
            rel: rel.to_string(),
            entry: e,
        });
        if self.batch_bytes >= BATCH_BYTES || self.files.len() >= BATCH_FILES {
            self.flush()?;
        }
        Ok(())
    }

    /// Fetches every job of the batch (coalesced ranges per pack, a bounded number in flight),
    /// verifies each blob, writes it, then sets the files' metadata on their descriptors.
    fn flush(&mut self) -> Result<()> {
        let jobs = std::mem::take(&mut self.jobs);
        let locs: Vec<(Hash, PackEntry)> = jobs.iter().map(|j| (j.pack, j.entry)).collect();
        let repo = self.repo.clone();
        let target = self.target;
        fetch_blobs(&repo, &locs, FETCH_PLAN, |i, raw| {
            let j = &jobs[i];
            let pf = &self.files[j.file];
            let res = raw.and_then(|raw| {
                let raw = check_chunk(&j.chunk, raw, &pf.rel)?;
                self.opts.progress.add(0, raw.len() as u64);
                if raw.iter().all(|b| *b == 0) {
                    return Ok(());
                }
                pf.file
                    .write_all_at(&raw, j.piece.start)
                    .map_err(|e| Error::io(under(target, &pf.rel), e))
            });
            let rel = pf.rel.clone();
            self.check(res, &rel)
        })?;
        for pf in std::mem::take(&mut self.files) {
            let res = set_meta_fd(pf.file.as_fd(), &pf.entry, self.is_root, true)
                .map_err(|e| Error::io(under(target, &pf.rel), e));
            self.opts.progress.add(1, 0);
            drop(pf.file);
            self.check(res, &pf.rel)?;
        }
        self.batch_bytes = 0;
        Ok(())
    }
}
