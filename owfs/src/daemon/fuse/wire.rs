//! The FUSE wire format, for both transports: decode a request, call its operation, encode
//! the answer. Every opcode the kernel may send is decoded here and nowhere else: the
//! operations of [`Operations`], INIT (negotiated once, before anything else), FORGET and
//! BATCH_FORGET (never answered), INTERRUPT and DESTROY; any other opcode is answered ENOSYS,
//! after which the kernel stops sending it. Layouts are the kernel's
//! `include/uapi/linux/fuse.h`, native byte order. A request shorter than its opcode says
//! is answered EINVAL, never a panic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, InitFlags, RenameFlags, TimeOrNow};

use super::{Caller, InitConfig, Opened, Operations, SetAttr, Statfs, Xattr};

/// `struct fuse_in_header`.
pub(super) const IN_HEADER: usize = 40;
/// `struct fuse_out_header`.
pub(super) const OUT_HEADER: usize = 16;

/// The protocol version owfs speaks (what fuser 0.18 answered).
const KERNEL_MAJOR: u32 = 7;
const KERNEL_MINOR: u32 = 40;

pub(super) mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
}

// fuse_setattr_in.valid
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const FATTR_CTIME: u32 = 1 << 10;
// fuse_write_in.write_flags
const FUSE_WRITE_KILL_SUIDGID: u32 = 1 << 2;
// fuse_fsync_in.fsync_flags
const FUSE_FSYNC_FDATASYNC: u32 = 1 << 0;
// fuse_notify_code
const FUSE_NOTIFY_INVAL_INODE: i32 = 2;

/// The fixed part of a request: `struct fuse_in_header`.
#[derive(Debug, Clone, Copy)]
pub(super) struct InHeader {
    pub len: u32,
    pub opcode: u32,
    /// The kernel's id of the request; its answer carries it back.
    pub unique: u64,
    pub nodeid: u64,
    pub caller: Caller,
}

impl InHeader {
    pub(super) fn parse(b: &[u8]) -> Option<InHeader> {
        let mut r = Reader(b.get(..IN_HEADER)?);
        let len = r.u32()?;
        let opcode = r.u32()?;
        let unique = r.u64()?;
        let nodeid = r.u64()?;
        let (uid, gid, pid) = (r.u32()?, r.u32()?, r.u32()?);
        Some(InHeader {
            len,
            opcode,
            unique,
            nodeid,
            caller: Caller { uid, gid, pid },
        })
    }
}

/// `struct fuse_out_header` of an answer to request `unique`: `error` is 0 or a negative
/// errno, `body` the length of what follows.
pub(super) fn out_header(unique: u64, error: i32, body: usize) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[0..4].copy_from_slice(&((OUT_HEADER + body) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// A FUSE_NOTIFY_INVAL_INODE message (unique 0 marks a notification).
pub(super) fn notify_inval_inode(ino: u64, offset: i64, len: i64) -> Vec<u8> {
    let mut w = Writer::default();
    w.0.extend_from_slice(&out_header(0, FUSE_NOTIFY_INVAL_INODE, 24));
    w.u64(ino).u64(offset as u64).u64(len as u64);
    w.0
}

/// Little cursor over a request's arguments; None when the request is shorter than its
/// opcode says.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    }

    fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.bytes(n).map(|_| ())
    }

    /// A NUL-terminated name.
    fn name(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&c| c == 0)?;
        let s = self.bytes(end)?;
        self.skip(1)?;
        Some(s)
    }
}

/// A reply's arguments being built.
struct Writer(Vec<u8>);

impl Default for Writer {
    /// Room for the largest fixed answer (fuse_entry_out, 128 bytes) in one allocation.
    fn default() -> Writer {
        Writer(Vec::with_capacity(160))
    }
}

impl Writer {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }

    /// `struct fuse_attr`.
    fn attr(&mut self, a: &FileAttr) -> &mut Self {
        let (at, an) = secs_nsec(a.atime);
        let (mt, mn) = secs_nsec(a.mtime);
        let (ct, cn) = secs_nsec(a.ctime);
        self.u64(a.ino.0).u64(a.size).u64(a.blocks);
        self.u64(at).u64(mt).u64(ct).u32(an).u32(mn).u32(cn);
        self.u32(mode_bits(a.kind) | a.perm as u32).u32(a.nlink);
        self.u32(a.uid).u32(a.gid).u32(a.rdev).u32(a.blksize).u32(0)
    }

    /// `struct fuse_entry_out`: the node (generation 0), its entry and attributes valid
    /// for `ttl`.
    fn entry(&mut self, a: &FileAttr, ttl: Duration) -> &mut Self {
        self.u64(a.ino.0).u64(0);
        self.u64(ttl.as_secs()).u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos()).u32(ttl.subsec_nanos());
        self.attr(a)
    }

    /// `struct fuse_open_out`.
    fn open(&mut self, o: &Opened) -> &mut Self {
        self.u64(o.fh).u32(o.flags.bits()).u32(0)
    }

    /// `struct fuse_dirent` (name padded to 8 bytes), if it fits in `limit` bytes in all.
    fn dirent(&mut self, limit: usize, ino: u64, off: u64, kind: FileType, name: &[u8]) -> bool {
        let len = (24 + name.len()).next_multiple_of(8);
        if self.0.len() + len > limit {
            return false;
        }
        self.u64(ino).u64(off).u32(name.len() as u32);
        self.u32(mode_bits(kind) >> 12);
        self.0.extend_from_slice(name);
        self.0.resize(self.0.len().next_multiple_of(8), 0);
        true
    }
}

