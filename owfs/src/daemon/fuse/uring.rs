//! FUSE over io_uring (Linux 6.14+, `/sys/module/fuse/parameters/enable_uring`): the kernel
//! queues each request on the queue of the CPU its caller runs on, and a thread pinned to that
//! CPU answers it and fetches the next in one `io_uring_enter`. Caller and server stay on one
//! CPU: no cross-CPU wake-up, which costs more than the rest of a round trip on a small VM
//! (docs/decisions/fuse-over-io-uring.md).
//!
//! Each thread owns one ring entry: a 288-byte header buffer (`fuse_uring_req_header`) and a
//! payload buffer of the largest request. Requests are decoded by `wire.rs`, as those from
//! /dev/fuse are. FORGET and INTERRUPT still come through /dev/fuse (`devfuse.rs`), as does
//! everything before the last queue registers.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuser::Errno;
use io_uring::{opcode, squeue, types, IoUring};

use super::super::ops::{OwfsFs, MAX_WRITE};
use super::wire::{self, InHeader, IN_HEADER};

/// `FUSE_URING_IN_OUT_HEADER_SZ` and `FUSE_URING_OP_IN_OUT_SZ`.
const IN_OUT: usize = 128;
const OP_IN: usize = 128;
/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Threads per queue: one may block (a fetch from the store, a throttled write, `sync`)
/// while the other serves the CPU's next request (see `serve` for where each runs). Only
/// one fsync of the root directory (which waits for a commit, whose flush of dirty pages
/// needs a free thread) can wait at a time: the kernel holds the directory's lock for it.
const THREADS_PER_QUEUE: usize = 2;
/// The payload of the largest request or reply: a WRITE of max_write, a READ of max_pages.
const PAYLOAD: usize = MAX_WRITE as usize;
/// Room before the payload to lay the per-op struct out in front of it, so a request's
/// arguments are one slice without copying its payload.
const PREFIX: usize = OP_IN;

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct ReqHeader {
    in_out: [u8; IN_OUT],
    op_in: [u8; OP_IN],
    /// `struct fuse_uring_ent_in_out`: flags, commit_id, payload_sz, padding, reserved.
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

const _: () = assert!(std::mem::size_of::<ReqHeader>() == 288);
const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);

/// Starts the queue threads on the connection `dev`, once INIT granted io_uring. They
/// register when the kernel has processed the INIT answer. A queue that cannot register
/// makes the kernel drop io_uring for the connection, and /dev/fuse serves everything.
pub(super) fn start(fs: OwfsFs, dev: Arc<OwnedFd>) {
    for q in 0..possible_cpus() {
        for k in 0..THREADS_PER_QUEUE {
            let (fs, dev) = (fs.clone(), dev.clone());
            let r = super::super::spawn(&format!("owfs-uring{q}.{k}"), move || {
                match serve(&fs, dev.as_raw_fd(), q, k) {
                    Ok(()) => {}
                    Err(Failure::NotRegistered(e)) => eprintln!("owfs: io_uring queue {q}: {e}"),
                    Err(Failure::Broken(e)) => fs.s.halt(&format!(
                        "io_uring queue {q} (CPU {q}) stopped serving: {e}"
                    )),
                }
            });
            if let Err(e) = r {
                eprintln!("owfs: cannot start an io_uring thread for queue {q}: {e}");
            }
        }
    }
}

/// The kernel makes one queue per possible CPU and needs them all before it uses any.
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            let last = s.trim().rsplit([',', '-']).next()?.parse::<usize>().ok()?;
            Some(last + 1)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    // Not allowed here (a cpuset without this CPU): serve unpinned.
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// An SQE128 carrying a `fuse_uring_cmd_req` (flags, commit_id, qid) for `cmd_op`.
fn command(
    fd: RawFd,
    cmd_op: u32,
    commit_id: u64,
    qid: u16,
    iov: &[libc::iovec; 2],
) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let e = opcode::UringCmd80::new(types::Fd(fd), cmd_op)
        .cmd(cmd)
        .addr(Some(iov.as_ptr() as u64))
        .build();
    // The kernel reads the iovec count from the SQE's `len` (offset 24), which the builder
    // does not expose.
    // SAFETY: Entry128 is repr(C), an io_uring_sqe (64 bytes) then 64 command bytes; every
    // bit pattern is a valid value of it.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Why a queue thread stopped.
enum Failure {
    /// Before it registered: the kernel serves everything through /dev/fuse.
    NotRegistered(std::io::Error),
    /// After: the kernel goes on queueing its CPU's requests here (see `Shared::halt`).
    Broken(std::io::Error),
}

impl Failure {
    fn new(registered: bool, e: std::io::Error) -> Failure {
        if registered {
            Failure::Broken(e)
        } else {
            Failure::NotRegistered(e)
        }
    }
}

