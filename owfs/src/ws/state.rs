//! The workspace's live state: an inode table in memory (names, attributes, xattrs) and each
//! regular file's bytes in a file of the local cache, keyed by inode. What changed since the
//! last cut is tracked per node (`committed` is cleared up to the root) and per file (dirty
//! byte ranges), so a cut visits only changed directories and reads only changed bytes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chunkstore::tree::{chunk_starts, ChunkRef, Content, Entry, Kind};
use chunkstore::{Hash, Repo};
use parking_lot::{Condvar, Mutex};

use super::ranges::RangeSet;

pub const ROOT: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
}

impl NKind {
    pub fn from_mode(mode: u32) -> Option<NKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => NKind::File,
            libc::S_IFDIR => NKind::Dir,
            libc::S_IFLNK => NKind::Symlink,
            libc::S_IFIFO => NKind::Fifo,
            libc::S_IFCHR => NKind::Char,
            libc::S_IFBLK => NKind::Block,
            libc::S_IFSOCK => NKind::Socket,
            _ => return None,
        })
    }

    fn from_tree(k: Kind) -> NKind {
        match k {
            Kind::File => NKind::File,
            Kind::Dir => NKind::Dir,
            Kind::Symlink => NKind::Symlink,
            Kind::Fifo => NKind::Fifo,
            Kind::CharDev => NKind::Char,
            Kind::BlockDev => NKind::Block,
        }
    }

    /// Sockets live only on this node: a socket file means nothing without its process.
    pub fn to_tree(self) -> Option<Kind> {
        Some(match self {
            NKind::File => Kind::File,
            NKind::Dir => Kind::Dir,
            NKind::Symlink => Kind::Symlink,
            NKind::Fifo => Kind::Fifo,
            NKind::Char => Kind::CharDev,
            NKind::Block => Kind::BlockDev,
            NKind::Socket => return None,
        })
    }
}

/// Names that stay on this node and are never committed (DESIGN §2: SQLite's shared-memory
/// index is rebuilt from the WAL by whoever opens the database next).
pub fn node_local_name(name: &[u8]) -> bool {
    name.ends_with(b"-shm")
}

#[derive(Debug, Clone, Copy)]
pub struct Attr {
    /// Permission bits including setuid, setgid and sticky.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub rdev: u64,
    pub nlink: u32,
}

pub enum Body {
    Dir {
        /// Loaded on first use from `tree` (a directory of the mounted generation).
        children: Option<BTreeMap<Vec<u8>, u64>>,
        tree: Option<Hash>,
        parent: u64,
    },
    File(Arc<FileData>),
    Symlink(Vec<u8>),
    Special,
}

pub struct Node {
    pub kind: NKind,
    pub attr: Attr,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub body: Body,
    /// Directories holding a name of this node, once per name.
    pub parents: Vec<u64>,
    /// The kernel's references (lookups not yet forgotten): a node with no name stays until
    /// this is zero. An open file holds its inode in the kernel, so this covers open files too.
    pub lookups: u64,
    /// This node as the last generation recorded it; `None` once it or (for a directory)
    /// anything below it changed.
    pub committed: Option<Arc<Entry>>,
    /// Cut epoch of the last change: changes in the current epoch need not propagate again.
    pub touched: u64,
    /// Never committed (a `-shm` file, a socket).
    pub local_only: bool,
    /// This file replaced another by rename, and the kernel may still hold bytes of it that
    /// the daemon has not received (see `Replaced`).
    pub replaced: Option<Box<Replaced>>,
}

/// A rename that replaced a regular file (`rename(tmp, name)` over an existing `name`).
/// With the kernel's writeback cache, the source's last bytes can still be dirty pages in
/// the kernel when the RENAME arrives: a cut taken then would hold `name` with a size and
/// bytes no program gave it. Until the committer has waited for the source's writeback
/// (`Table::renames_flushed` reaches `seq`), a cut holds `name` as it was before the rename
/// (`prior`), as ext4's `auto_da_alloc` does after a power cut
/// (docs/decisions/frozen-bytes-outlive-names.md).
pub struct Replaced {
    pub seq: u64,
    /// Where the rename put the source: the hold-back applies only while it is still there.
    pub dir: u64,
    pub name: Vec<u8>,
    pub prior: Prior,
    /// Where the source was: a held-back cut shows it there, so that it holds the state
    /// before the rename whole (the source is not lost from the generation).
    pub from_dir: u64,
    pub from_name: Vec<u8>,
}

/// What a replaced name held before the rename.
pub enum Prior {
    /// Its entry in the last generation.
    Committed(Arc<Entry>),
    /// A file changed since the last generation: its attributes at the rename and its bytes,
    /// kept (pinned) until the hold-back ends.
    Live {
        ino: u64,
        entry: Box<Entry>,
        data: Pinned,
    },
}

/// A file's local bytes kept although the file may have lost its last name.
pub struct Pinned(Arc<FileData>);

impl Pinned {
    pub fn new(data: Arc<FileData>) -> Pinned {
        data.st.lock().pins += 1;
        Pinned(data)
    }

    pub fn data(&self) -> &Arc<FileData> {
        &self.0
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut st = self.0.st.lock();
        st.pins -= 1;
        self.0.discard_if_due(&mut st);
    }
}

