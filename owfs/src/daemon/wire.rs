//! The FUSE wire format of the requests that arrive through io_uring (fuser decodes those
//! that come through /dev/fuse): decode a request, run its operation, encode the reply.
//! Layouts are the kernel's `include/uapi/linux/fuse.h`, native byte order.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, RenameFlags, TimeOrNow};

use super::ops::{Caller, OwfsFs, SetAttr, Xattr, DIR_OPEN_FLAGS, TTL};

/// `struct fuse_in_header`.
pub(super) const IN_HEADER: usize = 40;

mod opcode {
    pub const LOOKUP: u32 = 1;
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
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
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

/// The fixed part of a request: `struct fuse_in_header`.
#[derive(Debug, Clone, Copy)]
pub(super) struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub nodeid: u64,
    pub caller: Caller,
}

impl InHeader {
    pub(super) fn parse(b: &[u8]) -> Option<InHeader> {
        let mut r = Reader(b.get(..IN_HEADER)?);
        let len = r.u32()?;
        let opcode = r.u32()?;
        r.skip(8)?; // unique: the ring entry carries it (commit_id)
        let nodeid = r.u64()?;
        let (uid, gid, pid) = (r.u32()?, r.u32()?, r.u32()?);
        Some(InHeader {
            len,
            opcode,
            nodeid,
            caller: Caller { uid, gid, pid },
        })
    }
}

