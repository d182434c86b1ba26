//! A measuring probe, not part of owfs: mounts one file through FUSE so that reads of it can be
//! timed with and without `FUSE_PASSTHROUGH` (docs/decisions/fuse-caching.md). The mount has a
//! root directory holding `data`, whose contents are BACKING's.
//!
//!   passthrough_probe BACKING MOUNTPOINT daemon       reads answered by this process (pread),
//!                                                     kernel page cache kept between opens
//!   passthrough_probe BACKING MOUNTPOINT passthrough  reads go from the kernel to BACKING
//!   passthrough_probe BACKING MOUNTPOINT both         passthrough asked for together with the
//!                                                     writeback cache (what owfs would need)
//!
//! Runs in the foreground until the mount is unmounted. `scripts/bench_passthrough.py` drives
//! it. It prints `passthrough: on` once an open got a backing file, or why not.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, Request, SessionACL,
};
use parking_lot::Mutex;

const TTL: Duration = Duration::from_secs(3600);
const DATA: INodeNo = INodeNo(2);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Daemon,
    Passthrough,
    Both,
}

struct Probe {
    backing: PathBuf,
    file: File,
    size: u64,
    mode: Mode,
    /// The backing id of the open file, shared by every open (dropped when the last closes).
    open: Mutex<(u64, Option<Arc<BackingId>>)>,
    reported: std::sync::atomic::AtomicBool,
}

impl Probe {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let dir = ino == INodeNo::ROOT;
        FileAttr {
            ino,
            size: if dir { 0 } else { self.size },
            blocks: if dir { 0 } else { self.size.div_ceil(512) },
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn report(&self, what: &str) {
        if !self
            .reported
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            println!("passthrough: {what}");
        }
    }
}

impl Filesystem for Probe {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_MAX_PAGES);
        let _ = config.set_max_readahead(1 << 20);
        if self.mode != Mode::Daemon {
            if let Err(e) = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                println!("passthrough: not offered by the kernel ({e:?})");
            }
            let _ = config.set_max_stack_depth(1);
        }
        if self.mode == Mode::Both {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == "data" {
            reply.entry(&TTL, &self.attr(DATA), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT | DATA => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != DATA {
            reply.error(Errno::EISDIR);
            return;
        }
        if self.mode == Mode::Daemon {
            reply.opened(FileHandle(1), FopenFlags::FOPEN_KEEP_CACHE);
            return;
        }
        let mut open = self.open.lock();
        let id = match &open.1 {
            Some(id) => id.clone(),
            None => match File::open(&self.backing).and_then(|f| reply.open_backing(f)) {
                Ok(id) => Arc::new(id),
                Err(e) => {
                    // What owfs would see: say why, and serve the reads itself.
                    self.report(&format!("refused ({e})"));
                    drop(open);
                    reply.opened(FileHandle(1), FopenFlags::FOPEN_KEEP_CACHE);
                    return;
                }
            },
        };
        open.0 += 1;
        open.1 = Some(id.clone());
        self.report("on");
        reply.opened_passthrough(FileHandle(2), FopenFlags::empty(), &id);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut buf = vec![0u8; size as usize];
        match self.file.read_at(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh == FileHandle(2) {
            let mut open = self.open.lock();
            open.0 -= 1;
            if open.0 == 0 {
                open.1 = None;
            }
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DATA, FileType::RegularFile, "data"),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, backing, mountpoint, mode] = &args[..] else {
        anyhow::bail!("usage: passthrough_probe BACKING MOUNTPOINT daemon|passthrough|both");
    };
    let mode = match mode.as_str() {
        "daemon" => Mode::Daemon,
        "passthrough" => Mode::Passthrough,
        "both" => Mode::Both,
        m => anyhow::bail!("unknown mode {m:?}: daemon, passthrough or both"),
    };
    let file = File::open(backing)?;
    let size = file.metadata()?.size();
    let probe = Probe {
        backing: PathBuf::from(backing),
        file,
        size,
        mode,
        open: Mutex::new((0, None)),
        reported: false.into(),
    };
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("passthrough-probe".into()),
        MountOption::RO,
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(2);
    fuser::mount(probe, mountpoint, &cfg)?;
    Ok(())
}