impl Node {
    pub fn children(&self) -> Option<&BTreeMap<Vec<u8>, u64>> {
        match &self.body {
            Body::Dir { children, .. } => children.as_ref(),
            _ => None,
        }
    }

    pub fn children_mut(&mut self) -> Option<&mut BTreeMap<Vec<u8>, u64>> {
        match &mut self.body {
            Body::Dir { children, .. } => children.as_mut(),
            _ => None,
        }
    }

    pub fn data(&self) -> Option<&Arc<FileData>> {
        match &self.body {
            Body::File(d) => Some(d),
            _ => None,
        }
    }

    /// The tree entry for this node, without name, content or subtree (those come from the
    /// cut).
    pub fn entry(&self, ino: u64) -> Entry {
        Entry {
            name: Vec::new(),
            kind: self.kind.to_tree().unwrap_or(Kind::File),
            mode: self.attr.perm,
            uid: self.attr.uid,
            gid: self.attr.gid,
            mtime_ns: self.attr.mtime_ns,
            size: if self.kind == NKind::Dir {
                0
            } else {
                self.attr.size
            },
            link: if self.kind == NKind::File && self.attr.nlink > 1 {
                link_key(ino, self.attr.nlink)
            } else {
                0
            },
            ino,
            ctime_ns: self.attr.ctime_ns,
            rdev: self.attr.rdev,
            xattrs: self
                .xattrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            target: match &self.body {
                Body::Symlink(t) => t.clone(),
                _ => Vec::new(),
            },
            subtree: None,
            content: Content::Empty,
        }
    }
}

/// A hard-link group key that also carries the group's size: a lazily loaded directory
/// then knows a file's link count before every directory naming it was loaded. Keys from
/// `owfs snapshot` (plain inode numbers) carry none.
const LINK_COUNT_SHIFT: u32 = 40;

fn link_key(ino: u64, nlink: u32) -> u64 {
    (ino & ((1 << LINK_COUNT_SHIFT) - 1)) | ((nlink as u64) << LINK_COUNT_SHIFT)
}

fn link_count(key: u64) -> u32 {
    (key >> LINK_COUNT_SHIFT) as u32
}

pub struct Table {
    pub nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Current cut epoch (bumped at every cut).
    pub epoch: u64,
    /// Hard-link groups of the mounted generation → inode, so every name gets one inode.
    links: HashMap<u64, u64>,
    pub data_dir: PathBuf,
    /// Memory for small files and open cache files, shared by every file of the table.
    local: Arc<LocalRes>,
    /// Names of regular files, directories, and file bytes (what generation records count).
    pub files: i64,
    pub dirs: i64,
    pub bytes: i64,
    /// Renames that replaced a regular file, numbered (`Replaced::seq`), and those whose
    /// source's writeback the committer has waited for.
    renames: u64,
    pub renames_flushed: u64,
    /// Sources of replacing renames not yet flushed: (seq, inode).
    unflushed_renames: Vec<(u64, u64)>,
}

