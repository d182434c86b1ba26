//! FUSE through /dev/fuse: the INIT handshake, then threads that each read a request from the
//! device, run it through the codec (`wire.rs`) and write the answer. Every thread but the last
//! reads its own clone of the descriptor (FUSE_DEV_IOC_CLONE), as fuser's `clone_fd` did: the
//! clones share the kernel's queue of pending requests but not its list of requests being
//! answered. Once the io_uring queues serve, only FORGET, BATCH_FORGET and INTERRUPT arrive
//! here.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::io::Errno as OsErrno;

use super::wire::{self, opcode, InHeader, InitAnswer, Negotiated, IN_HEADER};
use super::{InitConfig, Operations};

/// How long a thread stays away from the device after FORGETs, once the io_uring queues
/// carry every request (docs/decisions/forget-batching.md).
const FORGET_PAUSE: Duration = Duration::from_millis(5);
/// `_IOR(229, 0, uint32_t)`: make a descriptor read the connection of another.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;
/// Room for the largest request (a WRITE of max_write) and its headers; the kernel refuses
/// reads into a smaller buffer.
const HEADROOM: usize = 4096;
/// The kernel's FUSE_MIN_READ_BUFFER.
const MIN_READ: usize = 8192;
/// The read buffer until INIT has set max_write: fuser's, large enough whatever the kernel
/// assumes before INIT (zero pages until touched).
const INIT_READ: usize = (16 << 20) + HEADROOM;

/// Reads the kernel's INIT and answers it with what `cfg` asks for.
pub(super) fn handshake(dev: &OwnedFd, cfg: &InitConfig) -> io::Result<Negotiated> {
    let fd = dev.as_fd();
    let mut buf = vec![0u8; INIT_READ];
    loop {
        let n = match read_retrying(fd, &mut buf) {
            Ok(n) => n,
            Err(OsErrno::NODEV) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "FUSE device disconnected during handshake",
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let req = &buf[..n];
        let Some(h) = InHeader::parse(req) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a FUSE request of {n} bytes, shorter than its header"),
            ));
        };
        if h.opcode != opcode::INIT {
            send(fd, h.unique, Err(fuser::Errno::EIO));
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("FUSE request {} before INIT", h.opcode),
            ));
        }
        let args = req.get(IN_HEADER..(h.len as usize).min(n)).unwrap_or(&[]);
        match wire::init(args, cfg) {
            InitAnswer::Retry(b) => send(fd, h.unique, Ok(b)),
            InitAnswer::Accept(b, negotiated) => {
                send(fd, h.unique, Ok(b));
                return Ok(negotiated);
            }
            InitAnswer::Refuse(e) => {
                send(fd, h.unique, Err(e));
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("FUSE INIT refused ({e:?}): kernel protocol too old or garbled"),
                ));
            }
        }
    }
}

/// Serves `dev` on `threads` threads until the connection ends (unmount or abort: Ok) or a
/// read fails otherwise (that error, once every thread has ended).
pub(super) fn serve<O: Operations>(
    dev: &OwnedFd,
    ops: &O,
    threads: usize,
    init: &Negotiated,
    pause_after_forget: &(dyn Fn() -> bool + Sync),
) -> io::Result<()> {
    let clones = (1..threads.max(1))
        .map(|_| clone_fd(dev))
        .collect::<io::Result<Vec<_>>>()?;
    let buf_len = (init.max_write as usize + HEADROOM).max(MIN_READ);
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let fds = clones.iter().map(|c| c.as_fd()).chain([dev.as_fd()]);
        for (i, fd) in fds.enumerate() {
            let h = std::thread::Builder::new()
                .name(format!("owfs-fuse{i}"))
                .spawn_scoped(scope, move || {
                    serve_one(fd, ops, buf_len, pause_after_forget)
                })?;
            handles.push(h);
        }
        let mut r = Ok(());
        for h in handles {
            let e = match h.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => io::Error::other("a /dev/fuse thread panicked"),
            };
            if r.is_ok() {
                r = Err(e);
            }
        }
        r
    })
}

fn serve_one<O: Operations>(
    fd: BorrowedFd,
    ops: &O,
    buf_len: usize,
    pause_after_forget: &(dyn Fn() -> bool + Sync),
) -> io::Result<()> {
    let mut buf = vec![0u8; buf_len];
    loop {
        let n = match read_retrying(fd, &mut buf) {
            Ok(n) => n,
            // Unmounted, or the connection aborted.
            Err(OsErrno::NODEV) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let req = &buf[..n];
        let Some(h) = InHeader::parse(req) else {
            eprintln!("owfs: ignoring a FUSE request of {n} bytes, shorter than its header");
            continue;
        };
        let answer = if h.len as usize != n {
            Some(Err(fuser::Errno::EIO))
        } else {
            let args = &req[IN_HEADER..];
            wire::dispatch(ops, &h, args)
        };
        if let Some(a) = answer {
            send(fd, h.unique, a);
        }
        match h.opcode {
            opcode::DESTROY => return Ok(()),
            // While no thread waits on the device, the kernel queues FORGETs without waking
            // anyone, and the next read takes them all as one BATCH_FORGET.
            opcode::FORGET | opcode::BATCH_FORGET if pause_after_forget() => {
                std::thread::sleep(FORGET_PAUSE)
            }
            _ => {}
        }
    }
}

/// One request, retrying what fuser retried: a signal (EINTR), a request interrupted before
/// it was read (ENOENT), EAGAIN.
fn read_retrying(fd: BorrowedFd, buf: &mut [u8]) -> Result<usize, OsErrno> {
    loop {
        match rustix::io::read(fd, &mut *buf) {
            Err(OsErrno::INTR | OsErrno::NOENT | OsErrno::AGAIN) => continue,
            r => return r,
        }
    }
}

/// Writes the answer to request `unique`: its arguments, or a negative errno.
fn send(fd: BorrowedFd, unique: u64, answer: Result<Vec<u8>, fuser::Errno>) {
    let (error, body) = match &answer {
        Ok(b) => (0, b.as_slice()),
        Err(e) => (-e.code(), &[][..]),
    };
    let h = wire::out_header(unique, error, body.len());
    match rustix::io::writev(fd, &[IoSlice::new(&h), IoSlice::new(body)]) {
        // ENOENT: the request was interrupted and is gone; ENODEV: the connection ended.
        Ok(_) | Err(OsErrno::NOENT | OsErrno::NODEV) => {}
        Err(e) => eprintln!("owfs: cannot answer FUSE request {unique}: {e}"),
    }
}

/// A new descriptor reading the connection of `dev`.
fn clone_fd(dev: &OwnedFd) -> io::Result<OwnedFd> {
    let new: OwnedFd = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    let mut src = dev.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32, the descriptor to clone, through the pointer,
    // which is valid for the call.
    if unsafe { libc::ioctl(new.as_raw_fd(), FUSE_DEV_IOC_CLONE as _, &mut src) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(new)
}
