//! Flushing the kernel's dirty pages of the mount (syncfs) from a separate process.
//!
//! A thread of the daemon that waits in syncfs on its own mount cannot be killed: if the
//! daemon is SIGKILLed meanwhile, that thread keeps the process (and with it /dev/fuse) alive,
//! the writeback it waits for is never answered, and every process using the mount hangs in
//! uninterruptible sleep. A child process holding no /dev/fuse descriptor does the waiting
//! instead: when the daemon dies, /dev/fuse closes, the kernel aborts the connection, the
//! child's syncfs returns and the child exits (end of its pipe, or SIGKILL on parent death).

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use parking_lot::Mutex;

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
        // getppid, read, open, syncfs, close, write, _exit) on memory prepared before the fork.
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

    /// syncfs on the mount, done by the child; returns once the kernel's pages are written
    /// (or syncfs failed: like the kernel's own writeback, a failed flush is not an error of
    /// the commit). An error means the child is gone.
    pub fn flush(&self) -> io::Result<()> {
        let mut g = self.pipes.lock();
        let p = g
            .as_mut()
            .ok_or_else(|| io::Error::other("the flusher has stopped"))?;
        p.0.write_all(b"s")?;
        p.1.read_exact(&mut [0u8; 1])
    }
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

/// The child: for each byte read, syncfs on the mount, then answer one byte.
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
    loop {
        if libc::read(0, (&mut b as *mut u8).cast(), 1) != 1 {
            libc::_exit(0);
        }
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::syncfs(fd);
            libc::close(fd);
        }
        if libc::write(1, (&b as *const u8).cast(), 1) != 1 {
            libc::_exit(0);
        }
    }
}