impl Table {
    pub fn new(data_dir: PathBuf, root: Node, totals: (i64, i64, i64)) -> Table {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, root);
        Table {
            nodes,
            next_ino: ROOT + 1,
            epoch: 1,
            links: HashMap::new(),
            data_dir,
            local: Arc::new(LocalRes::new()),
            files: totals.0,
            dirs: totals.1,
            bytes: totals.2,
            renames: 0,
            renames_flushed: 0,
            unflushed_renames: Vec::new(),
        }
    }

    /// Before `rename(src, dir/name)` removes the regular file `target` at `dir/name`: what
    /// a cut must hold at `dir/name` until `src`'s bytes are known to have arrived. `None`
    /// where nothing is held back (a hard-linked or node-local target).
    pub fn prior_of(&mut self, target: u64, dir: u64, name: &[u8]) -> Option<Prior> {
        let flushed = self.renames_flushed;
        let n = self.nodes.get_mut(&target)?;
        if n.kind != NKind::File || n.local_only || n.attr.nlink != 1 {
            return None;
        }
        // The target itself replaced a file there and is not flushed yet: what was there
        // before it is the state to hold.
        if let Some(r) = n.replaced.take() {
            if r.seq > flushed && r.dir == dir && r.name == name {
                return Some(r.prior);
            }
        }
        if let Some(e) = &n.committed {
            return Some(Prior::Committed(e.clone()));
        }
        let entry = Box::new(n.entry(target));
        let data = n.data()?.clone();
        Some(Prior::Live {
            ino: target,
            entry,
            data: Pinned::new(data),
        })
    }

    /// After the rename of `src` from `from` to `to` replaced a file that held `prior`.
    pub fn note_replacing_rename(
        &mut self,
        src: u64,
        from: (u64, &[u8]),
        to: (u64, &[u8]),
        prior: Prior,
    ) {
        self.renames += 1;
        let seq = self.renames;
        if let Some(n) = self.nodes.get_mut(&src) {
            n.replaced = Some(Box::new(Replaced {
                seq,
                dir: to.0,
                name: to.1.to_vec(),
                prior,
                from_dir: from.0,
                from_name: from.1.to_vec(),
            }));
            self.unflushed_renames.push((seq, src));
        }
    }

    /// The sources of replacing renames so far, and the number of the last one: once the
    /// kernel's writeback of each was waited for, `renames_flushed_up_to` ends their hold-back.
    pub fn unflushed_renames(&self) -> (u64, Vec<u64>) {
        let inos = self.unflushed_renames.iter().map(|&(_, ino)| ino).collect();
        (self.renames, inos)
    }

    pub fn has_unflushed_renames(&self) -> bool {
        !self.unflushed_renames.is_empty()
    }

    /// The mount is gone cleanly: every page the kernel held was written back before.
    pub fn all_renames_flushed(&mut self) {
        self.renames_flushed_up_to(self.renames);
    }

    pub fn renames_flushed_up_to(&mut self, seq: u64) {
        assert!(seq <= self.renames, "flushed renames that never happened");
        self.renames_flushed = self.renames_flushed.max(seq);
        let done = self.unflushed_renames.partition_point(|&(s, _)| s <= seq);
        for (_, ino) in self.unflushed_renames.drain(..done) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                if n.replaced.as_ref().is_some_and(|r| r.seq <= seq) {
                    n.replaced = None;
                }
            }
        }
    }

    /// The sources of renames a cut holds back now, by the directory they came from: (their
    /// old name, the source). A source whose old name was taken again meanwhile is left out.
    pub fn held_back_sources(&self) -> HashMap<u64, Vec<(Vec<u8>, u64)>> {
        let mut out: HashMap<u64, Vec<(Vec<u8>, u64)>> = HashMap::new();
        for &(_, src) in &self.unflushed_renames {
            let Some(r) = self.nodes.get(&src).and_then(|n| self.unflushed(n)) else {
                continue;
            };
            let children = |dir: u64| self.nodes.get(&dir).and_then(|d| d.children());
            let still_there = children(r.dir).and_then(|c| c.get(&r.name)) == Some(&src);
            let old_name_free = children(r.from_dir).is_some_and(|c| !c.contains_key(&r.from_name));
            if still_there && old_name_free {
                out.entry(r.from_dir)
                    .or_default()
                    .push((r.from_name.clone(), src));
            }
        }
        out
    }

    /// What a cut holds at `dir/name` instead of `child`, if `child` replaced it by a rename
    /// whose source's bytes may not all have arrived.
    pub fn held_back<'a>(&self, child: &'a Node, dir: u64, name: &[u8]) -> Option<&'a Prior> {
        self.unflushed(child)
            .filter(|r| r.dir == dir && r.name == name)
            .map(|r| &r.prior)
    }

    /// `n`'s replacing rename, if its source was not flushed yet.
    fn unflushed<'a>(&self, n: &'a Node) -> Option<&'a Replaced> {
        n.replaced
            .as_deref()
            .filter(|r| r.seq > self.renames_flushed)
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    pub fn alloc(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    pub fn new_file_data(&self, ino: u64, base: Content, size: u64) -> Arc<FileData> {
        Arc::new(FileData::new(
            self.data_dir.join(ino.to_string()),
            base,
            size,
            ino,
            self.local.clone(),
        ))
    }

    /// Records a change of `ino`: it and every directory above it leave the committed state.
    pub fn touch(&mut self, ino: u64) {
        let epoch = self.epoch;
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            let Some(n) = self.nodes.get_mut(&i) else {
                continue;
            };
            n.committed = None;
            if n.touched == epoch || (n.local_only && i == ino) {
                n.touched = epoch;
                continue;
            }
            n.touched = epoch;
            match &n.body {
                Body::Dir { parent, .. } if i != ROOT => stack.push(*parent),
                Body::Dir { .. } => {}
                _ => stack.extend(n.parents.iter().copied()),
            }
        }
    }

    /// Creates the nodes of a directory of the mounted generation from its tree.
    pub fn install_children(&mut self, dir: u64, entries: Vec<Entry>) {
        let mut children = BTreeMap::new();
        let mut subdirs = 0;
        for e in entries {
            let name = e.name.clone();
            if e.kind == Kind::Dir {
                subdirs += 1;
            }
            let ino = match (e.link != 0).then(|| self.links.get(&e.link).copied()) {
                Some(Some(ino)) => {
                    if let Some(n) = self.nodes.get_mut(&ino) {
                        n.parents.push(dir);
                        if link_count(e.link) == 0 {
                            n.attr.nlink += 1;
                        }
                    }
                    ino
                }
                _ => {
                    let ino = self.alloc();
                    if e.link != 0 {
                        self.links.insert(e.link, ino);
                    }
                    let node = self.node_from_entry(ino, dir, e);
                    self.nodes.insert(ino, node);
                    ino
                }
            };
            children.insert(name, ino);
        }
        if let Some(n) = self.nodes.get_mut(&dir) {
            n.attr.nlink = 2 + subdirs;
            if let Body::Dir { children: c, .. } = &mut n.body {
                *c = Some(children);
            }
        }
    }

    fn node_from_entry(&self, ino: u64, parent: u64, mut e: Entry) -> Node {
        let kind = NKind::from_tree(e.kind);
        let body = match kind {
            NKind::Dir => Body::Dir {
                children: None,
                tree: e.subtree,
                parent,
            },
            NKind::File => Body::File(self.new_file_data(ino, e.content.clone(), e.size)),
            NKind::Symlink => Body::Symlink(e.target.clone()),
            _ => Body::Special,
        };
        let attr = Attr {
            perm: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            size: if kind == NKind::Dir { 4096 } else { e.size },
            atime_ns: e.mtime_ns,
            mtime_ns: e.mtime_ns,
            ctime_ns: if e.ctime_ns != 0 {
                e.ctime_ns
            } else {
                e.mtime_ns
            },
            rdev: e.rdev,
            nlink: match (kind, link_count(e.link)) {
                (NKind::Dir, _) => 2,
                (_, 0) => 1,
                (_, n) => n,
            },
        };
        let xattrs = std::mem::take(&mut e.xattrs).into_iter().collect();
        e.name.clear();
        Node {
            kind,
            attr,
            xattrs,
            body,
            parents: if kind == NKind::Dir {
                Vec::new()
            } else {
                vec![parent]
            },
            lookups: 0,
            committed: Some(Arc::new(e)),
            touched: 0,
            local_only: false,
            replaced: None,
        }
    }

    /// Drops a node that has no name and no kernel reference.
    pub fn maybe_forget(&mut self, ino: u64) {
        let gone = self
            .nodes
            .get(&ino)
            .is_some_and(|n| n.attr.nlink == 0 && n.lookups == 0 && ino != ROOT);
        if gone {
            if let Some(n) = self.nodes.remove(&ino) {
                if let Body::File(d) = n.body {
                    d.discard();
                }
            }
        }
    }
}

