//! The FUSE transport: mounting, the one decoder of the kernel's requests, and the two ways
//! requests arrive. A file system implements [`Operations`] (plain arguments in, plain answers
//! out); the transports call it, and the operations never call a transport (the io_uring
//! queues still reach the read-write daemon's `Shared` to halt and count, see
//! docs/decisions/one-fuse-decoder.md).
//!
//! - `mount.rs`: mount(2) as root, `fusermount3` otherwise; unmount when the connection ends.
//! - `wire.rs`: the codec. Every opcode is decoded there and only there, whichever transport
//!   carried it; INIT is negotiated there too.
//! - `devfuse.rs`: threads reading /dev/fuse (INIT, FORGET, INTERRUPT always; everything
//!   when io_uring is off or refused).
//! - `uring.rs`: FUSE over io_uring, one queue per CPU (read-write mount only;
//!   docs/decisions/fuse-over-io-uring.md).
//!
//! Why owfs decodes FUSE itself instead of through fuser: docs/decisions/one-fuse-decoder.md.

mod devfuse;
mod mount;
mod uring;
mod wire;

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{Errno, FileAttr, FileType, FopenFlags, INodeNo, InitFlags, MountOption};
use fuser::{RenameFlags, TimeOrNow};

use super::ops::OwfsFs;
use super::Uring;

/// Who asks: the identity the kernel sends in every request's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Takes one READDIR entry: node, offset of the next entry, kind, name; answers true when
/// the reply is full (the entry was not taken).
pub(crate) type AddDirent<'a> = dyn FnMut(u64, u64, FileType, &[u8]) -> bool + 'a;
/// Takes one READDIRPLUS entry: offset of the next entry, name, attributes; answers true
/// when the reply is full (the entry was not taken).
pub(crate) type AddDirentPlus<'a> = dyn FnMut(u64, &[u8], &FileAttr) -> bool + 'a;

/// What a SETATTR changes.
#[derive(Default, Debug, PartialEq)]
pub(crate) struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    pub ctime: Option<SystemTime>,
}

/// A getxattr or listxattr answer: the size asked for, or the bytes.
#[derive(Debug, PartialEq)]
pub(crate) enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

impl Xattr {
    /// The xattr reply protocol: `size` 0 asks for the length; a buffer too short is ERANGE.
    pub(crate) fn answer(bytes: &[u8], size: u32) -> Result<Xattr, Errno> {
        if size == 0 {
            Ok(Xattr::Size(bytes.len() as u32))
        } else if bytes.len() > size as usize {
            Err(Errno::ERANGE)
        } else {
            Ok(Xattr::Data(bytes.to_vec()))
        }
    }

    /// A LISTXATTR answer: the names, each followed by a NUL.
    pub(crate) fn names<'a>(
        names: impl IntoIterator<Item = &'a Vec<u8>>,
        size: u32,
    ) -> Result<Xattr, Errno> {
        let mut list = Vec::new();
        for k in names {
            list.extend_from_slice(k);
            list.push(0);
        }
        Xattr::answer(&list, size)
    }
}

/// An OPEN or OPENDIR answer: the handle later requests carry, and `FOPEN_*` flags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Opened {
    pub fh: u64,
    pub flags: FopenFlags,
}

/// A STATFS answer (`struct fuse_kstatfs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// What a file system asks for at INIT. `Default` is what fuser 0.18 asked for when a file
/// system changed nothing (the read-only mount).
#[derive(Debug, Clone, Copy)]
pub(crate) struct InitConfig {
    /// Capabilities wanted; each one the kernel lacks is logged. FUSE_ASYNC_READ,
    /// FUSE_BIG_WRITES and FUSE_MAX_PAGES are always asked for where the kernel has them.
    pub want: InitFlags,
    pub max_write: u32,
    /// None: the kernel's own maximum; a larger value than the kernel's also gets that.
    pub max_readahead: Option<u32>,
    pub max_background: u16,
    /// Background requests at which the kernel counts the connection as congested.
    pub congestion_threshold: u16,
    /// Granularity of the times the file system keeps, in nanoseconds.
    pub time_gran: u32,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            want: InitFlags::empty(),
            max_write: 16 << 20,
            max_readahead: None,
            max_background: 16,
            congestion_threshold: 12,
            time_gran: 1,
        }
    }
}

/// A file system as the FUSE transports call it: one method per request kind, decoded
/// arguments in, the reply's content out. The defaults answer what fuser 0.18 answered for
/// an operation a file system does not implement.
pub(crate) trait Operations: Send + Sync {
    /// How long the kernel may keep the entries and attributes this file system answers.
    const TTL: Duration;