fn mode_bits(k: FileType) -> u32 {
    match k {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

/// `SystemTime` as fuse_attr's seconds (two's complement before the epoch, saturated at
/// i64's range) and nanoseconds.
fn secs_nsec(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => match i64::try_from(d.as_secs()) {
            Ok(s) => (s as u64, d.subsec_nanos()),
            Err(_) => (i64::MAX as u64, 999_999_999),
        },
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs(), d.subsec_nanos());
            if (s, n) >= (i64::MAX as u64 + 1, 0) {
                (i64::MIN as u64, 0)
            } else if n == 0 {
                ((s as i64).wrapping_neg() as u64, 0)
            } else {
                ((-(s as i64) - 1) as u64, 1_000_000_000 - n)
            }
        }
    }
}

fn time_of(secs: u64, nsec: u32) -> SystemTime {
    let s = secs as i64;
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn entry_out(r: Result<FileAttr, Errno>, ttl: Duration) -> Result<Vec<u8>, Errno> {
    let mut w = Writer::default();
    w.entry(&r?, ttl);
    Ok(w.0)
}

/// `struct fuse_attr_out`: attributes valid for `ttl`.
fn attr_out(r: Result<FileAttr, Errno>, ttl: Duration) -> Result<Vec<u8>, Errno> {
    let mut w = Writer::default();
    w.u64(ttl.as_secs())
        .u32(ttl.subsec_nanos())
        .u32(0)
        .attr(&r?);
    Ok(w.0)
}

fn open_out(r: Result<Opened, Errno>) -> Result<Vec<u8>, Errno> {
    let mut w = Writer::default();
    w.open(&r?);
    Ok(w.0)
}

fn empty(r: Result<(), Errno>) -> Result<Vec<u8>, Errno> {
    r.map(|()| Vec::new())
}

fn xattr_out(r: Result<Xattr, Errno>) -> Result<Vec<u8>, Errno> {
    match r? {
        Xattr::Size(n) => {
            let mut w = Writer::default();
            w.u32(n).u32(0);
            Ok(w.0)
        }
        Xattr::Data(v) => Ok(v),
    }
}

/// `struct fuse_kstatfs`.
fn statfs_out(r: Result<Statfs, Errno>) -> Result<Vec<u8>, Errno> {
    let v = r?;
    let mut w = Writer::default();
    w.u64(v.blocks).u64(v.bfree).u64(v.bavail);
    w.u64(v.files).u64(v.ffree);
    w.u32(v.bsize).u32(v.namelen).u32(v.frsize).u32(0);
    w.0.resize(80, 0);
    Ok(w.0)
}

/// What INIT settled.
#[derive(Debug, Clone, Copy)]
pub(super) struct Negotiated {
    /// Every capability the kernel offered.
    pub offered: InitFlags,
    /// The capabilities both sides use.
    pub flags: InitFlags,
    pub max_write: u32,
}

/// The answer to the kernel's INIT.
#[derive(Debug)]
pub(super) enum InitAnswer {
    /// The kernel speaks a newer major version: this tells it ours, and it sends INIT again.
    Retry(Vec<u8>),
    Accept(Vec<u8>, Negotiated),
    /// Answered with this error; the connection is unusable.
    Refuse(Errno),
}

/// Capabilities asked for whatever the file system wants (fuser 0.18's defaults).
const ALWAYS: InitFlags = InitFlags::FUSE_ASYNC_READ
    .union(InitFlags::FUSE_BIG_WRITES)
    .union(InitFlags::FUSE_MAX_PAGES);

/// Negotiates INIT (`struct fuse_init_in` in `args`): the capabilities of `cfg` the kernel
/// offers, and `cfg`'s limits within the kernel's.
pub(super) fn init(args: &[u8], cfg: &InitConfig) -> InitAnswer {
    let mut r = Reader(args);
    // The oldest layout has four fields; flags2 came with 7.36.
    let (Some(major), Some(minor), Some(kernel_readahead), Some(flags)) =
        (r.u32(), r.u32(), r.u32(), r.u32())
    else {
        return InitAnswer::Refuse(Errno::EPROTO);
    };
    let flags2 = r.u32().unwrap_or(0);
    if major > KERNEL_MAJOR {
        return InitAnswer::Retry(init_out(&InitOut {
            major: KERNEL_MAJOR,
            minor: KERNEL_MINOR,
            ..Default::default()
        }));
    }
    if (major, minor) < (7, 6) {
        return InitAnswer::Refuse(Errno::EPROTO);
    }
    let mut offered = flags as u64;
    if flags & InitFlags::FUSE_INIT_EXT.bits() as u32 != 0 {
        offered |= (flags2 as u64) << 32;
    }
    let offered = InitFlags::from_bits_retain(offered);
    let agreed = (ALWAYS | cfg.want | InitFlags::FUSE_INIT_EXT) & offered;
    let max_readahead = match cfg.max_readahead {
        Some(n) if n > 0 && n <= kernel_readahead => n,
        _ => kernel_readahead,
    };
    let max_write = cfg.max_write.max(1);
    let page = page_size();
    let max_pages = ((max_write.max(max_readahead).max(1) - 1) / page + 1).min(u16::MAX as u32);
    let bits = agreed.bits();
    let out = init_out(&InitOut {
        major: KERNEL_MAJOR,
        minor: KERNEL_MINOR,
        max_readahead,
        flags: bits as u32,
        max_background: cfg.max_background.max(1),
        congestion_threshold: cfg.congestion_threshold.clamp(1, cfg.max_background.max(1)),
        max_write,
        time_gran: cfg.time_gran,
        max_pages: max_pages as u16,
        flags2: (bits >> 32) as u32,
    });
    // Kernels before 7.23 read the answer's first 24 bytes only.
    let len = if minor < 23 { 24 } else { out.len() };
    InitAnswer::Accept(
        out[..len].to_vec(),
        Negotiated {
            offered,
            flags: agreed,
            max_write,
        },
    )
}

/// `struct fuse_init_out`'s fields that owfs sets.
#[derive(Default)]
struct InitOut {
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
    max_background: u16,
    congestion_threshold: u16,
    max_write: u32,
    time_gran: u32,
    max_pages: u16,
    flags2: u32,
}

/// `struct fuse_init_out` (64 bytes): max_stack_depth 0 (no passthrough), no request timeout.
fn init_out(o: &InitOut) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(o.major)
        .u32(o.minor)
        .u32(o.max_readahead)
        .u32(o.flags);
    w.u16(o.max_background).u16(o.congestion_threshold);
    w.u32(o.max_write).u32(o.time_gran);
    w.u16(o.max_pages).u16(0).u32(o.flags2);
    w.0.resize(64, 0);
    w.0
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u32,
        _ => 4096,
    }
}