/// Where a file's bytes come from before they are local: its content in the mounted
/// generation, fetched chunk by chunk on first access.
struct Remote {
    content: Content,
    chunks: Option<Arc<(Vec<ChunkRef>, Vec<u64>)>>,
    /// Bytes at or past this offset were cut off by a truncate: never fetched.
    end: u64,
}

/// What a cut froze of a file: its size, and the bytes writers have overwritten since, saved
/// just before they were overwritten, so the committer reads the file as it was at the cut.
pub struct Frozen {
    pub size: u64,
    saved: RangeSet,
    bytes: BTreeMap<u64, Vec<u8>>,
}

/// A file smaller than this is kept in memory until it grows, is fsynced or is fallocated:
/// creating (and later deleting) an inode of the local file system costs more than the
/// FUSE request that writes a small file, and on some file systems much more (ext4 without a
/// journal scans recently deleted inodes on every create).
const INLINE_MAX: u64 = 64 << 10;
/// At most this many bytes of small files are in memory at once; past it, files go to disk.
const INLINE_BUDGET: u64 = 64 << 20;

/// At most this many cache files are open at once (a workspace can hold far more files than
/// a process may open), and at most half the process's limit on open files: the least
/// recently opened is closed first and reopened on next use.
const MAX_OPEN: usize = 1024;

/// Where a file's local bytes are: nowhere yet (all zeros), in memory, or in its cache file.
/// Bytes past the end of what is held read as zeros, up to the logical length.
enum Local {
    None,
    Mem(Vec<u8>),
    Disk,
}

/// Open cache files by file id, and the order they were opened in.
type OpenFiles = (HashMap<u64, Arc<File>>, VecDeque<u64>);

/// Local resources all files of a table share.
pub struct LocalRes {
    /// Bytes of small files held in memory (`Local::Mem`), by capacity.
    inline: AtomicU64,
    open: Mutex<OpenFiles>,
    max_open: usize,
}

impl LocalRes {
    fn new() -> LocalRes {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        LocalRes {
            inline: AtomicU64::new(0),
            open: Mutex::default(),
            max_open: MAX_OPEN.min((limit / 2) as usize).max(16),
        }
    }

    fn cached(&self, id: u64) -> Option<Arc<File>> {
        self.open.lock().0.get(&id).cloned()
    }