    fn init_config(&self) -> InitConfig {
        InitConfig::default()
    }

    fn lookup(&self, _parent: u64, _name: &[u8]) -> Result<FileAttr, Errno> {
        Err(Errno::ENOSYS)
    }

    /// The kernel dropped `nlookup` references to `ino` (FORGET, or one entry of a
    /// BATCH_FORGET). Never answered.
    fn forget(&self, _ino: u64, _nlookup: u64) {}

    fn getattr(&self, _ino: u64) -> Result<FileAttr, Errno> {
        Err(Errno::ENOSYS)
    }

    fn setattr(&self, _c: &Caller, _ino: u64, _a: SetAttr) -> Result<FileAttr, Errno> {
        Err(Errno::ENOSYS)
    }

    fn readlink(&self, _ino: u64) -> Result<Vec<u8>, Errno> {
        Err(Errno::ENOSYS)
    }

    fn mknod(
        &self,
        _c: &Caller,
        _parent: u64,
        _name: &[u8],
        _mode: u32,
        _rdev: u32,
    ) -> Result<FileAttr, Errno> {
        Err(Errno::ENOSYS)
    }

    fn mkdir(
        &self,
        _c: &Caller,
        _parent: u64,
        _name: &[u8],
        _mode: u32,
    ) -> Result<FileAttr, Errno> {
        Err(Errno::ENOSYS)
    }

    fn unlink(&self, _parent: u64, _name: &[u8]) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn rmdir(&self, _parent: u64, _name: &[u8]) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn symlink(
        &self,
        _c: &Caller,
        _parent: u64,
        _name: &[u8],
        _target: &[u8],
    ) -> Result<FileAttr, Errno> {
        Err(Errno::EPERM)
    }

    fn rename(
        &self,
        _parent: u64,
        _name: &[u8],
        _newparent: u64,
        _newname: &[u8],
        _flags: RenameFlags,
    ) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn link(&self, _ino: u64, _newparent: u64, _newname: &[u8]) -> Result<FileAttr, Errno> {
        Err(Errno::EPERM)
    }

    fn open(&self, _ino: u64) -> Result<Opened, Errno> {
        Ok(Opened {
            fh: 0,
            flags: FopenFlags::empty(),
        })
    }

    fn read(&self, _ino: u64, _fh: u64, _offset: u64, _size: u32) -> Result<Vec<u8>, Errno> {
        Err(Errno::ENOSYS)
    }

    /// `kill_suidgid`: the writer lacks CAP_FSETID (FUSE_WRITE_KILL_SUIDGID).
    fn write(
        &self,
        _c: &Caller,
        _ino: u64,
        _offset: u64,
        _data: &[u8],
        _kill_suidgid: bool,
    ) -> Result<u32, Errno> {
        Err(Errno::ENOSYS)
    }

    fn flush(&self, _ino: u64) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn release(&self, _ino: u64, _fh: u64) -> Result<(), Errno> {
        Ok(())
    }

    fn fsync(&self, _ino: u64, _datasync: bool) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn opendir(&self, _ino: u64) -> Result<Opened, Errno> {
        Ok(Opened {
            fh: 0,
            flags: FopenFlags::empty(),
        })
    }

    /// Entries from `offset` on, each given to `add` until it answers that the reply is full.
    fn readdir(
        &self,
        _ino: u64,
        _fh: u64,
        _offset: u64,
        _add: &mut AddDirent,
    ) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    /// Like `readdir`, each entry with its attributes; an entry `add` took counts as a
    /// lookup.
    fn readdirplus(
        &self,
        _ino: u64,
        _fh: u64,
        _offset: u64,
        _add: &mut AddDirentPlus,
    ) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn releasedir(&self, _ino: u64, _fh: u64) -> Result<(), Errno> {
        Ok(())
    }

    fn fsyncdir(&self, _ino: u64, _datasync: bool) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn statfs(&self, _ino: u64) -> Result<Statfs, Errno> {
        Ok(Statfs {
            blocks: 0,
            bfree: 0,
            bavail: 0,
            files: 0,
            ffree: 0,
            bsize: 512,
            namelen: 255,
            frsize: 0,
        })
    }

    fn setxattr(&self, _ino: u64, _name: &[u8], _value: &[u8], _flags: i32) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn getxattr(&self, _ino: u64, _name: &[u8], _size: u32) -> Result<Xattr, Errno> {
        Err(Errno::ENOSYS)
    }

    fn listxattr(&self, _ino: u64, _size: u32) -> Result<Xattr, Errno> {
        Err(Errno::ENOSYS)
    }