/// Little cursor over a request's arguments; None when the request is shorter than its
/// opcode says (answered with EINVAL, never a panic).
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
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
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

    /// `struct fuse_entry_out`: the node, its entry and attributes valid for `ttl`.
    fn entry(&mut self, a: &FileAttr, ttl: Duration) -> &mut Self {
        self.u64(a.ino.0).u64(0);
        self.u64(ttl.as_secs()).u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos()).u32(ttl.subsec_nanos());
        self.attr(a)
    }

    /// `struct fuse_open_out`.
    fn open(&mut self, fh: u64, flags: u32) -> &mut Self {
        self.u64(fh).u32(flags).u32(0)
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

/// `SystemTime` as fuse_attr's seconds (two's complement before the epoch) and nanoseconds.
fn secs_nsec(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (mut s, mut n) = (-(d.as_secs() as i64), d.subsec_nanos());
            if n > 0 {
                s -= 1;
                n = 1_000_000_000 - n;
            }
            (s as u64, n)
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

fn entry_out(r: Result<FileAttr, Errno>) -> Result<Vec<u8>, Errno> {
    let mut w = Writer::default();
    w.entry(&r?, TTL);
    Ok(w.0)
}

/// `struct fuse_attr_out`: attributes valid for TTL.
fn attr_out(r: Result<FileAttr, Errno>) -> Result<Vec<u8>, Errno> {
    let mut w = Writer::default();
    w.u64(TTL.as_secs())
        .u32(TTL.subsec_nanos())
        .u32(0)
        .attr(&r?);
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

/// Runs the request `h` whose arguments are `args`; returns the reply's arguments.
pub(super) fn dispatch(fs: &OwfsFs, h: &InHeader, args: &[u8]) -> Result<Vec<u8>, Errno> {
    run(fs, h, &mut Reader(args)).unwrap_or(Err(Errno::EINVAL))
}

fn run(fs: &OwfsFs, h: &InHeader, r: &mut Reader) -> Option<Result<Vec<u8>, Errno>> {
    use opcode::*;
    let (ino, c) = (h.nodeid, &h.caller);
    Some(match h.opcode {
        LOOKUP => entry_out(fs.op_lookup(ino, r.name()?)),
        GETATTR => attr_out(fs.op_getattr(ino)),
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
            attr_out(fs.op_setattr(c, ino, a))
        }
        READLINK => fs.op_readlink(ino),
        SYMLINK => {
            let name = r.name()?;
            entry_out(fs.op_symlink(c, ino, name, r.name()?))
        }
        MKNOD => {
            let (mode, rdev) = (r.u32()?, r.u32()?);
            r.skip(8)?; // umask, padding
            entry_out(fs.op_mknod(c, ino, r.name()?, mode, rdev))
        }
        MKDIR => {
            let mode = r.u32()?;
            r.skip(4)?; // umask
            entry_out(fs.op_mkdir(c, ino, r.name()?, mode))
        }
        UNLINK => empty(fs.op_unlink(ino, r.name()?)),
        RMDIR => empty(fs.op_rmdir(ino, r.name()?)),
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
            empty(fs.op_rename(ino, old, newdir, new, flags))
        }
        LINK => {
            let old = r.u64()?;
            entry_out(fs.op_link(old, ino, r.name()?))
        }
        OPEN => Err(fs.op_open()),
        READ => {
            r.skip(8)?; // fh
            let (off, size) = (r.u64()?, r.u32()?);
            fs.op_read(ino, off, size)
        }
        WRITE => {
            r.skip(8)?; // fh
            let (off, size, flags) = (r.u64()?, r.u32()?, r.u32()?);
            r.skip(16)?; // lock_owner, flags, padding
            let data = r.bytes(size as usize)?;
            let kill = flags & FUSE_WRITE_KILL_SUIDGID != 0;
            fs.op_write(c, ino, off, data, kill).map(|n| {
                let mut w = Writer::default();
                w.u32(n).u32(0);
                w.0
            })
        }
        STATFS => fs.op_statfs().map(|v| {
            let mut w = Writer::default();
            w.u64(v.f_blocks).u64(v.f_bfree).u64(v.f_bavail);
            w.u64(v.f_files).u64(v.f_ffree);
            w.u32(v.f_bsize as u32)
                .u32(255)
                .u32(v.f_frsize as u32)
                .u32(0);
            w.0.resize(80, 0);
            w.0
        }),
        RELEASE => {
            fs.op_release();
            Ok(Vec::new())
        }
        FSYNC => empty(fs.op_fsync(ino)),
        SETXATTR => {
            let (size, flags) = (r.u32()?, r.u32()?);
            // FUSE_SETXATTR_EXT (not asked for) would add two more words.
            let name = r.name()?;
            let value = r.bytes(size as usize)?;
            empty(fs.op_setxattr(ino, name, value, flags as i32))
        }
        GETXATTR => {
            let size = r.u32()?;
            r.skip(4)?;
            xattr_out(fs.op_getxattr(ino, r.name()?, size))
        }
        LISTXATTR => xattr_out(fs.op_listxattr(ino, r.u32()?)),
        REMOVEXATTR => empty(fs.op_removexattr(ino, r.name()?)),
        FLUSH => Err(fs.op_flush()),
        OPENDIR => fs.op_opendir(ino).map(|fh| {
            let mut w = Writer::default();
            w.open(fh, DIR_OPEN_FLAGS.bits());
            w.0
        }),
        READDIR => {
            let (fh, off, size) = (r.u64()?, r.u64()?, r.u32()? as usize);
            let mut w = Writer::default();
            fs.op_readdir(fh, off, |ino, off, kind, name| {
                !w.dirent(size, ino, off, kind, name)
            })
            .map(|()| w.0)
        }
        READDIRPLUS => {
            let (fh, off, size) = (r.u64()?, r.u64()?, r.u32()? as usize);
            let mut w = Writer::default();
            fs.op_readdirplus(fh, off, |off, name, attr| {
                // fuse_direntplus: fuse_entry_out (128 bytes), then the dirent.
                let len = (128 + 24 + name.len()).next_multiple_of(8);
                if w.0.len() + len > size {
                    return true;
                }
                w.entry(attr, TTL);
                w.dirent(usize::MAX, attr.ino.0, off, attr.kind, name);
                false
            })
            .map(|()| w.0)
        }
        RELEASEDIR => {
            fs.op_releasedir(r.u64()?);
            Ok(Vec::new())
        }
        FSYNCDIR => {
            r.skip(8)?; // fh
            let datasync = r.u32()? & FUSE_FSYNC_FDATASYNC != 0;
            empty(fs.op_fsyncdir(ino, datasync))
        }
        CREATE => Err(fs.op_create()),
        DESTROY => Ok(Vec::new()),
        FALLOCATE => {
            r.skip(8)?; // fh
            let (off, len, mode) = (r.u64()?, r.u64()?, r.u32()?);
            empty(fs.op_fallocate(ino, off, len, mode as i32))
        }
        // What fuser answers for the operations we do not implement: the kernel then stops
        // asking (ACCESS, LSEEK, COPY_FILE_RANGE, IOCTL, POLL, BMAP, TMPFILE, STATX...).
        _ => Err(Errno::ENOSYS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
