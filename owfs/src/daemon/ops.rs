//! The FUSE operations of the read-write mount. Metadata lives in the inode table; file bytes
//! in the local cache. Every mutation holds the cut gate shared, so a cut sees each operation
//! wholly or not at all. The kernel may cache entries and attributes for long: every change
//! to this file system comes through this kernel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, FopenFlags, INodeNo, InitFlags, RenameFlags, TimeOrNow};
use parking_lot::Mutex;

use super::fuse::{
    AddDirent, AddDirentPlus, Caller, InitConfig, Opened, Operations, SetAttr, Statfs, Xattr,
};
use super::inodes::{node_local_name, Attr, Body, NKind, Node, Table, ROOT};
use super::Op;
use super::{now_ns, Shared};
use crate::fuse_util::{file_type, time};

const TTL: Duration = Duration::from_secs(3600);
/// The largest WRITE the kernel sends (it caps max_write at 1 MiB).
pub(super) const MAX_WRITE: u32 = 1 << 20;
/// Directory listings stay cached in the kernel: every change comes through it.
const DIR_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_CACHE_DIR);
const XATTR_MAX: usize = 64 << 10;

type Listing = Vec<(Vec<u8>, u64, FileType)>;

/// What mknod, mkdir, symlink and create ask for.
struct NewNode {
    kind: NKind,
    perm: u32,
    rdev: u64,
    target: Option<Vec<u8>>,
}

impl NewNode {
    fn new(kind: NKind, perm: u32) -> NewNode {
        NewNode {
            kind,
            perm,
            rdev: 0,
            target: None,
        }
    }

    fn rdev(mut self, rdev: u32) -> NewNode {
        self.rdev = rdev as u64;
        self
    }
}

/// The file system; clones share everything (each io_uring queue thread owns one).
#[derive(Clone)]
pub struct OwfsFs {
    pub(super) s: Arc<Shared>,
    dirs: Arc<Mutex<HashMap<u64, Arc<Listing>>>>,
    next_fh: Arc<AtomicU64>,
}

impl OwfsFs {
    pub fn new(s: Arc<Shared>) -> OwfsFs {
        OwfsFs {
            s,
            dirs: Default::default(),
            next_fh: Arc::new(AtomicU64::new(1)),
        }
    }
}

fn ftype(k: NKind) -> FileType {
    k.to_tree().map(file_type).unwrap_or(FileType::Socket)
}

fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn attr_of(ino: u64, n: &Node) -> FileAttr {
    let a = &n.attr;
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.atime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: ftype(n.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// The attributes of a negative entry: node 0 tells the kernel the name does not exist.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(c) => Errno::from_i32(c),
        None => {
            eprintln!("owfs: I/O error: {e}");
            Errno::EIO
        }
    }
}