    fn keep(&self, id: u64, f: File) -> Arc<File> {
        let f = Arc::new(f);
        let mut g = self.open.lock();
        let (map, order) = &mut *g;
        if map.insert(id, f.clone()).is_none() {
            order.push_back(id);
        }
        // A file in use elsewhere keeps its descriptor until that use ends.
        while map.len() > self.max_open {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
        f
    }

    fn forget(&self, id: u64) {
        let mut g = self.open.lock();
        if g.0.remove(&id).is_some() {
            g.1.retain(|&x| x != id);
        }
    }
}

pub struct FileState {
    local: Local,
    /// Logical length (the cache file's or the buffer's length is at most this).
    pub len: u64,
    remote: Option<Remote>,
    /// Bytes below `remote.end` already local.
    present: RangeSet,
    /// Written since the last cut.
    pub dirty: RangeSet,
    /// The content the last generation holds for this file, and its chunk list.
    pub base: Content,
    base_chunks: Option<Arc<Vec<ChunkRef>>>,
    pub frozen: Option<Frozen>,
    /// Writes copying their bytes into the cache file outside the lock (see `write`): those
    /// begun since the last cut, and those begun before it (the cut's view waits for them).
    inflight: u32,
    inflight_before_cut: u32,
    /// Number of the current cut period: a write records it when it begins.
    period: u64,
    /// The file lost its last name and its last kernel reference while a cut held it frozen
    /// or a hold-back pinned it: its local bytes go once neither does, not before.
    discard_pending: bool,
    /// Hold-backs that keep this file's bytes (`Pinned`).
    pins: u32,
    /// Its local bytes are gone (`discard`): nothing may read them as the file's content.
    discarded: bool,
}

/// A write whose state change is recorded and whose bytes are on their way to the cache file.
#[must_use]
pub struct WriteInFlight {
    file: Arc<File>,
    period: u64,
    /// The length before this write, and after it: undone on failure if nothing changed since.
    old_len: u64,
    new_len: u64,
}

pub struct FileData {
    pub path: PathBuf,
    pub st: Mutex<FileState>,
    /// Signalled when a write in flight ends.
    landed: Condvar,
    /// Key of this file's descriptor in `local`.
    id: u64,
    local: Arc<LocalRes>,
}

fn eio(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(what.to_string())
}

impl FileData {
    fn new(path: PathBuf, base: Content, size: u64, id: u64, local: Arc<LocalRes>) -> FileData {
        let remote = (size > 0).then(|| Remote {
            content: base.clone(),
            chunks: None,
            end: size,
        });
        FileData {
            path,
            id,
            local,
            landed: Condvar::new(),
            st: Mutex::new(FileState {
                local: Local::None,
                len: size,
                remote,
                present: RangeSet::default(),
                dirty: RangeSet::default(),
                base,
                base_chunks: None,
                frozen: None,
                inflight: 0,
                inflight_before_cut: 0,
                period: 0,
                discard_pending: false,
                pins: 0,
                discarded: false,
            }),
        }
    }

    /// The file is gone from the workspace: its local bytes go. A cut that froze it before it
    /// went still reads them (the generation holds the file as it was at the cut), so a
    /// frozen file keeps them until `thaw` (docs/decisions/frozen-bytes-outlive-names.md).
    fn discard(&self) {
        let mut st = self.st.lock();
        st.discard_pending = true;
        self.discard_if_due(&mut st);
    }

    fn discard_if_due(&self, st: &mut FileState) {
        if st.discard_pending && st.frozen.is_none() && st.pins == 0 {
            st.discard_pending = false;
            self.drop_local(st);
        }
    }