    fn removexattr(&self, _ino: u64, _name: &[u8]) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    /// A new regular file, opened.
    fn create(
        &self,
        _c: &Caller,
        _parent: u64,
        _name: &[u8],
        _mode: u32,
    ) -> Result<(FileAttr, Opened), Errno> {
        Err(Errno::ENOSYS)
    }

    fn fallocate(&self, _ino: u64, _offset: u64, _length: u64, _mode: i32) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }
}

/// Tells the kernel to drop what it caches of a node the file system changed on its own.
#[derive(Clone)]
pub(crate) struct Notifier(Arc<OwnedFd>);

impl Notifier {
    /// FUSE_NOTIFY_INVAL_INODE: the node's attributes, and its cached pages from `offset` for
    /// `len` bytes (`offset` -1: attributes only; `len` 0: to the end of the file).
    pub(crate) fn inval_inode(&self, ino: INodeNo, offset: i64, len: i64) -> io::Result<()> {
        let msg = wire::notify_inval_inode(ino.0, offset, len);
        rustix::io::write(&*self.0, &msg)?;
        Ok(())
    }
}

/// A mounted FUSE connection whose INIT has been answered.
pub(crate) struct Connection {
    /// The descriptor the mount made; notifications and io_uring commands go through it.
    dev: Arc<OwnedFd>,
    /// Unmounted when the connection is dropped (if the mount is still this one).
    mount: mount::Mount,
    init: wire::Negotiated,
}

impl Connection {
    /// Mounts on `mountpoint` (canonical) and answers the kernel's INIT with `cfg`.
    pub(crate) fn open(
        mountpoint: &Path,
        options: &[MountOption],
        cfg: &InitConfig,
    ) -> io::Result<Connection> {
        let (dev, mount) = mount::mount(mountpoint, options)?;
        let init = devfuse::handshake(&dev, cfg)?;
        for f in (cfg.want - InitFlags::FUSE_OVER_IO_URING).iter() {
            if !init.offered.contains(f) {
                eprintln!("owfs: the kernel lacks {f:?}; continuing without it");
            }
        }
        Ok(Connection {
            dev: Arc::new(dev),
            mount,
            init,
        })
    }

    pub(crate) fn notifier(&self) -> Notifier {
        Notifier(self.dev.clone())
    }

    /// Serves requests from /dev/fuse on `threads` threads until the file system is
    /// unmounted or the connection aborted, then unmounts if the mount is still there.
    /// `pause_after_forget` says whether a thread that handled FORGETs stays away from the
    /// device for a moment (docs/decisions/forget-batching.md).
    pub(crate) fn serve<O: Operations>(
        self,
        ops: &O,
        threads: usize,
        pause_after_forget: &(dyn Fn() -> bool + Sync),
    ) -> io::Result<()> {
        let r = devfuse::serve(&self.dev, ops, threads, &self.init, pause_after_forget);
        drop(self.mount);
        r
    }
}

/// Mounts the read-write file system: INIT asks for FUSE over io_uring unless `-o uring=off`
/// and, where the kernel grants it, starts the io_uring queues.
pub(super) fn mount_rw(
    fs: &OwfsFs,
    mountpoint: &Path,
    options: &[MountOption],
) -> io::Result<Connection> {
    let mut cfg = fs.init_config();
    let uring = fs.s.opts.uring != Uring::Off;
    if fs.s.opts.uring == Uring::Auto && rustix::process::geteuid().is_root() {
        uring::enable_in_kernel();
    }
    if uring {
        cfg.want |= InitFlags::FUSE_OVER_IO_URING;
    }
    let conn = Connection::open(mountpoint, options, &cfg)?;
    // The queues register once the INIT answer is processed, and take over every request
    // but FORGET and INTERRUPT.
    if uring {
        if conn.init.flags.contains(InitFlags::FUSE_OVER_IO_URING) {
            uring::start(fs.clone(), conn.dev.clone());
        } else {
            eprintln!(
                "owfs: FUSE over io_uring is off in this kernel \
                 (/sys/module/fuse/parameters/enable_uring); serving through /dev/fuse"
            );
        }
    }
    Ok(conn)
}

/// Serves the read-write mount's /dev/fuse until it is unmounted. Once io_uring queues
/// serve, the /dev/fuse threads pause after FORGETs so that the kernel batches them.
pub(super) fn serve_rw(conn: Connection, fs: &OwfsFs, threads: usize) -> io::Result<()> {
    let s = &fs.s;
    conn.serve(fs, threads, &|| s.uring_threads.load(Ordering::Relaxed) > 0)
}
