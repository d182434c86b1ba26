//! The daemon's life: one phase that only moves forward, and the reason it stopped.
//!
//! ```text
//!   Serving ──(the kernel unmounted)──▶ Unmounting ──▶ Stopped
//!      │  └──(an io_uring queue ended)──▶ Halting ────▶ Stopped
//!      └─────(the lease was lost)───────▶ LeaseLost ──▶ Stopped
//! ```
//!
//! File operations are answered while `Serving` or `Unmounting` (and only while the lease's
//! deadline allows, holder.rs); the committer makes its last commit in `Unmounting` and
//! `Halting`, and none after `LeaseLost`. `Daemon::serve` waits for the phase to leave
//! `Serving` and returns a [`Stop`]; only the binary's `main` turns that into an exit.

use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::{Condvar, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Mounted (or running in-process) and answering requests.
    Serving = 0,
    /// The kernel let the mount go: every dirty page has arrived; the last commit follows.
    Unmounting = 1,
    /// A registered io_uring queue ended: requests fail with EIO, the last commit is made
    /// without flushing the kernel (decisions/fuse-over-io-uring.md).
    Halting = 2,
    /// The lease was lost or a commit was fenced: nothing is committed any more.
    LeaseLost = 3,
    /// Done.
    Stopped = 4,
}

impl Phase {
    fn of(v: u8) -> Phase {
        match v {
            0 => Phase::Serving,
            1 => Phase::Unmounting,
            2 => Phase::Halting,
            3 => Phase::LeaseLost,
            _ => Phase::Stopped,
        }
    }
}

/// Why a daemon stopped, as `Daemon::serve` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Unmounted, and the last commit is durable: generation `last` holds everything.
    Unmounted { last: u64 },
    /// Unmounted, but the last commit failed: generation `last` is the last durable one.
    FinalCommitFailed { last: u64 },
    /// The lease was lost: nothing after generation `last` was committed.
    LeaseLost { why: String, last: u64 },
    /// An io_uring queue ended (`committed`: the last commit finished in time).
    Halted {
        why: String,
        last: u64,
        committed: bool,
    },
}

impl Stop {
    /// The process's exit status for this stop (docs/EXIT_CODES.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Stop::Unmounted { .. } => 0,
            Stop::FinalCommitFailed { .. } => crate::exit::UNREACHABLE,
            Stop::LeaseLost { .. } => crate::exit::LEASE_LOST,
            Stop::Halted { .. } => crate::exit::STOPPED,
        }
    }
}

/// The phase, readable without a lock on every request, and the reason of a stop.
pub struct Lifecycle {
    phase: AtomicU8,
    /// Why the daemon left `Serving`, and whether the phase's own work is done (a lost
    /// lease's hook has run): `Daemon::serve` returns only then.
    why: Mutex<(Option<String>, bool)>,
    changed: Condvar,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            phase: AtomicU8::new(Phase::Serving as u8),
            why: Mutex::new((None, true)),
            changed: Condvar::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::of(self.phase.load(Ordering::Acquire))
    }

    /// File operations are answered (the lease's deadline aside).
    pub fn answers_requests(&self) -> bool {
        self.phase() <= Phase::Unmounting
    }

    /// The committer's next commit is its last (unmounting or halting).
    pub fn last_commit(&self) -> bool {
        matches!(self.phase(), Phase::Unmounting | Phase::Halting)
    }

    pub fn lease_lost(&self) -> bool {
        self.phase() == Phase::LeaseLost
    }

    /// Why the daemon left `Serving` (for `Halting` and `LeaseLost`).
    pub fn why(&self) -> Option<String> {
        self.why.lock().0.clone()
    }

    /// Moves to `next` if that is forward; false if the daemon is already there or past it
    /// (of two reasons for one phase, the first wins; a later phase, say a lost lease while
    /// halting, brings its own reason). `settled`: nothing more to do for this phase before
    /// `serve` may return (else `settle` says when). Invariant: the phase never moves back.
    pub fn advance(&self, next: Phase, why: Option<&str>, settled: bool) -> bool {
        let mut w = self.why.lock();
        let now = self.phase();
        if next <= now {
            return false;
        }
        if let Some(why) = why {
            w.0 = Some(why.to_string());
        }
        w.1 = settled;
        let was = self.phase.swap(next as u8, Ordering::AcqRel);
        assert!(
            was < next as u8,
            "owfs bug: the daemon's phase moved back from {:?} to {next:?}",
            Phase::of(was)
        );
        self.changed.notify_all();
        true
    }

    /// The work of the current phase is done (see `advance`).
    pub fn settle(&self) {
        self.why.lock().1 = true;
        self.changed.notify_all();
    }

    /// Waits until the phase has left `Serving` and its work is done; returns it.
    pub fn wait_past_serving(&self) -> Phase {
        let mut w = self.why.lock();
        while self.phase() == Phase::Serving || !w.1 {
            self.changed.wait(&mut w);
        }
        self.phase()
    }

    /// Waits until the current phase's work is done.
    pub fn wait_settled(&self) {
        let mut w = self.why.lock();
        while !w.1 {
            self.changed.wait(&mut w);
        }
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_only_moves_forward_and_the_first_reason_wins() {
        let l = Lifecycle::new();
        assert!(l.answers_requests() && !l.last_commit());
        assert!(l.advance(Phase::Halting, Some("queue 1 ended"), true));
        assert!(!l.answers_requests() && l.last_commit());
        // Unmounting is behind Halting: refused, the reason stays.
        assert!(!l.advance(Phase::Unmounting, None, true));
        assert!(!l.advance(Phase::Halting, Some("queue 2 ended"), true));
        assert_eq!(l.why().as_deref(), Some("queue 1 ended"));
        assert!(l.advance(Phase::LeaseLost, Some("fenced"), true));
        assert!(l.lease_lost() && !l.last_commit());
        assert!(l.advance(Phase::Stopped, None, true));
        assert_eq!(l.phase(), Phase::Stopped);
    }

    #[test]
    fn a_waiter_wakes_when_serving_ends() {
        let l = std::sync::Arc::new(Lifecycle::new());
        let l2 = l.clone();
        let t = std::thread::spawn(move || l2.wait_past_serving());
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A lost lease wakes the waiter only once its work is done.
        l.advance(Phase::LeaseLost, Some("taken"), false);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished());
        l.settle();
        assert_eq!(t.join().unwrap(), Phase::LeaseLost);
    }
}