fn serve(fs: &OwfsFs, fd: RawFd, q: usize, k: usize) -> Result<(), Failure> {
    let qid = q as u16;
    // The first thread of a queue runs on its CPU: a caller waiting for an answer is served
    // without a cross-CPU wake-up. The second goes where the scheduler puts it: when the
    // first is busy (the kernel's writeback streaming WRITEs, say), it runs beside the caller
    // instead of after it.
    if k == 0 {
        pin_to(qid as usize);
    }
    let mut idle_wait = IdleWait::new();
    let mut ring: IoUring<squeue::Entry128> = IoUring::builder()
        .build(2)
        .map_err(Failure::NotRegistered)?;
    // SAFETY: all-zero bytes are a valid ReqHeader (plain integers).
    let mut hdr: Box<ReqHeader> = Box::new(unsafe { std::mem::zeroed() });
    let mut buf = vec![0u8; PREFIX + PAYLOAD];
    let iov = [
        libc::iovec {
            iov_base: (&mut *hdr as *mut ReqHeader).cast(),
            iov_len: std::mem::size_of::<ReqHeader>(),
        },
        libc::iovec {
            iov_base: buf[PREFIX..].as_mut_ptr().cast(),
            iov_len: PAYLOAD,
        },
    ];
    let register = command(fd, CMD_REGISTER, 0, qid, &iov);
    // The command to submit next; `None` while the last one is in flight. A wait that a
    // signal ends (SIGSTOP then SIGCONT, for one) comes back without a completion: wait
    // again, never submit the command twice (a second COMMIT_AND_FETCH of the same request
    // fails with ENOENT and the queue would stop, hanging every caller on its CPU).
    let mut next = Some(register.clone());
    let mut registered = false;
    let mut taken = 0u64;
    loop {
        if let Some(sqe) = next.take() {
            // SAFETY: the buffers the command points to (iov, hdr, buf) live until this
            // function returns, and a command is in flight only inside this loop.
            unsafe { ring.submission().push(&sqe) }
                .map_err(|e| Failure::new(registered, std::io::Error::other(e)))?;
        }
        let r = idle_wait.around(|| ring.submit_and_wait(1));
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(Failure::new(registered, e)),
        }
        let Some(cqe) = ring.completion().next() else {
            continue;
        };
        let res = cqe.result();
        if res == -libc::EAGAIN && !registered {
            // The kernel has not processed the INIT reply yet.
            std::thread::sleep(std::time::Duration::from_millis(1));
            next = Some(register.clone());
            continue;
        }
        if res < 0 {
            // ENOTCONN, ECONNABORTED: unmounted or aborted; anything else before we served
            // a request is a refusal, and the kernel falls back to /dev/fuse.
            return match -res {
                libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV if registered => Ok(()),
                e if registered => Err(Failure::Broken(std::io::Error::from_raw_os_error(e))),
                e => Err(Failure::NotRegistered(std::io::Error::other(format!(
                    "registering failed ({}); serving through /dev/fuse",
                    std::io::Error::from_raw_os_error(e)
                )))),
            };
        }
        if !registered {
            registered = true;
            fs.s.uring_threads.fetch_add(1, Ordering::Relaxed);
        }
        taken += 1;
        if fs.s.faults.uring_stop_after().is_some_and(|n| taken >= n) {
            // Tests only (OWFS_FAULTS=uring_stop_after): the request just taken stays
            // unanswered, as if this thread had died.
            return Err(Failure::Broken(std::io::Error::other(
                "stopped by OWFS_FAULTS=uring_stop_after",
            )));
        }
        // The kernel's id of the request (its `unique`), to name it in the commit.
        let unique = hdr.commit_id;
        let (h, reply) = handle(fs, &mut hdr, &mut buf);
        idle_wait.next = h.is_some_and(|h| MOVERS.wants_idle_wait(h.caller.pid, qid));
        let (error, body) = match reply {
            Ok(b) if b.len() <= PAYLOAD => (0, b),
            Ok(_) => (-libc::EIO, Vec::new()),
            Err(e) => (-(e.code()), Vec::new()),
        };
        buf[PREFIX..PREFIX + body.len()].copy_from_slice(&body);
        hdr.in_out[..wire::OUT_HEADER].copy_from_slice(&wire::out_header(
            unique,
            error,
            body.len(),
        ));
        hdr.payload_sz = body.len() as u32;
        next = Some(command(fd, CMD_COMMIT_AND_FETCH, unique, qid, &iov));
    }
}

