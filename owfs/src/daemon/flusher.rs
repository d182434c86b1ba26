//! Flushing the kernel's dirty pages of the mount (syncfs) from a separate process.
//!
//! A thread of the daemon that waits in syncfs on its own mount cannot be killed: if the
//! daemon is SIGKILLed meanwhile, that thread keeps the process (and with it /dev/fuse) alive,
//! the writeback it waits for is never answered, and every process using the mount hangs in
//! uninterruptible sleep. A child process holding no /dev/fuse descriptor does the waiting
//! instead: when the daemon dies, /dev/fuse closes, the kernel aborts the connection, the
//! child's syncfs returns and the child exits (end of its pipe, or SIGKILL on parent death).
//!
//! syncfs alone does not wait for the writes it starts on a FUSE mount: the kernel marks FUSE
//! mappings as having no data-integrity semantics and skips them when it waits (measured on
//! this 6.18 kernel: syncfs returns at once while the daemon still sits on the WRITE). A cut
//! that must hold every write made before it (`owfs sync`, fsync of the root) therefore also
//! waits on each regular file the kernel holds: opened by handle (the kernel's own inode, no
//! request when it is cached) and `sync_file_range` with both waits, which waits for the
//! writeback of that file's pages like fsync does (docs/decisions/sync-waits-for-writeback.md).

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// The flusher has said it cannot open files by handle.
static WARNED: AtomicBool = AtomicBool::new(false);

pub struct Flusher {
    pid: libc::pid_t,
    /// Requests to the child, its answers; `None` once closed.
    pipes: Mutex<Option<(std::fs::File, std::fs::File)>>,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Flusher {
    /// Forks the flusher. Call before /dev/fuse is opened: the child must not hold it.
    pub fn spawn(mountpoint: &Path) -> io::Result<Flusher> {
        let path = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("mount point contains a NUL byte"))?;
        let (req_r, req_w) = pipe()?;
        let (resp_r, resp_w) = pipe()?;
        // SAFETY: the child calls only async-signal-safe functions (dup2, close_range, prctl,
        // getppid, read, open, syncfs, open_by_handle_at, sync_file_range, close, write,
        // _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            unsafe { child(req_r.as_raw_fd(), resp_w.as_raw_fd(), &path) }
        }
        drop((req_r, resp_w));
        Ok(Flusher {
            pid,
            pipes: Mutex::new(Some((
                std::fs::File::from(req_w),
                std::fs::File::from(resp_r),
            ))),
        })
    }

    /// syncfs on the mount, done by the child, then (for `wait`, the inode numbers of the
    /// regular files the kernel holds) a wait for the writeback of each. Returns once the
    /// kernel's pages have reached the daemon (or the flush failed: like the kernel's own
    /// writeback, a failed flush is not an error of the commit). An error means the child is
    /// gone.
    pub fn flush(&self, wait: &[u64]) -> io::Result<()> {
        let mut g = self.pipes.lock();
        let p = g
            .as_mut()
            .ok_or_else(|| io::Error::other("the flusher has stopped"))?;
        let mut msg = Vec::with_capacity(9 + 8 * wait.len());
        msg.push(b'w');
        msg.extend_from_slice(&(wait.len() as u64).to_ne_bytes());
        for ino in wait {
            msg.extend_from_slice(&ino.to_ne_bytes());
        }
        p.0.write_all(&msg)?;
        p.1.read_exact(&mut [0u8; 1])
    }
}

/// Without a flusher process: the same flush and wait from the calling thread.
pub fn flush_here(mountpoint: &Path, wait: &[u64]) {
    let Ok(path) = CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: plain system calls on a path and descriptors this function owns.
    unsafe {
        let fd = open_and_syncfs(&path);
        if fd < 0 {
            return;
        }
        for &ino in wait {
            wait_for_writeback(fd, ino);
        }
        libc::close(fd);
    }
}