/// Names the kernel passes are already single components; refuse what a tree cannot hold.
fn check_name(name: &[u8]) -> Result<&[u8], Errno> {
    if name.len() > 255 {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(name)
}

impl Shared {
    /// Loads a directory of the mounted generation from the store on first use.
    pub(super) fn ensure_loaded(&self, ino: u64) -> Result<(), Errno> {
        let hash = {
            let mut t = self.table.lock();
            let n = t.get_mut(ino).ok_or(Errno::ENOENT)?;
            match &mut n.body {
                Body::Dir { children, tree, .. } => match (children.is_some(), *tree) {
                    (true, _) => return Ok(()),
                    (false, None) => {
                        *children = Some(Default::default());
                        return Ok(());
                    }
                    (false, Some(h)) => h,
                },
                _ => return Err(Errno::ENOTDIR),
            }
        };
        let tree = self
            .repo
            .read_tree(&hash, &format!("directory inode {ino}"))
            .map_err(|e| {
                eprintln!("owfs: {}: {e}", self.ws);
                Errno::EIO
            })?;
        let mut t = self.table.lock();
        if t.get(ino).is_some_and(|n| n.children().is_none()) {
            t.install_children(ino, tree.entries);
        }
        Ok(())
    }

    /// Background: loads every directory and fetches every file, so a fresh node soon holds
    /// the whole workspace locally while it is already being served.
    pub(super) fn prefetch(&self) {
        let mut queue = vec![ROOT];
        while let Some(dir) = queue.pop() {
            if !self.serving() || self.life.phase() != super::lifecycle::Phase::Serving {
                return;
            }
            if self.ensure_loaded(dir).is_err() {
                continue;
            }
            let (subdirs, files) = {
                let t = self.table.lock();
                let Some(ch) = t.get(dir).and_then(|n| n.children()) else {
                    continue;
                };
                let mut subdirs = Vec::new();
                let mut files = Vec::new();
                for &c in ch.values() {
                    match t.get(c).map(|n| &n.body) {
                        Some(Body::Dir { .. }) => subdirs.push(c),
                        Some(Body::File(d)) => files.push(d.clone()),
                        _ => {}
                    }
                }
                (subdirs, files)
            };
            queue.extend(subdirs);
            for d in files {
                while let Some(r) = d.next_missing(4 << 20) {
                    if self.life.phase() != super::lifecycle::Phase::Serving {
                        return;
                    }
                    let mut st = d.st.lock();
                    if d.ensure_present(&mut st, &self.repo, r.start, r.end)
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    }
}

impl OwfsFs {
    /// Every request that must be refused once the mount stopped: counts it, then `alive`.
    fn enter(&self, op: Op) -> Result<(), Errno> {
        self.s.count(op);
        self.alive()
    }

    /// EIO once the mount failed, is stopping, or its lease could have passed to another node.
    fn alive(&self) -> Result<(), Errno> {
        if self.s.answers_requests() {
            Ok(())
        } else {
            Err(Errno::EIO)
        }
    }

    fn lookup_child(&self, parent: u64, name: &[u8]) -> Result<Option<u64>, Errno> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        self.s.ensure_loaded(parent)?;
        let t = self.s.table.lock();
        let p = t.get(parent).ok_or(Errno::ENOENT)?;
        Ok(p.children().ok_or(Errno::ENOTDIR)?.get(name).copied())
    }

    /// mknod, mkdir, symlink and create: a new node named `name` in `parent`.
    fn new_node(
        &self,
        op: Op,
        c: &Caller,
        parent: u64,
        name: &[u8],
        spec: NewNode,
    ) -> Result<FileAttr, Errno> {
        self.mutation(op, || {
            let name = check_name(name)?;
            self.s.ensure_loaded(parent)?;
            let mut t = self.s.table.lock();
            self.make_node(&mut t, c, parent, name, spec)
        })
    }

    /// setxattr and removexattr: `f` changes the node's xattrs; its ctime and change mark follow.
    fn change_xattrs(
        &self,
        op: Op,
        ino: u64,
        f: impl FnOnce(&mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), Errno>,
    ) -> Result<(), Errno> {
        self.mutation(op, || {
            let mut t = self.s.table.lock();
            let n = t.get_mut(ino).ok_or(Errno::ENOENT)?;
            f(&mut n.xattrs)?;
            n.attr.ctime_ns = now_ns();
            t.touch(ino);
            Ok(())
        })
    }

    /// Every request that changes the file system: counts it, then runs it inside the cut
    /// gate (a cut sees it whole or not at all), refusing it with EIO once the mount stopped.
    fn mutation<T>(&self, op: Op, f: impl FnOnce() -> Result<T, Errno>) -> Result<T, Errno> {
        self.s.count(op);
        let _g = self.s.gate.read();
        self.alive()?;
        f()
    }

    fn make_node(
        &self,
        t: &mut Table,
        c: &Caller,
        parent: u64,
        name: &[u8],
        NewNode {
            kind,
            perm,
            rdev,
            target,
        }: NewNode,
    ) -> Result<FileAttr, Errno> {
        let (pgid, psgid) = {
            let p = t.get(parent).ok_or(Errno::ENOENT)?;
            let ch = p.children().ok_or(Errno::ENOTDIR)?;
            if ch.contains_key(name) {
                return Err(Errno::EEXIST);
            }
            (p.attr.gid, p.attr.perm & libc::S_ISGID != 0)
        };
        let ino = t.alloc();
        let now = now_ns();
        let mut perm = perm & 0o7777;
        let gid = if psgid { pgid } else { c.gid };
        if psgid && kind == NKind::Dir {
            perm |= libc::S_ISGID;
        }
        let body = match kind {
            NKind::Dir => Body::Dir {
                children: Some(Default::default()),
                tree: None,
                parent,
            },
            NKind::File => Body::File(t.new_file_data(ino, Default::default(), 0)),
            NKind::Symlink => Body::Symlink(target.clone().unwrap_or_default()),
            _ => Body::Special,
        };
        let node = Node {
            kind,
            attr: Attr {
                perm,
                uid: c.uid,
                gid,
                size: match kind {
                    NKind::Dir => 4096,
                    NKind::Symlink => target.as_ref().map(|t| t.len() as u64).unwrap_or(0),
                    _ => 0,
                },
                atime_ns: now,
                mtime_ns: now,
                ctime_ns: now,
                rdev,
                nlink: if kind == NKind::Dir { 2 } else { 1 },
            },
            xattrs: Default::default(),
            body,
            parents: if kind == NKind::Dir {
                Vec::new()
            } else {
                vec![parent]
            },
            lookups: 1,
            committed: None,
            touched: 0,
            local_only: kind == NKind::Socket || node_local_name(name),
            replaced: None,
        };
        let attr = attr_of(ino, &node);
        t.nodes.insert(ino, node);
        let p = t.get_mut(parent).expect("parent");
        p.children_mut().expect("dir").insert(name.to_vec(), ino);
        p.attr.mtime_ns = now;
        p.attr.ctime_ns = now;
        if kind == NKind::Dir {
            p.attr.nlink += 1;
            t.dirs += 1;
        }
        if kind == NKind::File {
            t.files += 1;
        }
        t.touch(ino);
        t.touch(parent);
        Ok(attr)
    }

    /// Removes the name `name` from `parent`; the node goes when nothing refers to it.
    fn remove_name(&self, t: &mut Table, parent: u64, name: &[u8], child: u64) {
        let now = now_ns();
        if let Some(p) = t.get_mut(parent) {
            if let Some(ch) = p.children_mut() {
                ch.remove(name);
            }
            p.attr.mtime_ns = now;
            p.attr.ctime_ns = now;
        }
        let mut was_dir = false;
        let mut gone_bytes = 0;
        if let Some(c) = t.get_mut(child) {
            c.attr.ctime_ns = now;
            if c.kind == NKind::Dir {
                was_dir = true;
                c.attr.nlink = 0;
            } else {
                c.attr.nlink = c.attr.nlink.saturating_sub(1);
                if let Some(i) = c.parents.iter().position(|p| *p == parent) {
                    c.parents.swap_remove(i);
                }
                if c.attr.nlink == 0 && c.kind == NKind::File && !c.local_only {
                    gone_bytes = c.attr.size as i64;
                }
            }
            if c.kind == NKind::File {
                t.files -= 1;
            }
        }
        t.bytes -= gone_bytes;
        if was_dir {
            t.dirs -= 1;
            if let Some(p) = t.get_mut(parent) {
                p.attr.nlink = p.attr.nlink.saturating_sub(1);
            }
        }
        t.touch(child);
        t.touch(parent);
        t.maybe_forget(child);
    }

    fn set_size(&self, ino: u64, size: u64) -> Result<(), Errno> {
        let data = self.file_data(ino)?;
        data.truncate(&self.s.repo, size).map_err(errno)?;
        self.data_changed(ino, 0);
        Ok(())
    }

    /// The regular file whose data the caller holds.
    fn file_data(&self, ino: u64) -> Result<Arc<super::content::FileData>, Errno> {
        let t = self.s.table.lock();
        let n = t.get(ino).ok_or(Errno::ENOENT)?;
        n.data().cloned().ok_or(match n.kind {
            NKind::Dir => Errno::EISDIR,
            _ => Errno::EINVAL,
        })
    }

    /// After a write, truncate or fallocate: the new length, times, the workspace's byte
    /// count and upload backlog, and the change mark.
    ///
    /// The length is read from the file's state under the table lock, never passed in: the
    /// kernel sends writeback writes in parallel, and a length computed by an earlier write
    /// but applied after a later one would move the size backwards (a file read back short
    /// once the kernel dropped its inode).
    fn data_changed(&self, ino: u64, written: u64) {
        let mut t = self.s.table.lock();
        let Some(n) = t.get_mut(ino) else { return };
        let Some(len) = n.data().map(|d| d.len()) else {
            return;
        };
        let delta = len as i64 - n.attr.size as i64;
        n.attr.size = len;
        let now = now_ns();
        n.attr.mtime_ns = now;
        n.attr.ctime_ns = now;
        if !n.local_only {
            t.bytes += delta;
            self.s.pending.fetch_add(written, Ordering::Relaxed);
        }
        t.touch(ino);
    }
}

/// What Linux does to a regular file written or truncated by a caller without CAP_FSETID,
/// or chowned (FUSE_HANDLE_KILLPRIV_V2 leaves it to us): setuid goes; setgid goes when group
/// execution is allowed, or when the caller is not in the file's group.
fn kill_suidgid(n: &mut super::inodes::Node, caller_in_group: impl FnOnce(u32) -> bool) -> bool {
    if n.kind != NKind::File {
        return false;
    }
    let before = n.attr.perm;
    n.attr.perm &= !0o4000;
    if n.attr.perm & 0o2000 != 0 && (n.attr.perm & 0o010 != 0 || !caller_in_group(n.attr.gid)) {
        n.attr.perm &= !0o2000;
    }
    before != n.attr.perm
}

/// Whether the calling process is in group `gid` (primary or supplementary).
fn in_group(c: &Caller, gid: u32) -> bool {
    if c.gid == gid {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", c.pid)) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

impl OwfsFs {
    fn kill_suidgid_of(&self, ino: u64, c: &Caller) {
        let mut t = self.s.table.lock();
        if t.get_mut(ino)
            .is_some_and(|n| kill_suidgid(n, |g| in_group(c, g)))
        {
            t.touch(ino);
            drop(t);
            // The kernel still caches the old mode (and would honour setuid on exec):
            // drop its attributes (offset -1: attributes only, no page is waited for).
            if let Some(n) = self.s.notifier.get() {
                let _ = n.inval_inode(INodeNo(ino), -1, 0);
            }
        }
    }
}

/// The operations, independent of the transport that carries them (/dev/fuse or the io_uring
/// queues, both through fuse/wire.rs, which decodes the requests). Each returns what the reply
/// carries.
impl Operations for OwfsFs {
    const TTL: Duration = TTL;

    fn init_config(&self) -> InitConfig {
        InitConfig {
            want: InitFlags::FUSE_WRITEBACK_CACHE
                | InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_READDIRPLUS_AUTO
                | InitFlags::FUSE_CACHE_SYMLINKS
                // (FUSE_MAX_PAGES and FUSE_BIG_WRITES: the codec always asks, wire::ALWAYS.)
                // We clear setuid/setgid ourselves (kill_suidgid): the kernel then stops
                // asking for security.capability before every write (a round trip per write()
                // call).
                | InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            max_write: MAX_WRITE,
            max_readahead: Some(1 << 20),
            max_background: 64,
            // Three quarters of max_background.
            congestion_threshold: 48,
            time_gran: 1,
        }
    }

    /// An absent name answers a negative entry (node 0) valid for TTL, not ENOENT: the kernel
    /// then keeps the negative dentry, so the next stat, open or O_CREAT of that name costs no
    /// LOOKUP. As for positive entries, every change to a directory comes through this
    /// kernel, which updates its dentries itself (decisions/negative-entries.md).
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<FileAttr, Errno> {
        self.enter(Op::Lookup)?;
        let Some(ino) = self.lookup_child(parent, name)? else {
            return Ok(negative_entry());
        };
        let mut t = self.s.table.lock();
        let n = t.get_mut(ino).ok_or(Errno::ENOENT)?;
        n.lookups += 1;
        Ok(attr_of(ino, n))
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        self.s.count(Op::Forget);
        let mut t = self.s.table.lock();
        if let Some(n) = t.get_mut(ino) {
            n.lookups = n.lookups.saturating_sub(nlookup);
        }
        t.maybe_forget(ino);
    }

    fn getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
        self.enter(Op::Getattr)?;
        let t = self.s.table.lock();
        t.get(ino).map(|n| attr_of(ino, n)).ok_or(Errno::ENOENT)
    }

    fn setattr(&self, c: &Caller, ino: u64, a: SetAttr) -> Result<FileAttr, Errno> {
        self.mutation(Op::Setattr, || {
            if let Some(sz) = a.size {
                self.set_size(ino, sz)?;
            }
            let mut t = self.s.table.lock();
            let n = t.get_mut(ino).ok_or(Errno::ENOENT)?;
            let now = now_ns();
            if let Some(m) = a.mode {
                n.attr.perm = m & 0o7777;
            }
            if let Some(u) = a.uid {
                n.attr.uid = u;
            }
            if let Some(g) = a.gid {
                n.attr.gid = g;
            }
            // chown drops setuid/setgid of a file for everyone; truncation without CAP_FSETID
            // (approximated: not root) too. An explicit mode in the same request wins.
            if a.mode.is_none() {
                if a.uid.is_some() || a.gid.is_some() {
                    // chown: as if the caller were in the group (only group execution counts).
                    kill_suidgid(n, |_| true);
                } else if a.size.is_some() && c.uid != 0 {
                    kill_suidgid(n, |g| in_group(c, g));
                }
            }
            let t_of = |x: TimeOrNow| match x {
                TimeOrNow::Now => now,
                TimeOrNow::SpecificTime(s) => ns_of(s),
            };
            if let Some(x) = a.atime {
                n.attr.atime_ns = t_of(x);
            }
            if let Some(x) = a.mtime {
                n.attr.mtime_ns = t_of(x);
            }
            n.attr.ctime_ns = a.ctime.map(ns_of).unwrap_or(now);
            let attr = attr_of(ino, n);
            // atime alone is not worth a commit.
            if a.mode.is_some()
                || a.uid.is_some()
                || a.gid.is_some()
                || a.size.is_some()
                || a.mtime.is_some()
            {
                t.touch(ino);
            }
            Ok(attr)
        })
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        self.enter(Op::Readlink)?;
        let t = self.s.table.lock();
        match t.get(ino).map(|n| &n.body) {
            Some(Body::Symlink(target)) => Ok(target.clone()),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    fn mknod(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<FileAttr, Errno> {
        match NKind::from_mode(mode) {
            Some(NKind::Dir | NKind::Symlink) | None => {
                self.s.count(Op::Mknod);
                Err(Errno::EINVAL)
            }
            Some(kind) => self.new_node(
                Op::Mknod,
                c,
                parent,
                name,
                NewNode::new(kind, mode).rdev(rdev),
            ),
        }
    }

    fn mkdir(&self, c: &Caller, parent: u64, name: &[u8], mode: u32) -> Result<FileAttr, Errno> {
        self.new_node(Op::Mkdir, c, parent, name, NewNode::new(NKind::Dir, mode))
    }

    fn symlink(
        &self,
        c: &Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<FileAttr, Errno> {
        let mut spec = NewNode::new(NKind::Symlink, 0o777);
        spec.target = Some(target.to_vec());
        self.new_node(Op::Symlink, c, parent, name, spec)
    }

    /// CREATE is answered ENOSYS, once: the kernel then creates regular files with MKNOD and
    /// opens them itself (`no_open`), so a created file, like an opened one, costs no RELEASE
    /// when closed (docs/decisions/small-files-and-opens.md). The kernel still skips the
    /// permission check of the open that created the file (a 0444 file opened O_WRONLY|O_CREAT
    /// is writable through that descriptor, as on ext4).
    fn create(
        &self,
        _c: &Caller,
        _parent: u64,
        _name: &[u8],
        _mode: u32,
    ) -> Result<(FileAttr, Opened), Errno> {
        self.s.count(Op::Create);
        Err(Errno::ENOSYS)
    }

    fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        self.mutation(Op::Unlink, || {
            let child = self.lookup_child(parent, name)?.ok_or(Errno::ENOENT)?;
            let mut t = self.s.table.lock();
            if t.get(child).is_some_and(|c| c.kind == NKind::Dir) {
                return Err(Errno::EISDIR);
            }
            self.remove_name(&mut t, parent, name, child);
            Ok(())
        })
    }

    fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        self.mutation(Op::Rmdir, || {
            let child = self.lookup_child(parent, name)?.ok_or(Errno::ENOENT)?;
            self.s.ensure_loaded(child)?;
            let mut t = self.s.table.lock();
            let c = t.get(child).ok_or(Errno::ENOENT)?;
            match c.children() {
                None => return Err(Errno::ENOTDIR),
                Some(ch) if !ch.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            self.remove_name(&mut t, parent, name, child);
            Ok(())
        })
    }

    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        self.mutation(Op::Rename, || {
            let newname = check_name(newname)?;
            if flags.contains(RenameFlags::RENAME_WHITEOUT) {
                return Err(Errno::EINVAL);
            }
            let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
            let child = self.lookup_child(parent, name)?.ok_or(Errno::ENOENT)?;
            let target = self.lookup_child(newparent, newname)?;
            if let Some(tg) = target {
                self.s.ensure_loaded(tg).or_else(|e| {
                    if e == Errno::ENOTDIR {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            }
            let mut t = self.s.table.lock();
            let ckind = t.get(child).ok_or(Errno::ENOENT)?.kind;
            if target == Some(child) {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) && target.is_some() {
                return Err(Errno::EEXIST);
            }
            let mut prior = None;
            if exchange {
                let tg = target.ok_or(Errno::ENOENT)?;
                let tkind = t.get(tg).ok_or(Errno::ENOENT)?.kind;
                t.get_mut(parent)
                    .and_then(|p| p.children_mut())
                    .ok_or(Errno::ENOENT)?
                    .insert(name.to_vec(), tg);
                t.get_mut(newparent)
                    .and_then(|p| p.children_mut())
                    .ok_or(Errno::ENOENT)?
                    .insert(newname.to_vec(), child);
                reparent(&mut t, child, ckind, parent, newparent);
                reparent(&mut t, tg, tkind, newparent, parent);
                let now = now_ns();
                for i in [child, tg, parent, newparent] {
                    if let Some(n) = t.get_mut(i) {
                        n.attr.ctime_ns = now;
                    }
                    t.touch(i);
                }
                return Ok(());
            }
            if let Some(tg) = target {
                let tn = t.get(tg).ok_or(Errno::ENOENT)?;
                match (ckind == NKind::Dir, tn.kind == NKind::Dir) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if tn.children().is_some_and(|c| !c.is_empty()) => {
                        return Err(Errno::ENOTEMPTY)
                    }
                    _ => {}
                }
                if ckind == NKind::File && !node_local_name(newname) {
                    prior = t.prior_of(tg, newparent, newname);
                }
                self.remove_name(&mut t, newparent, newname, tg);
            }
            let now = now_ns();
            if let Some(ch) = t.get_mut(parent).and_then(|p| p.children_mut()) {
                ch.remove(name);
            }
            t.get_mut(newparent)
                .and_then(|p| p.children_mut())
                .ok_or(Errno::ENOENT)?
                .insert(newname.to_vec(), child);
            reparent(&mut t, child, ckind, parent, newparent);
            if ckind == NKind::Dir && parent != newparent {
                if let Some(p) = t.get_mut(parent) {
                    p.attr.nlink = p.attr.nlink.saturating_sub(1);
                }
                if let Some(p) = t.get_mut(newparent) {
                    p.attr.nlink += 1;
                }
            }
            for i in [parent, newparent] {
                if let Some(n) = t.get_mut(i) {
                    n.attr.mtime_ns = now;
                    n.attr.ctime_ns = now;
                }
            }
            if let Some(n) = t.get_mut(child) {
                n.attr.ctime_ns = now;
                if n.kind == NKind::File {
                    n.local_only = node_local_name(newname);
                }
            }
            if let Some(prior) = prior {
                t.note_replacing_rename(child, (parent, name), (newparent, newname), prior);
            }
            // The old parent first: touching the child marks only its new place.
            t.touch(parent);
            t.touch(newparent);
            t.touch(child);
            Ok(())
        })
    }

    fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<FileAttr, Errno> {
        self.mutation(Op::Link, || {
            let newname = check_name(newname)?;
            if self.lookup_child(newparent, newname)?.is_some() {
                return Err(Errno::EEXIST);
            }
            let mut t = self.s.table.lock();
            let now = now_ns();
            let n = t.get_mut(ino).ok_or(Errno::ENOENT)?;
            if n.kind == NKind::Dir {
                return Err(Errno::EPERM);
            }
            n.attr.nlink += 1;
            n.attr.ctime_ns = now;
            n.parents.push(newparent);
            n.lookups += 1;
            let is_file = n.kind == NKind::File;
            let attr = attr_of(ino, n);
            let p = t.get_mut(newparent).ok_or(Errno::ENOENT)?;
            p.children_mut()
                .ok_or(Errno::ENOTDIR)?
                .insert(newname.to_vec(), ino);
            p.attr.mtime_ns = now;
            p.attr.ctime_ns = now;
            if is_file {
                t.files += 1;
            }
            t.touch(newparent);
            t.touch(ino);
            Ok(attr)
        })
    }

    /// ENOSYS once: the kernel then opens and closes files without a request (no OPEN, no
    /// RELEASE: two round trips less per open). Nothing here needs a file handle: data is
    /// keyed by inode, and an unlinked file lives until the kernel forgets its inode, which
    /// it cannot do while the file is open. O_TRUNC then arrives as SETATTR (no
    /// FUSE_ATOMIC_O_TRUNC, see init_config).
    fn open(&self, _ino: u64) -> Result<Opened, Errno> {
        self.s.count(Op::Open);
        Err(Errno::ENOSYS)
    }

    fn read(&self, ino: u64, _fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        self.enter(Op::Read)?;
        self.file_data(ino)
            .and_then(|d| d.read(&self.s.repo, offset, size).map_err(errno))
    }

    fn write(
        &self,
        c: &Caller,
        ino: u64,
        offset: u64,
        data: &[u8],
        kill_priv: bool,
    ) -> Result<u32, Errno> {
        if let Some(d) = self.s.faults.write_delay() {
            // Tests only (OWFS_FAULTS=fuse_write_delay_ms): a WRITE held before it is served.
            std::thread::sleep(d);
        }
        self.s.throttle();
        // The state change happens under the cut gate; copying the bytes into the cache file
        // does not, so a cut never waits for it (see FileData::write_begin).
        let (d, inflight) = self.mutation(Op::Write, || {
            let d = self.file_data(ino)?;
            let w = d
                .write_begin(&self.s.repo, offset, data)
                .map_err(errno)
                .inspect_err(|e| self.s.note_lost_write(ino, offset, data.len(), *e))?;
            if kill_priv {
                self.kill_suidgid_of(ino, c);
            }
            self.data_changed(ino, data.len() as u64);
            Ok((d, w))
        })?;
        let r = match inflight {
            Some(w) => d.write_end(w, offset, data).map_err(errno),
            None => Ok(()),
        };
        match r {
            Ok(()) => Ok(data.len() as u32),
            Err(e) => {
                // The length may have gone back: the attributes follow it.
                {
                    let _g = self.s.gate.read();
                    self.data_changed(ino, 0);
                }
                self.s.note_lost_write(ino, offset, data.len(), e);
                Err(e)
            }
        }
    }

    /// ENOSYS once: the kernel stops sending FLUSH on close (one round trip less).
    fn flush(&self, _ino: u64) -> Result<(), Errno> {
        self.s.count(Op::Flush);
        Err(Errno::ENOSYS)
    }

    /// Files created before the first open (see `open`) are still released.
    fn release(&self, _ino: u64, _fh: u64) -> Result<(), Errno> {
        self.s.count(Op::Release);
        Ok(())
    }

    fn fsync(&self, ino: u64, _datasync: bool) -> Result<(), Errno> {
        self.enter(Op::Fsync)?;
        // Local-disk durability; the store gets it at the next cut (or `owfs sync`).
        let d = {
            let t = self.s.table.lock();
            t.get(ino).and_then(|n| n.data()).cloned()
        };
        d.map(|d| d.sync_data()).unwrap_or(Ok(())).map_err(errno)
    }

    /// A snapshot of the directory's entries, read by READDIR(PLUS) at offsets into it.
    fn opendir(&self, ino: u64) -> Result<Opened, Errno> {
        self.enter(Op::Opendir)?;
        self.s.ensure_loaded(ino)?;
        let listing = {
            let t = self.s.table.lock();
            let n = t.get(ino).ok_or(Errno::ENOENT)?;
            let parent = match &n.body {
                Body::Dir { parent, .. } => *parent,
                _ => return Err(Errno::ENOTDIR),
            };
            let mut l: Listing = Vec::with_capacity(n.children().map(|c| c.len()).unwrap_or(0) + 2);
            l.push((b".".to_vec(), ino, FileType::Directory));
            l.push((b"..".to_vec(), parent, FileType::Directory));
            for (name, &c) in n.children().into_iter().flatten() {
                if let Some(cn) = t.get(c) {
                    l.push((name.clone(), c, ftype(cn.kind)));
                }
            }
            l
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(listing));
        Ok(Opened {
            fh,
            flags: DIR_OPEN_FLAGS,
        })
    }

    /// Entries from `offset` on, until `add` says the reply is full.
    fn readdir(&self, _ino: u64, fh: u64, offset: u64, add: &mut AddDirent) -> Result<(), Errno> {
        self.enter(Op::Readdir)?;
        let l = self.dirs.lock().get(&fh).cloned().ok_or(Errno::EBADF)?;
        for (i, (name, ino, kind)) in l.iter().enumerate().skip(offset as usize) {
            if add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    /// Like `readdir` with attributes; each entry added counts as a lookup.
    fn readdirplus(
        &self,
        _ino: u64,
        fh: u64,
        offset: u64,
        add: &mut AddDirentPlus,
    ) -> Result<(), Errno> {
        self.enter(Op::Readdirplus)?;
        let l = self.dirs.lock().get(&fh).cloned().ok_or(Errno::EBADF)?;
        let mut t = self.s.table.lock();
        for (i, (name, ino, _)) in l.iter().enumerate().skip(offset as usize) {
            let Some(n) = t.get_mut(*ino) else { continue };
            if add((i + 1) as u64, name, &attr_of(*ino, n)) {
                break;
            }
            if name != b"." && name != b".." {
                n.lookups += 1;
            }
        }
        Ok(())
    }

    fn releasedir(&self, _ino: u64, fh: u64) -> Result<(), Errno> {
        self.s.count(Op::Releasedir);
        self.dirs.lock().remove(&fh);
        Ok(())
    }

    fn fsyncdir(&self, ino: u64, datasync: bool) -> Result<(), Errno> {
        self.enter(Op::Fsyncdir)?;
        // fsync of the root directory: `sync` for programs that know only POSIX. fdatasync
        // of a directory is what SQLite does after every rollback-journal commit: local.
        if ino != ROOT || datasync {
            return Ok(());
        }
        let (_, lost) = self.s.sync_reporting_lost().map_err(|e| {
            eprintln!("owfs: {}: sync failed: {e}", self.s.ws);
            Errno::EIO
        })?;
        match lost {
            Some(why) => {
                eprintln!("owfs: {}: sync: {why}", self.s.ws);
                Err(Errno::EIO)
            }
            None => Ok(()),
        }
    }

    /// The cache directory's file system: what the working copy can still hold.
    fn statfs(&self, _ino: u64) -> Result<Statfs, Errno> {
        self.enter(Op::Statfs)?;
        let v = rustix::fs::statvfs(&self.s.cache_dir)
            .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
        Ok(Statfs {
            blocks: v.f_blocks,
            bfree: v.f_bfree,
            bavail: v.f_bavail,
            files: v.f_files,
            ffree: v.f_ffree,
            bsize: v.f_bsize as u32,
            namelen: 255,
            frsize: v.f_frsize as u32,
        })
    }

    fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<(), Errno> {
        self.change_xattrs(Op::Setxattr, ino, |x| {
            if !name.starts_with(b"user.") {
                return Err(Errno::EOPNOTSUPP);
            }
            if value.len() > XATTR_MAX {
                return Err(Errno::E2BIG);
            }
            let exists = x.contains_key(name);
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(Errno::EEXIST);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(Errno::ENODATA);
            }
            x.insert(name.to_vec(), value.to_vec());
            Ok(())
        })
    }

    fn getxattr(&self, ino: u64, name: &[u8], size: u32) -> Result<Xattr, Errno> {
        self.enter(Op::Getxattr)?;
        let t = self.s.table.lock();
        let n = t.get(ino).ok_or(Errno::ENOENT)?;
        Xattr::answer(n.xattrs.get(name).ok_or(Errno::ENODATA)?, size)
    }

    fn listxattr(&self, ino: u64, size: u32) -> Result<Xattr, Errno> {
        self.enter(Op::Listxattr)?;
        let t = self.s.table.lock();
        let n = t.get(ino).ok_or(Errno::ENOENT)?;
        Xattr::names(n.xattrs.keys(), size)
    }

    fn removexattr(&self, ino: u64, name: &[u8]) -> Result<(), Errno> {
        self.change_xattrs(Op::Removexattr, ino, |x| {
            x.remove(name).map(|_| ()).ok_or(Errno::ENODATA)
        })
    }

    fn fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        self.mutation(Op::Fallocate, || {
            let known =
                libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
            if mode & !known != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let d = self.file_data(ino).map_err(|_| Errno::ENODEV)?;
            d.fallocate(&self.s.repo, offset, length, mode)
                .map_err(errno)?;
            self.data_changed(ino, 0);
            Ok(())
        })
    }
}

fn reparent(t: &mut Table, child: u64, kind: NKind, from: u64, to: u64) {
    if let Some(n) = t.get_mut(child) {
        if kind == NKind::Dir {
            if let Body::Dir { parent, .. } = &mut n.body {
                *parent = to;
            }
        } else if let Some(i) = n.parents.iter().position(|p| *p == from) {
            n.parents[i] = to;
        }
    }
}
