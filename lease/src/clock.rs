//! The clocks the lease reads, injectable so that its timing can be tested on simulated time.
//!
//! The lease uses two clocks (docs/decisions/lease.md, "Timing argument"): a monotonic one for
//! the holder's serving deadline, and the wall clock that the record stores (`renewed_ms`,
//! `expires_ms`) and that a taker compares with `expires_ms + max_skew`. It also waits: between
//! the polls of `Mode::Wait`, and for a renewal no longer than until the deadline.
//! `SystemClock` is the real thing; `ManualClock` moves only when told to.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A wait on a `Clock`.
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Where the lease gets its time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Monotonic time: the serving deadline is measured on it.
    fn now(&self) -> Instant;
    /// Wall-clock time in milliseconds since the Unix epoch: what the record stores and what
    /// decides whether a record has expired.
    fn wall_ms(&self) -> u64;
    /// Completes once `d` has passed on this clock.
    fn sleep(&self, d: Duration) -> Sleep<'_>;
}

/// The machine's clocks (`Instant`, `SystemTime`) and tokio's timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall_ms(&self) -> u64 {
        chunkstore::generation::now_ms()
    }

    fn sleep(&self, d: Duration) -> Sleep<'_> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// Simulated time for tests: both clocks stand still until `advance` (or `step_wall`, for
/// the wall clock alone) moves them; a `sleep` completes when `advance` reaches its end.
/// `next_wake` tells a test driving a waiting task how far to move.
#[derive(Debug)]
pub struct ManualClock {
    origin: Instant,
    now: tokio::sync::watch::Sender<Reading>,
    /// End of every pending sleep (time after `origin`) → how many end there.
    sleepers: Mutex<BTreeMap<Duration, usize>>,
}

#[derive(Debug, Clone, Copy)]
struct Reading {
    /// Monotonic time since `origin`.
    elapsed: Duration,
    wall_ms: u64,
}

/// The wall clock a `ManualClock::new()` starts at: 2025-01-01T00:00:00Z.
pub const MANUAL_CLOCK_START_MS: u64 = 1_735_689_600_000;

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock whose wall time starts at `MANUAL_CLOCK_START_MS`.
    pub fn new() -> ManualClock {
        Self::with_wall_ms(MANUAL_CLOCK_START_MS)
    }

    /// A clock whose wall time starts at `wall_ms` (another node's clock, `wall_ms` minus
    /// this one's: their skew).
    pub fn with_wall_ms(wall_ms: u64) -> ManualClock {
        ManualClock {
            origin: Instant::now(),
            now: tokio::sync::watch::Sender::new(Reading {
                elapsed: Duration::ZERO,
                wall_ms,
            }),
            sleepers: Mutex::new(BTreeMap::new()),
        }
    }

    /// Moves both clocks forward by `d` and wakes the sleeps that end by then.
    pub fn advance(&self, d: Duration) {
        self.now.send_modify(|r| {
            r.elapsed += d;
            r.wall_ms += d.as_millis() as u64;
        });
    }

    /// Moves both clocks forward to `t` (nothing if `t` has passed).
    pub fn advance_to(&self, t: Instant) {
        let now = self.now();
        if t > now {
            self.advance(t - now);
        }
    }

    /// Steps the wall clock alone by `ms` (negative: back), as an adjustment of the system
    /// time does; the monotonic clock does not move.
    pub fn step_wall(&self, ms: i64) {
        self.now
            .send_modify(|r| r.wall_ms = r.wall_ms.saturating_add_signed(ms));
    }

    /// When the earliest pending sleep ends; None if nothing sleeps on this clock.
    pub fn next_wake(&self) -> Option<Instant> {
        let sleepers = self.sleepers.lock().expect("sleepers lock");
        sleepers.keys().next().map(|&at| self.origin + at)
    }

    fn elapsed(&self) -> Duration {
        self.now.borrow().elapsed
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.origin + self.elapsed()
    }

    fn wall_ms(&self) -> u64 {
        self.now.borrow().wall_ms
    }

    /// The sleep counts as pending (`next_wake`) from this call until it completes or is
    /// dropped.
    fn sleep(&self, d: Duration) -> Sleep<'_> {
        let mut now = self.now.subscribe();
        let Some(end) = now.borrow().elapsed.checked_add(d) else {
            // Longer than the clock can count: never ends.
            return Box::pin(std::future::pending());
        };
        *self
            .sleepers
            .lock()
            .expect("sleepers lock")
            .entry(end)
            .or_default() += 1;
        let pending = Pending { clock: self, end };
        Box::pin(async move {
            let _pending = pending;
            // The sender lives as long as the clock, which this future borrows.
            let _ = now.wait_for(|r| r.elapsed >= end).await;
        })
    }
}

/// Removes a sleep from `ManualClock::sleepers` when it completes or is dropped.
struct Pending<'a> {
    clock: &'a ManualClock,
    end: Duration,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut sleepers = self.clock.sleepers.lock().expect("sleepers lock");
        if let Some(n) = sleepers.get_mut(&self.end) {
            *n -= 1;
            if *n == 0 {
                sleepers.remove(&self.end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_sleep_ends_when_the_clock_reaches_it() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        assert_eq!(clock.next_wake(), None);
        let mut sleep = clock.sleep(Duration::from_millis(300));
        assert_eq!(clock.next_wake(), Some(t0 + Duration::from_millis(300)));
        assert!(futures_poll(&mut sleep).is_pending());
        clock.advance(Duration::from_millis(299));
        assert!(futures_poll(&mut sleep).is_pending());
        clock.advance(Duration::from_millis(1));
        assert!(futures_poll(&mut sleep).is_ready());
        drop(sleep);
        assert_eq!(clock.next_wake(), None);
        assert_eq!(clock.wall_ms(), MANUAL_CLOCK_START_MS + 300);

        // A dropped sleep is no longer pending; the wall clock steps alone.
        let sleep = clock.sleep(Duration::from_secs(1));
        assert!(clock.next_wake().is_some());
        drop(sleep);
        assert_eq!(clock.next_wake(), None);
        let before = clock.now();
        clock.step_wall(-5_000);
        assert_eq!(clock.wall_ms(), MANUAL_CLOCK_START_MS + 300 - 5_000);
        assert_eq!(clock.now(), before);
    }

    fn futures_poll(f: &mut Sleep<'_>) -> std::task::Poll<()> {
        let waker = std::task::Waker::noop();
        f.as_mut().poll(&mut std::task::Context::from_waker(waker))
    }
}