/// Opens the mount point and calls syncfs on it; the descriptor, or -1 if it cannot be
/// opened. Only system calls (the flusher child calls it after fork).
unsafe fn open_and_syncfs(path: &CString) -> libc::c_int {
    let fd = libc::open(
        path.as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if fd >= 0 {
        libc::syncfs(fd);
    }
    fd
}

/// Waits until the kernel's writeback of inode `ino` of the mount `mount_fd` is answered.
/// Only system calls (async-signal-safe: the flusher child calls it after fork).
///
/// The handle is the FUSE kernel module's own (FILEID_INO64_GEN: the node id in two 32-bit
/// halves, then the generation, always 0 here). An inode the kernel no longer caches has no
/// pages left (eviction waits for its writeback): open_by_handle_at fails with ESTALE and
/// there is nothing to wait for.
unsafe fn wait_for_writeback(mount_fd: libc::c_int, ino: u64) {
    const FILEID_INO64_GEN: u32 = 0x81;
    // struct file_handle: handle_bytes, handle_type, f_handle[12].
    let handle: [u32; 5] = [12, FILEID_INO64_GEN, (ino >> 32) as u32, ino as u32, 0];
    let fd = libc::syscall(
        libc::SYS_open_by_handle_at,
        mount_fd,
        handle.as_ptr(),
        libc::O_RDONLY | libc::O_CLOEXEC,
    ) as libc::c_int;
    if fd < 0 {
        let e = *libc::__errno_location();
        if e != libc::ESTALE && e != libc::ENOENT && !WARNED.swap(true, Ordering::Relaxed) {
            // Most likely EPERM: no CAP_DAC_READ_SEARCH. Said once, without formatting (this
            // runs in the forked child).
            let msg = b"owfs: the flusher cannot open files by handle (open_by_handle_at \
failed, no CAP_DAC_READ_SEARCH?): owfs sync and fsync of the root wait only for syncfs, \
which does not wait for writes the kernel has in flight\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
        }
        return;
    }
    libc::sync_file_range(
        fd,
        0,
        0,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    );
    libc::close(fd);
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // The child reads the end of its pipe and exits; collect it.
        drop(self.pipes.lock().take());
        // SAFETY: waiting for our own child.
        unsafe {
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The child: for each request read (`w`, a count, that many inode numbers), syncfs on the
/// mount, a wait for the writeback of each inode, then one byte of answer.
unsafe fn child(req: libc::c_int, resp: libc::c_int, path: &CString) -> ! {
    libc::dup2(req, 0);
    libc::dup2(resp, 1);
    // Nothing else of the daemon's (its cache lock, store files) stays open here.
    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    if libc::getppid() == 1 {
        libc::_exit(0);
    }
    let mut b = 0u8;
    let mut inos = [0u64; 512];
    loop {
        let mut count = 0u64;
        if !read_full(0, (&mut b as *mut u8).cast(), 1)
            || !read_full(0, (&mut count as *mut u64).cast(), 8)
        {
            libc::_exit(0);
        }
        let fd = open_and_syncfs(path);
        while count > 0 {
            let n = count.min(inos.len() as u64) as usize;
            if !read_full(0, inos.as_mut_ptr().cast(), n * 8) {
                libc::_exit(0);
            }
            if fd >= 0 {
                for &ino in &inos[..n] {
                    wait_for_writeback(fd, ino);
                }
            }
            count -= n as u64;
        }
        if fd >= 0 {
            libc::close(fd);
        }
        if libc::write(1, (&b as *const u8).cast(), 1) != 1 {
            libc::_exit(0);
        }
    }
}

/// Reads exactly `len` bytes into `buf`; false at end of file or on an error.
unsafe fn read_full(fd: libc::c_int, buf: *mut u8, len: usize) -> bool {
    let mut done = 0;
    while done < len {
        let r = libc::read(fd, buf.add(done).cast(), len - done);
        if r > 0 {
            done += r as usize;
        } else if r < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        } else {
            return false;
        }
    }
    true
}