    fn drop_local(&self, st: &mut FileState) {
        st.discarded = true;
        // Nothing may fetch it again (the prefetcher may still hold this file).
        st.remote = None;
        st.present = RangeSet::default();
        self.set_inline(st, None);
        if let Local::Disk = std::mem::replace(&mut st.local, Local::None) {
            self.local.forget(self.id);
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Replaces the in-memory bytes (`None`: no longer in memory), keeping the budget count.
    fn set_inline(&self, st: &mut FileState, new: Option<Vec<u8>>) {
        let old = match &st.local {
            Local::Mem(v) => v.capacity() as u64,
            _ => 0,
        };
        let add = new.as_ref().map_or(0, |v| v.capacity() as u64);
        if add >= old {
            self.local.inline.fetch_add(add - old, Ordering::Relaxed);
        } else {
            self.local.inline.fetch_sub(old - add, Ordering::Relaxed);
        }
        match new {
            Some(v) => st.local = Local::Mem(v),
            None if matches!(st.local, Local::Mem(_)) => st.local = Local::None,
            None => {}
        }
    }

    /// The cache file, created (from the in-memory bytes, if any) on first need, reopened if
    /// it was closed to stay under `MAX_OPEN`.
    fn file(&self, st: &mut FileState) -> io::Result<Arc<File>> {
        if let Local::Disk = st.local {
            if let Some(f) = self.local.cached(self.id) {
                return Ok(f);
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)?;
            return Ok(self.local.keep(self.id, f));
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)?;
        if let Local::Mem(v) = &st.local {
            f.write_all_at(v, 0)?;
        }
        f.set_len(st.len)?;
        self.set_inline(st, None);
        st.local = Local::Disk;
        Ok(self.local.keep(self.id, f))
    }

    /// Whether the file, once bytes up to `end` are written, is small enough for memory.
    fn small(st: &FileState, end: u64) -> bool {
        end.max(st.len) <= INLINE_MAX
    }

    /// Stores `data` at `off` locally: in memory while the file stays small, else on disk.
    fn put(&self, st: &mut FileState, data: &[u8], off: u64) -> io::Result<()> {
        let end = off + data.len() as u64;
        let small = Self::small(st, end);
        match &mut st.local {
            Local::Disk => {}
            Local::Mem(v) if small => {
                if v.len() < end as usize {
                    let before = v.capacity();
                    v.resize(end as usize, 0);
                    let grown = (v.capacity() - before) as u64;
                    self.local.inline.fetch_add(grown, Ordering::Relaxed);
                }
                v[off as usize..end as usize].copy_from_slice(data);
                return Ok(());
            }
            Local::None if small && self.local.inline.load(Ordering::Relaxed) < INLINE_BUDGET => {
                let mut v = vec![0u8; end as usize];
                v[off as usize..].copy_from_slice(data);
                self.set_inline(st, Some(v));
                return Ok(());
            }
            _ => {}
        }
        self.file(st)?.write_all_at(data, off)
    }

    /// Reads local bytes at `off`; what was never stored reads as zeros.
    fn get(&self, st: &mut FileState, buf: &mut [u8], off: u64) -> io::Result<()> {
        match &st.local {
            Local::Disk => read_padded(&*self.file(st)?, buf, off),
            Local::Mem(v) => {
                let have = v.len().saturating_sub(off as usize).min(buf.len());
                if have > 0 {
                    buf[..have].copy_from_slice(&v[off as usize..off as usize + have]);
                }
                buf[have..].fill(0);
                Ok(())
            }
            Local::None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Sets the local length: bytes past it go, bytes up to it read as zeros.
    fn set_local_len(&self, st: &mut FileState, new_len: u64) -> io::Result<()> {
        match &mut st.local {
            Local::Mem(v) if new_len <= INLINE_MAX => {
                v.truncate(new_len as usize);
                Ok(())
            }
            Local::None if new_len <= INLINE_MAX => Ok(()),
            _ => self.file(st)?.set_len(new_len),
        }
    }

    /// Fetches from the store whatever of `[start, end)` is not local yet.
    pub fn ensure_present(
        &self,
        st: &mut FileState,
        repo: &Repo,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let Some(remote) = st.remote.as_mut() else {
            return Ok(());
        };
        let end = end.min(remote.end);
        if start >= end || st.present.covers(start, end) {
            return Ok(());
        }
        let chunks = match &remote.chunks {
            Some(c) => c.clone(),
            None => {
                let list = repo
                    .chunk_list(&remote.content, &self.path.display().to_string())
                    .map_err(eio)?;
                let (starts, _) = chunk_starts(&list);
                let c = Arc::new((list, starts));
                remote.chunks = Some(c.clone());
                c
            }
        };
        let remote_end = remote.end;
        let (list, starts) = (&chunks.0, &chunks.1);
        for gap in st.present.gaps(start, end) {
            let mut i = starts
                .partition_point(|s| *s <= gap.start)
                .saturating_sub(1);
            while i < list.len() && starts[i] < gap.end {
                let (cs, ce) = (starts[i], starts[i] + list[i].len as u64);
                let ce_clip = ce.min(remote_end);
                let missing = st.present.gaps(cs, ce_clip);
                if !missing.is_empty() && list[i].hash.is_zeros(list[i].len) {
                    // A hole's chunk: bytes not yet local already read as zeros.
                    st.present.insert(cs, ce_clip);
                } else if !missing.is_empty() {
                    let data = repo
                        .read_blob(&list[i].hash, &format!("{}", self.path.display()))
                        .map_err(eio)?;
                    for m in &missing {
                        let a = (m.start - cs) as usize;
                        let b = (m.end - cs) as usize;
                        self.put(st, &data[a..b], m.start)?;
                    }
                    st.present.insert(cs, ce_clip);
                }
                i += 1;
            }
        }
        let remote_end = st.remote.as_ref().map(|r| r.end).unwrap_or(0);
        if st.present.covers(0, remote_end) {
            st.remote = None;
            st.present = RangeSet::default();
        }
        Ok(())
    }

    /// The next range of this file still to fetch, for the background prefetch.
    pub fn next_missing(&self, max: u64) -> Option<Range<u64>> {
        let st = self.st.lock();
        let end = st.remote.as_ref()?.end;
        let g = st.present.gaps(0, end).into_iter().next()?;
        Some(g.start..g.end.min(g.start + max))
    }

    /// Before bytes of a frozen file change, keeps their values at the cut.
    fn preserve(
        &self,
        st: &mut parking_lot::MutexGuard<'_, FileState>,
        repo: &Repo,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let Some(fz) = st.frozen.as_ref() else {
            return Ok(());
        };
        let end = end.min(fz.size);
        if start >= end {
            return Ok(());
        }
        let gaps = fz.saved.gaps(start, end);
        if !gaps.is_empty() {
            // The bytes at the cut include those of writes begun before it.
            self.wait_landed(st, true);
        }
        for g in gaps {
            self.ensure_present(st, repo, g.start, g.end)?;
            let mut buf = vec![0u8; (g.end - g.start) as usize];
            self.get(st, &mut buf, g.start)?;
            let fz = st.frozen.as_mut().expect("frozen");
            fz.saved.insert(g.start, g.end);
            fz.bytes.insert(g.start, buf);
        }
        Ok(())
    }

    /// Waits until the writes in flight have landed: those begun before the last cut
    /// (`before_cut`), or all of them.
    fn wait_landed(&self, st: &mut parking_lot::MutexGuard<'_, FileState>, before_cut: bool) {
        while st.inflight_before_cut > 0 || (!before_cut && st.inflight > 0) {
            self.landed.wait(st);
        }
    }

    /// A write, in two steps so that a cut never waits for bytes being copied: `write_begin`
    /// (under the cut gate) records the new length and dirty range and saves what a frozen
    /// file's bytes were; `write_end` (outside it) copies the bytes into the cache file. A
    /// small file's write is done entirely by `write_begin` (`None`). Until the bytes land,
    /// the committer's view of the cut (`read_frozen`) waits for writes begun before the cut;
    /// writes begun after it overwrite only bytes it has saved.
    pub fn write_begin(
        &self,
        repo: &Repo,
        off: u64,
        data: &[u8],
    ) -> io::Result<Option<WriteInFlight>> {
        let mut st = self.st.lock();
        let end = off + data.len() as u64;
        self.preserve(&mut st, repo, off, end)?;
        let old_len = st.len;
        let inflight = if matches!(st.local, Local::Disk) || !Self::small(&st, end) {
            let file = self.file(&mut st)?;
            st.inflight += 1;
            Some(WriteInFlight {
                file,
                period: st.period,
                old_len,
                new_len: old_len.max(end),
            })
        } else {
            self.put(&mut st, data, off)?;
            None
        };
        st.present.insert(off, end);
        st.dirty.insert(off.min(old_len), end);
        st.len = st.len.max(end);
        Ok(inflight)
    }

    pub fn write_end(&self, w: WriteInFlight, off: u64, data: &[u8]) -> io::Result<()> {
        let r = w.file.write_all_at(data, off);
        if r.is_ok() && data.len() >= EARLY_WRITEBACK {
            // A large write (the kernel's writeback sends up to 1 MiB per request) starts its
            // way to disk now: an fsync that follows a long stream then waits for the tail, not
            // the whole stream (256 MiB written then fsynced: 290 ms -> 185 ms).
            // SAFETY: plain syscall on an owned descriptor.
            unsafe {
                libc::sync_file_range(
                    w.file.as_raw_fd(),
                    off as i64,
                    data.len() as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
        }
        let mut st = self.st.lock();
        if w.period == st.period {
            st.inflight -= 1;
        } else {
            st.inflight_before_cut -= 1;
        }
        if r.is_err() && st.len == w.new_len && w.new_len > w.old_len {
            // Nothing extended the file since: it keeps its old length (a failed write must not
            // leave zeros behind). The dirty range stays: it costs a re-read, nothing more.
            st.len = w.old_len;
        }
        drop(st);
        self.landed.notify_all();
        r
    }

    pub fn read(&self, repo: &Repo, off: u64, size: u32) -> io::Result<Vec<u8>> {
        let mut st = self.st.lock();
        let end = (off + size as u64).min(st.len);
        if off >= end {
            return Ok(Vec::new());
        }
        self.ensure_present(&mut st, repo, off, end)?;
        let mut buf = vec![0u8; (end - off) as usize];
        self.get(&mut st, &mut buf, off)?;
        Ok(buf)
    }

    pub fn truncate(&self, repo: &Repo, new_len: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        self.wait_landed(&mut st, false);
        let old = st.len;
        if new_len == old {
            return Ok(());
        }
        self.preserve(&mut st, repo, new_len, old)?;
        self.set_local_len(&mut st, new_len)?;
        if new_len < old {
            st.present.remove(new_len, u64::MAX);
            st.dirty.remove(new_len, u64::MAX);
            if let Some(r) = st.remote.as_mut() {
                r.end = r.end.min(new_len);
            }
        } else {
            st.dirty.insert(old, new_len);
        }
        st.len = new_len;
        Ok(())
    }

    /// fallocate(2): allocation (maybe extending), hole punching and zeroing.
    pub fn fallocate(&self, repo: &Repo, off: u64, len: u64, mode: i32) -> io::Result<u64> {
        let mut st = self.st.lock();
        self.wait_landed(&mut st, false);
        let end = off + len;
        let zeroes = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        if zeroes {
            self.preserve(&mut st, repo, off, end)?;
        }
        let f = self.file(&mut st)?;
        // SAFETY: plain syscall on an owned descriptor.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let old = st.len;
        if zeroes {
            let e = if keep { end.min(old) } else { end };
            st.present.insert(off, e);
            st.dirty.insert(off, e);
        }
        if !keep && end > old {
            st.dirty.insert(old, end);
            st.len = end;
        }
        Ok(st.len)
    }

    /// The current length (callers hold the table lock: table, then file state).
    pub fn len(&self) -> u64 {
        self.st.lock().len
    }

    /// fsync: the bytes go to the cache file (made now if the file was in memory) and to disk.
    pub fn sync_data(&self) -> io::Result<()> {
        let mut st = self.st.lock();
        if matches!(st.local, Local::None) && st.len == 0 {
            return Ok(());
        }
        self.file(&mut st)?.sync_data()
    }

    /// Freezes the file for a cut: returns the ranges written since the last cut.
    pub fn freeze(&self) -> (u64, Vec<Range<u64>>) {
        let mut st = self.st.lock();
        let dirty = std::mem::take(&mut st.dirty).to_vec();
        let size = st.len;
        st.inflight_before_cut += std::mem::take(&mut st.inflight);
        st.period += 1;
        st.frozen = Some(Frozen {
            size,
            saved: RangeSet::default(),
            bytes: BTreeMap::new(),
        });
        (size, dirty)
    }

    /// The chunk list of the last committed content.
    pub fn base_chunks(&self, repo: &Repo) -> io::Result<Arc<Vec<ChunkRef>>> {
        let (base, cached) = {
            let st = self.st.lock();
            (st.base.clone(), st.base_chunks.clone())
        };
        if let Some(c) = cached {
            return Ok(c);
        }
        let list = Arc::new(
            repo.chunk_list(&base, &self.path.display().to_string())
                .map_err(eio)?,
        );
        self.st.lock().base_chunks = Some(list.clone());
        Ok(list)
    }

    /// Reads bytes as they were at the cut. The cache file is read without the lock, so that
    /// writers are not held up by the committer: a write after the cut saves the bytes it
    /// overwrites before it starts, so whatever such a write changes during this read is
    /// replaced from the saved bytes afterwards.
    pub fn read_frozen(&self, repo: &Repo, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        // Invariant: a cut reads only bytes some program wrote (or a truncate or fallocate
        // made zero). Bytes dropped under a frozen file would read as zeros nobody wrote; the
        // commit fails instead of publishing them.
        if st.discarded {
            return Err(eio(format!(
                "owfs bug: the local bytes of {} were dropped while a cut held it frozen",
                self.path.display()
            )));
        }
        self.wait_landed(&mut st, true);
        let end = off + buf.len() as u64;
        self.ensure_present(&mut st, repo, off, end)?;
        if let Local::Disk = st.local {
            let f = self.file(&mut st)?;
            drop(st);
            read_padded(&f, buf, off)?;
            st = self.st.lock();
        } else {
            self.get(&mut st, buf, off)?;
        }
        let fz = st.frozen.as_ref().expect("file is frozen");
        // Saved extents are disjoint and sorted: walk back from `end` until one ends before
        // `off`, copying each one's part inside [off, end).
        for (&s, bytes) in fz.bytes.range(..end).rev() {
            let e = s + bytes.len() as u64;
            if e <= off {
                break;
            }
            let (a, b) = (s.max(off), e.min(end));
            if a < b {
                buf[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&bytes[(a - s) as usize..(b - s) as usize]);
            }
        }
        Ok(())
    }

    /// Where a run of bytes that read as zero at the cut, starting at `offset`, ends: a hole
    /// of the cache file (SEEK_DATA) that no byte saved for the cut and no byte still in the
    /// store covers. `offset` when none is known.
    pub fn frozen_zeros_until(&self, offset: u64) -> u64 {
        let mut st = self.st.lock();
        self.wait_landed(&mut st, true);
        let Some(fz) = st.frozen.as_ref() else {
            return offset;
        };
        let mut end = fz.size;
        // Saved bytes are the cut's, whatever they are: the run stops before them.
        if let Some((&s, bytes)) = fz.bytes.range(..=offset).next_back() {
            if s + bytes.len() as u64 > offset {
                return offset;
            }
        }
        if let Some((&s, _)) = fz.bytes.range(offset..).next() {
            end = end.min(s);
        }
        // Bytes not fetched yet hold the store's content, not zeros.
        if let Some(r) = &st.remote {
            if offset < r.end {
                match st.present.gaps(offset, r.end).first() {
                    Some(g) if g.start <= offset => return offset,
                    Some(g) => end = end.min(g.start),
                    None => {}
                }
            }
        }
        let data = match &st.local {
            Local::None => end,
            Local::Mem(v) => {
                let held = v.get(offset as usize..).unwrap_or(&[]);
                offset + held.iter().position(|b| *b != 0).unwrap_or(held.len()) as u64
            }
            Local::Disk => {
                let Ok(f) = self.file(&mut st) else {
                    return offset;
                };
                match rustix::fs::seek(&*f, rustix::fs::SeekFrom::Data(offset)) {
                    Ok(d) => d,
                    // No data at or past `offset`: a hole to the end of the file.
                    Err(rustix::io::Errno::NXIO) => end,
                    Err(_) => offset,
                }
            }
        };
        end.min(data).max(offset)
    }

    /// After the cut's generation is durable (`Some(new base)`), or failed (`None`: the
    /// frozen ranges are dirty again).
    pub fn thaw(&self, result: Option<(Content, Arc<Vec<ChunkRef>>)>, frozen_dirty: &[Range<u64>]) {
        let mut st = self.st.lock();
        st.frozen = None;
        match result {
            Some((content, chunks)) => {
                st.base = content;
                st.base_chunks = Some(chunks);
            }
            None => {
                let len = st.len;
                for r in frozen_dirty {
                    st.dirty.insert(r.start.min(len), r.end.min(len));
                }
            }
        }
        // Gone from the workspace meanwhile: its bytes go now that the cut is done.
        self.discard_if_due(&mut st);
    }
}

impl Drop for FileData {
    fn drop(&mut self) {
        let st = self.st.get_mut();
        if let Local::Mem(v) = &st.local {
            self.local
                .inline
                .fetch_sub(v.capacity() as u64, Ordering::Relaxed);
        }
    }
}

use std::os::fd::AsRawFd;

/// Writes this large start their way to disk at once (see `write_end`).
const EARLY_WRITEBACK: usize = 256 << 10;

/// pread that treats bytes past the end of the local file as zeros.
fn read_padded(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// A frozen file as the committer reads it.
pub struct FrozenView<'a> {
    pub data: &'a FileData,
    pub repo: &'a Repo,
}

impl chunkstore::rechunk::ReadAt for FrozenView<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.data.read_frozen(self.repo, buf, offset)
    }

    fn zeros_until(&self, offset: u64) -> u64 {
        self.data.frozen_zeros_until(offset)
    }
}