/// Decodes the request the kernel put in `hdr` and `buf`, and runs it.
fn handle(
    fs: &OwfsFs,
    hdr: &mut ReqHeader,
    buf: &mut [u8],
) -> (Option<InHeader>, Result<Vec<u8>, Errno>) {
    let Some(h) = InHeader::parse(&hdr.in_out) else {
        return (None, Err(Errno::EIO));
    };
    let payload = hdr.payload_sz as usize;
    // in_header.len counts the header, the per-op struct (in op_in) and the payload.
    let op_len = (h.len as usize).checked_sub(IN_HEADER + payload);
    let Some(op_len) = op_len.filter(|&n| n <= OP_IN && payload <= PAYLOAD) else {
        return (Some(h), Err(Errno::EIO));
    };
    // The per-op struct goes right before the payload: the arguments are one slice.
    let start = PREFIX - op_len;
    buf[start..PREFIX].copy_from_slice(&hdr.op_in[..op_len]);
    let args = &buf[start..PREFIX + payload];
    // The kernel queues FORGETs (the only requests that take no answer) for /dev/fuse, never
    // here; should one come, an empty answer fetches the next request.
    (
        Some(h),
        wire::dispatch(fs, &h, args).unwrap_or(Ok(Vec::new())),
    )
}

const ENABLE: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets the fuse module's `enable_uring` (root only). It lets FUSE servers that ask for
/// io_uring at INIT use it; servers that do not ask are unaffected.
pub(super) fn enable_in_kernel() {
    match std::fs::read_to_string(ENABLE) {
        Ok(v) if v.trim() == "Y" => {}
        Ok(_) => {
            eprintln!("owfs: turning on FUSE over io_uring ({ENABLE})");
            if let Err(e) = std::fs::write(ENABLE, "Y") {
                eprintln!("owfs: cannot turn on FUSE over io_uring ({ENABLE}): {e}");
            }
        }
        // An older kernel: /dev/fuse serves.
        Err(_) => {}
    }
}

/// Keeping a caller on its CPU. Our answer wakes the caller while this thread still runs on
/// the caller's CPU; when another CPU is idle, the scheduler moves the caller there, its next
/// request lands on that CPU's queue, and every round trip pays a cross-CPU wake-up (32 µs
/// instead of 8 µs on this 2-vCPU VM). A CPU running only SCHED_IDLE tasks counts as idle
/// for that choice, so for callers seen moving, this thread answers and waits as SCHED_IDLE,
/// and serves the next request as SCHED_OTHER again. It costs two system calls, which is why
/// callers that stay put (the other CPU is busy, say with gzip under tar) are answered plainly.
struct IdleWait {
    /// Answer the current request as SCHED_IDLE.
    next: bool,
    /// Off for good once the policy cannot be set back (never stay SCHED_IDLE while serving).
    usable: bool,
}

impl IdleWait {
    fn new() -> IdleWait {
        IdleWait {
            next: false,
            usable: true,
        }
    }

    fn around<T>(&mut self, wait: impl FnOnce() -> T) -> T {
        if !(self.next && self.usable) {
            return wait();
        }
        let idle = set_policy(libc::SCHED_IDLE);
        let r = wait();
        if idle && !set_policy(libc::SCHED_OTHER) {
            self.usable = false;
            eprintln!("owfs: cannot leave SCHED_IDLE; the io_uring queues stop using it");
        }
        r
    }
}

fn set_policy(p: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system call on the calling thread with a valid parameter.
    unsafe { libc::sched_setscheduler(0, p, &param) == 0 }
}

/// Which callers move between CPUs: per thread id (hashed into a small table), the queue of
/// its last request, whether it gets idle waits, and how many requests since the last check.
struct Movers([AtomicU64; 256]);

static MOVERS: Movers = Movers([const { AtomicU64::new(0) }; 256]);

/// Requests answered with idle waits before one is answered plainly, to see whether the
/// caller still moves (if not, its CPU neighbour got busy: idle waits no longer pay).
const RECHECK: u64 = 256;

impl Movers {
    fn wants_idle_wait(&self, tid: u32, qid: u16) -> bool {
        let slot = &self.0[tid as usize % self.0.len()];
        let old = slot.load(Ordering::Relaxed);
        let (o_tid, o_q, o_idle, o_n) = (
            (old >> 32) as u32,
            (old >> 16) as u16 & 0x7fff,
            old & (1 << 15) != 0,
            old & 0x7fff,
        );
        let (idle, n) = if o_tid != tid {
            (false, 0)
        } else if o_q != qid {
            (true, 0)
        } else if o_idle && o_n + 1 >= RECHECK {
            (false, 0)
        } else {
            (o_idle, o_n + 1)
        };
        let new = (tid as u64) << 32 | ((qid & 0x7fff) as u64) << 16 | (idle as u64) << 15 | n;
        slot.store(new, Ordering::Relaxed);
        idle
    }
}