/// Runs request `h`, whose arguments are `args`, on `ops`. Returns the answer's arguments or
/// error, or None for a request the kernel expects no answer to (FORGET, BATCH_FORGET). An
/// operation that panics is answered EIO, whichever transport carried it: the caller gets an
/// error and the serving thread goes on.
pub(super) fn dispatch<O: Operations>(
    ops: &O,
    h: &InHeader,
    args: &[u8],
) -> Option<Result<Vec<u8>, Errno>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_and_run(ops, h, args)
    }))
    .unwrap_or(Some(Err(Errno::EIO)))
}

fn decode_and_run<O: Operations>(
    ops: &O,
    h: &InHeader,
    args: &[u8],
) -> Option<Result<Vec<u8>, Errno>> {
    let mut r = Reader(args);
    match h.opcode {
        opcode::FORGET => {
            if let Some(n) = r.u64() {
                ops.forget(h.nodeid, n);
            }
            None
        }
        opcode::BATCH_FORGET => {
            let count = r.u32().unwrap_or(0);
            let _ = r.skip(4);
            for _ in 0..count {
                let (Some(ino), Some(n)) = (r.u64(), r.u64()) else {
                    break;
                };
                ops.forget(ino, n);
            }
            None
        }
        _ => Some(run(ops, h, &mut r).unwrap_or(Err(Errno::EINVAL))),
    }
}

