//! The daemon's fault knobs, for tests: delays and stops that `OWFS_FAULTS` sets (syntax in
//! chunkstore's `faulty.rs`) to hold the daemon at a chosen point of a write, a commit or an
//! io_uring queue, read from the environment once per mount.

use std::time::Duration;

/// The daemon's knobs of `OWFS_FAULTS`; each is off unless the variable sets it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Faults {
    write_delay: Option<Duration>,
    uring_stop_after: Option<u64>,
    commit_pause: Option<Duration>,
    barrier_pause: Option<Duration>,
    cut_attempts: Option<u32>,
}

impl Faults {
    /// The knobs `OWFS_FAULTS` sets now (all off when it is unset or empty).
    pub(crate) fn from_env() -> Faults {
        let Some(f) = chunkstore::faulty::FaultConfig::from_env() else {
            return Faults::default();
        };
        let ms = |ms: u64| Some(Duration::from_millis(ms)).filter(|d| !d.is_zero());
        Faults {
            write_delay: ms(f.fuse_write_delay_ms),
            uring_stop_after: f.uring_stop_after,
            commit_pause: ms(f.commit_pause_ms),
            barrier_pause: ms(f.barrier_pause_ms),
            cut_attempts: f.cut_attempts.map(|n| n.max(1)),
        }
    }

    /// `fuse_write_delay_ms`: every FUSE WRITE waits this long before it is served, so
    /// the kernel's writeback is still in flight when a cut starts.
    pub(crate) fn write_delay(&self) -> Option<Duration> {
        self.write_delay
    }

    /// `uring_stop_after`: an io_uring queue thread stops after taking this many
    /// requests, leaving the last one unanswered, as if it had died.
    pub(crate) fn uring_stop_after(&self) -> Option<u64> {
        self.uring_stop_after
    }

    /// `commit_pause_ms`: the committer waits this long after its barrier, before it
    /// reads the frozen files.
    pub(crate) fn commit_pause(&self) -> Option<Duration> {
        self.commit_pause
    }

    /// `barrier_pause_ms`: the committer waits this long between its flush of the
    /// kernel's pages and its barrier.
    pub(crate) fn barrier_pause(&self) -> Option<Duration> {
        self.barrier_pause
    }

    /// `cut_attempts` (at least 1): the barriers a commit tries before it holds back
    /// names replaced by renames whose sources it has not flushed yet.
    pub(crate) fn cut_attempts(&self) -> Option<u32> {
        self.cut_attempts
    }
}
