//! The inode table: names, attributes and xattrs of every node the kernel knows, in memory,
//! with what changed since the last cut tracked per node (`committed` is cleared up to the
//! root), so a cut visits only changed directories. Each regular file's bytes live apart, in
//! `content.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use chunkstore::tree::{link_count, link_key, Content, Entry, Kind};
use chunkstore::Hash;

use super::content::{FileData, LocalRes, Pinned};

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

/// Names that stay on this node and are never committed (docs/DESIGN.md §2: SQLite's
/// shared-memory index is rebuilt from the WAL by whoever opens the database next).
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
    /// Cut sequence number (`Table::cut_seq`) of the last change: a change in the current one
    /// need not propagate again.
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

pub struct Table {
    pub nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// The cut sequence number, bumped at every cut. Not the lease epoch: it counts cuts of
    /// this mount, from 1.
    pub cut_seq: u64,
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
            cut_seq: 1,
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
        let seq = self.cut_seq;
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            let Some(n) = self.nodes.get_mut(&i) else {
                continue;
            };
            n.committed = None;
            if n.touched == seq || (n.local_only && i == ino) {
                n.touched = seq;
                continue;
            }
            n.touched = seq;
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