fn run<O: Operations>(ops: &O, h: &InHeader, r: &mut Reader) -> Option<Result<Vec<u8>, Errno>> {
    use opcode::*;
    let (ino, c, ttl) = (h.nodeid, &h.caller, O::TTL);
    Some(match h.opcode {
        LOOKUP => entry_out(ops.lookup(ino, r.name()?), ttl),
        GETATTR => attr_out(ops.getattr(ino), ttl),
        SETATTR => {
            let valid = r.u32()?;
            r.skip(4 + 8)?; // padding, fh
            let size = r.u64()?;
            r.skip(8)?; // lock_owner
            let (atime, mtime, ctime) = (r.u64()?, r.u64()?, r.u64()?);
            let (atimensec, mtimensec, ctimensec) = (r.u32()?, r.u32()?, r.u32()?);
            let mode = r.u32()?;
            r.skip(4)?;
            let (uid, gid) = (r.u32()?, r.u32()?);
            let has = |f: u32| valid & f != 0;
            let when = |now: u32, set: u32, s: u64, n: u32| {
                if has(now) {
                    Some(TimeOrNow::Now)
                } else if has(set) {
                    Some(TimeOrNow::SpecificTime(time_of(s, n)))
                } else {
                    None
                }
            };
            let a = SetAttr {
                mode: has(FATTR_MODE).then_some(mode),
                uid: has(FATTR_UID).then_some(uid),
                gid: has(FATTR_GID).then_some(gid),
                size: has(FATTR_SIZE).then_some(size),
                atime: when(FATTR_ATIME_NOW, FATTR_ATIME, atime, atimensec),
                mtime: when(FATTR_MTIME_NOW, FATTR_MTIME, mtime, mtimensec),
                ctime: has(FATTR_CTIME).then(|| time_of(ctime, ctimensec)),
            };
            attr_out(ops.setattr(c, ino, a), ttl)
        }
        READLINK => ops.readlink(ino),
        SYMLINK => {
            let name = r.name()?;
            entry_out(ops.symlink(c, ino, name, r.name()?), ttl)
        }
        MKNOD => {
            let (mode, rdev) = (r.u32()?, r.u32()?);
            r.skip(8)?; // umask, padding
            entry_out(ops.mknod(c, ino, r.name()?, mode, rdev), ttl)
        }
        MKDIR => {
            let mode = r.u32()?;
            r.skip(4)?; // umask
            entry_out(ops.mkdir(c, ino, r.name()?, mode), ttl)
        }
        UNLINK => empty(ops.unlink(ino, r.name()?)),
        RMDIR => empty(ops.rmdir(ino, r.name()?)),
        RENAME | RENAME2 => {
            let newdir = r.u64()?;
            let flags = if h.opcode == RENAME2 {
                let f = r.u32()?;
                r.skip(4)?;
                f
            } else {
                0
            };
            let (old, new) = (r.name()?, r.name()?);
            let flags = RenameFlags::from_bits_retain(flags);
            empty(ops.rename(ino, old, newdir, new, flags))
        }
        LINK => {
            let old = r.u64()?;
            entry_out(ops.link(old, ino, r.name()?), ttl)
        }
        OPEN => {
            r.skip(8)?; // flags, open_flags
            open_out(ops.open(ino))
        }
        READ => {
            let (fh, off, size) = (r.u64()?, r.u64()?, r.u32()?);
            ops.read(ino, fh, off, size)
        }
        WRITE => {
            r.skip(8)?; // fh
            let (off, size, flags) = (r.u64()?, r.u32()?, r.u32()?);
            r.skip(16)?; // lock_owner, flags, padding
            let data = r.bytes(size as usize)?;
            let kill = flags & FUSE_WRITE_KILL_SUIDGID != 0;
            ops.write(c, ino, off, data, kill).map(|n| {
                let mut w = Writer::default();
                w.u32(n).u32(0);
                w.0
            })
        }
        STATFS => statfs_out(ops.statfs(ino)),
        RELEASE => empty(ops.release(ino, r.u64()?)),
        FSYNC => {
            r.skip(8)?; // fh
            let datasync = r.u32()? & FUSE_FSYNC_FDATASYNC != 0;
            empty(ops.fsync(ino, datasync))
        }
        SETXATTR => {
            let (size, flags) = (r.u32()?, r.u32()?);
            // FUSE_SETXATTR_EXT (not asked for) would add two more words.
            let name = r.name()?;
            let value = r.bytes(size as usize)?;
            empty(ops.setxattr(ino, name, value, flags as i32))
        }
        GETXATTR => {
            let size = r.u32()?;
            r.skip(4)?;
            xattr_out(ops.getxattr(ino, r.name()?, size))
        }
        LISTXATTR => xattr_out(ops.listxattr(ino, r.u32()?)),
        REMOVEXATTR => empty(ops.removexattr(ino, r.name()?)),
        FLUSH => {
            r.skip(8)?; // fh
            empty(ops.flush(ino))
        }
        OPENDIR => {
            r.skip(8)?; // flags, open_flags
            open_out(ops.opendir(ino))
        }
        READDIR => {
            let (fh, off, size) = (r.u64()?, r.u64()?, r.u32()? as usize);
            let mut w = Writer::default();
            ops.readdir(ino, fh, off, &mut |ino, off, kind, name| {
                !w.dirent(size, ino, off, kind, name)
            })
            .map(|()| w.0)
        }
        READDIRPLUS => {
            let (fh, off, size) = (r.u64()?, r.u64()?, r.u32()? as usize);
            let mut w = Writer::default();
            ops.readdirplus(ino, fh, off, &mut |off, name, attr| {
                // fuse_direntplus: fuse_entry_out (128 bytes), then the dirent.
                let len = (128 + 24 + name.len()).next_multiple_of(8);
                if w.0.len() + len > size {
                    return true;
                }
                w.entry(attr, ttl);
                w.dirent(usize::MAX, attr.ino.0, off, attr.kind, name);
                false
            })
            .map(|()| w.0)
        }
        RELEASEDIR => empty(ops.releasedir(ino, r.u64()?)),
        FSYNCDIR => {
            r.skip(8)?; // fh
            let datasync = r.u32()? & FUSE_FSYNC_FDATASYNC != 0;
            empty(ops.fsyncdir(ino, datasync))
        }
        CREATE => {
            let (_flags, mode) = (r.u32()?, r.u32()?);
            r.skip(8)?; // umask, open_flags
            ops.create(c, ino, r.name()?, mode).map(|(attr, opened)| {
                let mut w = Writer::default();
                w.entry(&attr, ttl).open(&opened);
                w.0
            })
        }
        FALLOCATE => {
            r.skip(8)?; // fh
            let (off, len, mode) = (r.u64()?, r.u64()?, r.u32()?);
            empty(ops.fallocate(ino, off, len, mode as i32))
        }
        // INIT is answered once, before any other request (`init`).
        INIT => Err(Errno::EIO),
        // Interrupting is not supported: ENOSYS makes the kernel stop sending INTERRUPTs,
        // and each interrupted request is answered when it completes.
        INTERRUPT => Err(Errno::ENOSYS),
        DESTROY => Ok(Vec::new()),
        // ACCESS, GETLK, SETLK, BMAP, IOCTL, POLL, LSEEK, COPY_FILE_RANGE, TMPFILE, STATX and
        // whatever comes next: the kernel stops asking (or does the work itself).
        _ => Err(Errno::ENOSYS),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use fuser::{FopenFlags, INodeNo};

    use super::*;

    /// A file system that records each call it gets and answers fixed values.
    #[derive(Default)]
    struct Probe(Mutex<Vec<String>>);

    impl Probe {
        fn note(&self, s: String) {
            self.0.lock().unwrap().push(s);
        }

        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn attr(ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 5,
            blocks: 1,
            atime: UNIX_EPOCH + Duration::new(10, 1),
            mtime: UNIX_EPOCH + Duration::new(20, 2),
            ctime: UNIX_EPOCH - Duration::from_millis(1500),
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o644,
            nlink: 1,
            uid: 7,
            gid: 8,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn s(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    impl Operations for Probe {
        const TTL: Duration = Duration::new(3, 500);

        fn lookup(&self, parent: u64, name: &[u8]) -> Result<FileAttr, Errno> {
            self.note(format!("lookup {parent} {}", s(name)));
            Ok(attr(9))
        }
        fn forget(&self, ino: u64, n: u64) {
            self.note(format!("forget {ino} {n}"));
        }
        fn getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
            self.note(format!("getattr {ino}"));
            Ok(attr(ino))
        }
        fn setattr(&self, c: &Caller, ino: u64, a: SetAttr) -> Result<FileAttr, Errno> {
            self.note(format!("setattr {c:?} {ino} {a:?}"));
            Ok(attr(ino))
        }
        fn mkdir(
            &self,
            c: &Caller,
            parent: u64,
            name: &[u8],
            mode: u32,
        ) -> Result<FileAttr, Errno> {
            self.note(format!("mkdir {c:?} {parent} {} {mode:o}", s(name)));
            Err(Errno::EEXIST)
        }
        fn rename(
            &self,
            parent: u64,
            name: &[u8],
            newparent: u64,
            newname: &[u8],
            flags: RenameFlags,
        ) -> Result<(), Errno> {
            let (a, b) = (s(name), s(newname));
            self.note(format!(
                "rename {parent} {a} {newparent} {b} {}",
                flags.bits()
            ));
            Ok(())
        }
        fn write(
            &self,
            c: &Caller,
            ino: u64,
            offset: u64,
            data: &[u8],
            kill: bool,
        ) -> Result<u32, Errno> {
            self.note(format!("write {} {ino} {offset} {} {kill}", c.uid, s(data)));
            Ok(data.len() as u32)
        }
        fn opendir(&self, ino: u64) -> Result<Opened, Errno> {
            self.note(format!("opendir {ino}"));
            Ok(Opened {
                fh: 42,
                flags: FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            })
        }
        fn readdir(
            &self,
            ino: u64,
            fh: u64,
            off: u64,
            add: &mut super::super::AddDirent,
        ) -> Result<(), Errno> {
            self.note(format!("readdir {ino} {fh} {off}"));
            for i in off..4 {
                if add(
                    100 + i,
                    i + 1,
                    FileType::Directory,
                    format!("e{i}").as_bytes(),
                ) {
                    break;
                }
            }
            Ok(())
        }
        fn getxattr(&self, ino: u64, name: &[u8], size: u32) -> Result<Xattr, Errno> {
            self.note(format!("getxattr {ino} {} {size}", s(name)));
            Ok(if size == 0 {
                Xattr::Size(3)
            } else {
                Xattr::Data(b"abc".to_vec())
            })
        }
    }

    fn header(opcode: u32, nodeid: u64, args: usize) -> InHeader {
        InHeader {
            len: (IN_HEADER + args) as u32,
            opcode,
            unique: 77,
            nodeid,
            caller: Caller {
                uid: 1000,
                gid: 100,
                pid: 4242,
            },
        }
    }

    /// The codec itself, without the panic guard of `dispatch`: a decoding panic fails the test.
    fn call(p: &Probe, opcode: u32, nodeid: u64, args: &[u8]) -> Option<Result<Vec<u8>, Errno>> {
        decode_and_run(p, &header(opcode, nodeid, args.len()), args)
    }

    fn ne32(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn ne64(b: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn names_and_short_requests() {
        let mut r = Reader(b"abc\0def\0");
        assert_eq!(r.name(), Some(&b"abc"[..]));
        assert_eq!(r.name(), Some(&b"def"[..]));
        assert_eq!(r.name(), None);
        let mut r = Reader(&[1, 0, 0]);
        assert_eq!(r.u32(), None);
    }

    #[test]
    fn the_header_carries_the_caller() {
        let mut b = Writer::default();
        b.u32(52).u32(opcode::GETATTR).u64(77).u64(5);
        b.u32(1000).u32(100).u32(4242).u32(0);
        b.u64(0).u64(0).u32(0); // fuse_getattr_in
        let h = InHeader::parse(&b.0).unwrap();
        assert_eq!((h.len, h.opcode, h.unique, h.nodeid), (52, 3, 77, 5));
        assert_eq!(
            h.caller,
            Caller {
                uid: 1000,
                gid: 100,
                pid: 4242
            }
        );
        assert!(InHeader::parse(&b.0[..39]).is_none());
    }

    #[test]
    fn dirents_are_padded_and_bounded() {
        let mut w = Writer::default();
        assert!(w.dirent(64, 7, 1, FileType::RegularFile, b"a"));
        assert_eq!(w.0.len(), 32);
        assert_eq!(u32::from_ne_bytes(w.0[20..24].try_into().unwrap()), 8); // DT_REG
        assert!(!w.dirent(64, 8, 2, FileType::Directory, b"a-longer-name"));
        assert_eq!(w.0.len(), 32);
    }

    #[test]
    fn times_before_the_epoch_round_trip() {
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        let (s, n) = secs_nsec(t);
        assert_eq!((s as i64, n), (-2, 500_000_000));
        assert_eq!(time_of(s, n), t);
        let (s, n) = secs_nsec(UNIX_EPOCH - Duration::from_secs(3));
        assert_eq!((s as i64, n), (-3, 0));
    }

    /// `struct fuse_init_in` (7.x, 64 bytes) offering `flags`.
    fn init_in(major: u32, minor: u32, readahead: u32, flags: u64) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(major).u32(minor).u32(readahead);
        w.u32(flags as u32).u32((flags >> 32) as u32);
        w.0.resize(64, 0);
        w.0
    }

    fn rw_config() -> InitConfig {
        InitConfig {
            want: InitFlags::FUSE_WRITEBACK_CACHE
                | InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_HANDLE_KILLPRIV_V2
                | InitFlags::FUSE_OVER_IO_URING,
            max_write: 1 << 20,
            max_readahead: Some(1 << 20),
            max_background: 64,
            congestion_threshold: 48,
            time_gran: 1,
        }
    }

    #[test]
    fn init_asks_for_what_the_kernel_offers_of_what_is_wanted() {
        let offered = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_WRITEBACK_CACHE
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_INIT_EXT
            | InitFlags::FUSE_OVER_IO_URING;
        let InitAnswer::Accept(out, n) =
            init(&init_in(7, 45, 4 << 20, offered.bits()), &rw_config())
        else {
            panic!("refused")
        };
        let want = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_WRITEBACK_CACHE
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_INIT_EXT
            | InitFlags::FUSE_OVER_IO_URING;
        assert_eq!(n.flags, want);
        assert_eq!(n.offered, offered);
        assert_eq!(n.max_write, 1 << 20);
        assert_eq!(out.len(), 64);
        assert_eq!((ne32(&out, 0), ne32(&out, 4)), (7, 40));
        assert_eq!(ne32(&out, 8), 1 << 20); // max_readahead: ours, below the kernel's
        let flags = ne32(&out, 12) as u64 | (ne32(&out, 32) as u64) << 32;
        assert_eq!(flags, want.bits());
        assert_eq!(u16::from_ne_bytes([out[16], out[17]]), 64); // max_background
        assert_eq!(u16::from_ne_bytes([out[18], out[19]]), 48); // congestion_threshold
        assert_eq!(ne32(&out, 20), 1 << 20); // max_write
        assert_eq!(ne32(&out, 24), 1); // time_gran
        let pages = u16::from_ne_bytes([out[28], out[29]]) as u32;
        assert_eq!(pages, (1 << 20) / page_size());
        assert_eq!(ne32(&out, 36), 0); // max_stack_depth
    }

    #[test]
    fn init_keeps_the_kernels_readahead_when_it_is_smaller() {
        let f = InitFlags::FUSE_ASYNC_READ.bits();
        let InitAnswer::Accept(out, n) = init(&init_in(7, 45, 128 << 10, f), &rw_config()) else {
            panic!("refused")
        };
        assert_eq!(ne32(&out, 8), 128 << 10);
        // Without FUSE_INIT_EXT the upper half is neither read nor sent.
        assert_eq!(n.flags, InitFlags::FUSE_ASYNC_READ);
        assert_eq!(ne32(&out, 32), 0);
        // The defaults (the read-only mount): fuser's.
        let InitAnswer::Accept(out, _) = init(&init_in(7, 45, 128 << 10, f), &Default::default())
        else {
            panic!("refused")
        };
        assert_eq!(ne32(&out, 8), 128 << 10);
        assert_eq!(ne32(&out, 20), 16 << 20);
        assert_eq!(u16::from_ne_bytes([out[16], out[17]]), 16);
        assert_eq!(u16::from_ne_bytes([out[18], out[19]]), 12);
    }

    #[test]
    fn init_answers_old_and_new_kernels_in_their_terms() {
        let cfg = rw_config();
        match init(&init_in(8, 0, 0, 0), &cfg) {
            InitAnswer::Retry(out) => {
                assert_eq!((ne32(&out, 0), ne32(&out, 4)), (7, 40));
                assert!(out[8..].iter().all(|&b| b == 0));
            }
            a => panic!("{a:?}"),
        }
        assert!(matches!(
            init(&init_in(7, 5, 0, 0), &cfg),
            InitAnswer::Refuse(Errno::EPROTO)
        ));
        for (minor, len) in [(6, 24), (22, 24), (23, 64)] {
            let InitAnswer::Accept(out, _) = init(&init_in(7, minor, 4096, 0), &cfg) else {
                panic!("refused")
            };
            assert_eq!(out.len(), len, "minor {minor}");
        }
        // Four fields are the least an INIT carries.
        let short = init_in(7, 45, 4096, 0);
        assert!(matches!(init(&short[..12], &cfg), InitAnswer::Refuse(_)));
        assert!(matches!(init(&short[..16], &cfg), InitAnswer::Accept(..)));
    }

    #[test]
    fn forgets_are_never_answered() {
        let p = Probe::default();
        assert_eq!(call(&p, opcode::FORGET, 5, &3u64.to_ne_bytes()), None);
        let mut b = Writer::default();
        b.u32(3).u32(0).u64(6).u64(1).u64(7).u64(2);
        // Three announced, two present: those two are forgotten.
        assert_eq!(call(&p, opcode::BATCH_FORGET, 0, &b.0), None);
        assert_eq!(call(&p, opcode::FORGET, 5, &[1, 2]), None);
        assert_eq!(p.calls(), ["forget 5 3", "forget 6 1", "forget 7 2"]);
    }

    #[test]
    fn answers_carry_the_file_systems_ttl_and_flags() {
        let p = Probe::default();
        let out = call(&p, opcode::LOOKUP, 1, b"name\0").unwrap().unwrap();
        assert_eq!(out.len(), 128);
        assert_eq!(ne64(&out, 0), 9); // nodeid
        assert_eq!((ne64(&out, 16), ne64(&out, 24)), (3, 3)); // entry, attr valid
        assert_eq!((ne32(&out, 32), ne32(&out, 36)), (500, 500));
        assert_eq!(ne32(&out, 40 + 60), libc::S_IFREG | 0o644); // mode
        let ctime = ne64(&out, 40 + 40) as i64;
        assert_eq!(ctime, -2);
        let out = call(&p, opcode::GETATTR, 4, &[0; 16]).unwrap().unwrap();
        assert_eq!(out.len(), 104);
        assert_eq!((ne64(&out, 0), ne32(&out, 8)), (3, 500));
        assert_eq!(ne64(&out, 16), 4);
        let out = call(&p, opcode::OPENDIR, 4, &[0; 8]).unwrap().unwrap();
        assert_eq!(ne64(&out, 0), 42);
        let keep = FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR;
        assert_eq!(ne32(&out, 8), keep.bits());
        // Not implemented by the probe: the trait's defaults.
        let out = call(&p, opcode::OPEN, 4, &[0; 8]).unwrap().unwrap();
        assert_eq!(out, [0; 16]);
        assert_eq!(
            call(&p, opcode::SYMLINK, 1, b"a\0b\0"),
            Some(Err(Errno::EPERM))
        );
        assert_eq!(
            call(&p, opcode::READ, 1, &[0; 40]),
            Some(Err(Errno::ENOSYS))
        );
        assert_eq!(call(&p, opcode::RELEASE, 1, &[0; 24]), Some(Ok(vec![])));
        let out = call(&p, opcode::STATFS, 1, &[]).unwrap().unwrap();
        assert_eq!(out.len(), 80);
        assert_eq!((ne32(&out, 40), ne32(&out, 44)), (512, 255));
        assert_eq!(p.calls(), ["lookup 1 name", "getattr 4", "opendir 4"]);
    }

    #[test]
    fn requests_decode_their_arguments() {
        let p = Probe::default();
        // SETATTR: mode and mtime "now", from uid 1000.
        let mut b = Writer::default();
        b.u32(FATTR_MODE | FATTR_MTIME | FATTR_MTIME_NOW)
            .u32(0)
            .u64(0);
        b.u64(0).u64(0).u64(0).u64(0).u64(0);
        b.u32(0)
            .u32(0)
            .u32(0)
            .u32(0o4755)
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(0);
        assert_eq!(b.0.len(), 88);
        call(&p, opcode::SETATTR, 3, &b.0).unwrap().unwrap();
        // MKDIR: mode, umask, name.
        let mut b = Writer::default();
        b.u32(0o755).u32(0o22);
        b.0.extend_from_slice(b"dir\0");
        assert_eq!(call(&p, opcode::MKDIR, 1, &b.0), Some(Err(Errno::EEXIST)));
        // RENAME2 with flags, RENAME without.
        let mut b = Writer::default();
        b.u64(2).u32(1).u32(0);
        b.0.extend_from_slice(b"a\0b\0");
        assert_eq!(call(&p, opcode::RENAME2, 1, &b.0), Some(Ok(vec![])));
        let mut b = Writer::default();
        b.u64(2);
        b.0.extend_from_slice(b"c\0d\0");
        assert_eq!(call(&p, opcode::RENAME, 1, &b.0), Some(Ok(vec![])));
        // WRITE: fh, offset, size, write_flags (KILL_SUIDGID), lock_owner, flags, padding, data.
        let mut b = Writer::default();
        b.u64(0).u64(4096).u32(3).u32(FUSE_WRITE_KILL_SUIDGID);
        b.u64(0).u32(0).u32(0);
        b.0.extend_from_slice(b"xyz");
        let out = call(&p, opcode::WRITE, 5, &b.0).unwrap().unwrap();
        assert_eq!(out, [3, 0, 0, 0, 0, 0, 0, 0]);
        // GETXATTR: size 0 asks for the length.
        let mut b = Writer::default();
        b.u32(0).u32(0);
        b.0.extend_from_slice(b"user.x\0");
        assert_eq!(
            call(&p, opcode::GETXATTR, 5, &b.0),
            Some(Ok(vec![3, 0, 0, 0, 0, 0, 0, 0]))
        );
        assert_eq!(
            p.calls(),
            [
                "setattr Caller { uid: 1000, gid: 100, pid: 4242 } 3 SetAttr { mode: Some(2541), \
                 uid: None, gid: None, size: None, atime: None, mtime: Some(Now), ctime: None }",
                "mkdir Caller { uid: 1000, gid: 100, pid: 4242 } 1 dir 755",
                "rename 1 a 2 b 1",
                "rename 1 c 2 d 0",
                "write 1000 5 4096 xyz true",
                "getxattr 5 user.x 0",
            ]
        );
    }

    #[test]
    fn readdir_fills_at_most_the_size_asked_for() {
        let p = Probe::default();
        let mut b = Writer::default();
        b.u64(42).u64(1).u32(64).u32(0).u64(0).u32(0).u32(0);
        let out = call(&p, opcode::READDIR, 1, &b.0).unwrap().unwrap();
        // Two 32-byte entries fit in 64: e1 and e2, the next at offsets 2 and 3.
        assert_eq!(out.len(), 64);
        assert_eq!((ne64(&out, 0), ne64(&out, 8)), (101, 2));
        assert_eq!((ne64(&out, 32), ne64(&out, 40)), (102, 3));
        assert_eq!(&out[56..58], b"e2");
        assert_eq!(p.calls(), ["readdir 1 42 1"]);
    }

    #[test]
    fn other_opcodes_are_answered_as_fuser_did() {
        let p = Probe::default();
        assert_eq!(
            call(&p, opcode::INTERRUPT, 0, &[0; 8]),
            Some(Err(Errno::ENOSYS))
        );
        assert_eq!(call(&p, opcode::DESTROY, 0, &[]), Some(Ok(vec![])));
        assert_eq!(call(&p, opcode::INIT, 0, &[0; 64]), Some(Err(Errno::EIO)));
        // ACCESS, LSEEK, STATX, and an opcode no kernel sends.
        for op in [34, 46, 52, 9999] {
            assert_eq!(call(&p, op, 1, &[0; 64]), Some(Err(Errno::ENOSYS)), "{op}");
        }
        assert!(p.calls().is_empty());
    }

    /// Every opcode with every truncation of a plausible argument block, and with noise:
    /// answered (EINVAL when short), never a panic, never an answer longer than asked.
    /// An operation that panics is answered EIO, and the thread that ran it goes on.
    #[test]
    fn a_panicking_operation_is_answered_eio() {
        struct Panics;
        impl Operations for Panics {
            const TTL: Duration = Duration::from_secs(1);
            fn getattr(&self, _ino: u64) -> Result<FileAttr, Errno> {
                panic!("an operation's bug");
            }
        }
        let h = header(opcode::GETATTR, 1, 16);
        assert_eq!(dispatch(&Panics, &h, &[0u8; 16]), Some(Err(Errno::EIO)));
        assert_eq!(dispatch(&Panics, &h, &[0u8; 16]), Some(Err(Errno::EIO)));
    }

    #[test]
    fn hostile_requests_do_not_panic() {
        let p = Probe::default();
        let mut full = Writer::default();
        full.u64(42)
            .u64(3)
            .u32(64)
            .u32(u32::MAX)
            .u64(1)
            .u32(2)
            .u32(3);
        full.0.extend_from_slice(b"name\0target\0");
        full.0.resize(160, 0xff);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for op in 0..=60 {
            for cut in 0..=full.0.len() {
                let r = call(&p, op, 1, &full.0[..cut]);
                // A directory read asks for at most 64 bytes here (the u32 at offset 16).
                if matches!(op, opcode::READDIR | opcode::READDIRPLUS) {
                    if let Some(Ok(v)) = &r {
                        assert!(v.len() <= 64, "opcode {op}: {} bytes for 64 asked", v.len());
                    }
                }
            }
            for len in [0, 1, 7, 8, 15, 16, 40, 100, 300] {
                let noise: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                let _ = call(&p, op, seed, &noise);
            }
        }
        // A WRITE whose size claims more than it carries is refused.
        let mut b = Writer::default();
        b.u64(0).u64(0).u32(1000).u32(0).u64(0).u32(0).u32(0);
        b.0.extend_from_slice(b"short");
        assert_eq!(call(&p, opcode::WRITE, 5, &b.0), Some(Err(Errno::EINVAL)));
        assert_eq!(
            call(&p, opcode::LOOKUP, 1, b"no-nul"),
            Some(Err(Errno::EINVAL))
        );
    }

    #[test]
    fn inval_inode_is_a_notification() {
        let m = notify_inval_inode(12, -1, 0);
        assert_eq!(m.len(), 40);
        assert_eq!(ne32(&m, 0), 40);
        assert_eq!(ne32(&m, 4) as i32, FUSE_NOTIFY_INVAL_INODE);
        assert_eq!(ne64(&m, 8), 0);
        assert_eq!(
            (ne64(&m, 16), ne64(&m, 24) as i64, ne64(&m, 32)),
            (12, -1, 0)
        );
    }
}
