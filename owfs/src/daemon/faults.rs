//! The daemon's fault knobs, for tests: delays and stops that `OWFS_FAULTS` sets (syntax in
//! chunkstore's `faulty.rs`) to hold the daemon at a chosen point of a write, a commit or an
//! io_uring queue. With the `faults` feature (the tests' build) `Faults` reads them from the
//! environment once per mount; without it (`cargo build --release -p owfs`) `Faults` is empty
//! and every knob is a constant "off", so the call sites need no `cfg` and the compiler drops
//! them (docs/decisions/faults-only-in-test-builds.md).

#[cfg(feature = "faults")]
pub(crate) use with_faults::Faults;
#[cfg(not(feature = "faults"))]
pub(crate) use without_faults::Faults;

/// Says once on stderr that `OWFS_FAULTS` is set but this binary cannot inject faults, so that
/// a test run against a release binary does not pass without the faults it asked for. Does
/// nothing in a build with the `faults` feature.
pub fn warn_if_ignored() {
    #[cfg(not(feature = "faults"))]
    if std::env::var_os("OWFS_FAULTS").is_some_and(|v| !v.is_empty()) {
        eprintln!(
            "owfs: warning: OWFS_FAULTS is ignored: this binary is built without fault \
             injection (the `faults` feature, for tests only)"
        );
    }
}

#[cfg(feature = "faults")]
mod with_faults {
    use std::time::Duration;

    /// The daemon's knobs of `OWFS_FAULTS`; each is off unless the variable sets it.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct Faults {
        write_delay: Option<Duration>,
        uring_stop_after: Option<u64>,
        commit_pause: Option<Duration>,
        barrier_pause: Option<Duration>,
        cut_attempts: Option<u32>,
    }

    impl Faults {
        /// The knobs `OWFS_FAULTS` sets now (all off when it is unset or empty).
        pub fn from_env() -> Faults {
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
        pub fn write_delay(&self) -> Option<Duration> {
            self.write_delay
        }

        /// `uring_stop_after`: an io_uring queue thread stops after taking this many
        /// requests, leaving the last one unanswered, as if it had died.
        pub fn uring_stop_after(&self) -> Option<u64> {
            self.uring_stop_after
        }

        /// `commit_pause_ms`: the committer waits this long after its barrier, before it
        /// reads the frozen files.
        pub fn commit_pause(&self) -> Option<Duration> {
            self.commit_pause
        }

        /// `barrier_pause_ms`: the committer waits this long between its flush of the
        /// kernel's pages and its barrier.
        pub fn barrier_pause(&self) -> Option<Duration> {
            self.barrier_pause
        }

        /// `cut_attempts` (at least 1): the barriers a commit tries before it holds back
        /// names replaced by renames whose sources it has not flushed yet.
        pub fn cut_attempts(&self) -> Option<u32> {
            self.cut_attempts
        }
    }
}

#[cfg(not(feature = "faults"))]
mod without_faults {
    use std::time::Duration;

    /// Built without fault injection: no knobs, each one always off. The methods are
    /// inlined constants, so the branches that read them vanish from the binary.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct Faults;

    impl Faults {
        /// Nothing to read: `OWFS_FAULTS` is ignored (see `warn_if_ignored`).
        pub fn from_env() -> Faults {
            Faults
        }

        #[inline(always)]
        pub fn write_delay(&self) -> Option<Duration> {
            None
        }

        #[inline(always)]
        pub fn uring_stop_after(&self) -> Option<u64> {
            None
        }

        #[inline(always)]
        pub fn commit_pause(&self) -> Option<Duration> {
            None
        }

        #[inline(always)]
        pub fn barrier_pause(&self) -> Option<Duration> {
            None
        }

        #[inline(always)]
        pub fn cut_attempts(&self) -> Option<u32> {
            None
        }
    }
}
