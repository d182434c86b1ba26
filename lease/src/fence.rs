//! Fencing: holding the lease of a workspace, and locking out whoever held it before.
//!
//! Everything a holder does with its lease is here (docs/decisions/lease.md,
//! docs/decisions/fencing-in-one-place.md):
//! - `acquire` takes it: refused, waited for, or forced from a live holder (`Mode`);
//! - `Lease::fence`, after taking it from a holder that had not released it, publishes the
//!   fence generation: the latest generation's content again, with our epoch, at latest + 1,
//!   so that the old holder's next publish finds that number taken and it stops;
//! - `Lease::renew` moves the serving deadline: the start of the last successful renewal +
//!   ttl − margin, on the monotonic clock. From the deadline on, `may_serve` is false: the
//!   holder answers nothing and publishes nothing. `ServingDeadline` answers the same question
//!   without a lock, for every request of a mount;
//! - `Lease::release` frees it at once after the holder's last publish.
//!
//! Time comes from a `Clock`: `SystemClock` in production, `ManualClock` in the tests.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::generation::{self, new_nonce, GenRecord};
use chunkstore::store::Version;
use chunkstore::{publish, Repo, Store};

use crate::clock::Clock;
use crate::error::{fmt_duration, holder_text, Error};
use crate::record::{encode, is_free, lease_key, ms, read_versioned, until_free};
use crate::{Holder, LeaseConfig, LeaseRecord, FORMAT};

/// How `acquire` treats a lease that another node holds and has not let expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fail with `Error::Held`.
    Normal,
    /// Wait until it is released or expires (up to the given time; `None` = forever), then
    /// take it; `Error::Timeout` if the time runs out.
    Wait(Option<Duration>),
    /// Take it at once (the old holder is fenced out and stops).
    Takeover,
}

/// Acquires the lease of `ws` for `holder` (see `Mode`), on `clock`'s time. Absent: created
/// with epoch 1. Released or expired (our wall clock past `expires_ms + max_skew`), or
/// forced: replaced with the next epoch. A lost race re-reads and decides again (a racer that
/// now holds it live makes this `Held`, or keeps `Wait` waiting; `Takeover` forces only the
/// epoch it first read, renewed since or not, never a racer's).
pub async fn acquire(
    store: &Store,
    ws: &str,
    holder: Holder,
    cfg: &LeaseConfig,
    mode: Mode,
    clock: Arc<dyn Clock>,
) -> Result<Lease, Error> {
    cfg.validate()?;
    let key = lease_key(ws);
    let wait_until = match mode {
        Mode::Wait(Some(limit)) => Some(clock.now() + limit),
        _ => None,
    };
    // The epoch a takeover fences out: the one read first. Its holder renewing between our
    // read and our write (every `renew_every`) must not turn the takeover into `Held`.
    let mut force_epoch = None;
    let mut first = true;
    loop {
        let (prev, version) = read_versioned(store, ws).await?.unzip();
        if first && mode == Mode::Takeover {
            force_epoch = prev.as_ref().map(|p| p.epoch);
        }
        first = false;
        let wall = clock.wall_ms();
        let take = match &prev {
            None => true,
            Some(p) => force_epoch == Some(p.epoch) || is_free(p, wall, cfg),
        };
        if take {
            let start = clock.now();
            let wall = clock.wall_ms();
            let record = LeaseRecord {
                format: FORMAT,
                workspace: ws.to_string(),
                epoch: prev.as_ref().map_or(1, |p| p.epoch + 1),
                holder: holder.clone(),
                acquired_ms: wall,
                renewed_ms: wall,
                expires_ms: wall + ms(cfg.ttl),
                ttl_ms: ms(cfg.ttl),
                released: false,
                nonce: new_nonce(),
            };
            match store
                .put_cas_versioned(&key, version.as_ref(), encode(&record))
                .await?
            {
                Some(version) => {
                    let deadline = ServingDeadline {
                        clock: clock.clone(),
                        origin: start,
                        after_origin_ns: AtomicU64::new(0),
                    };
                    deadline.set(start + (cfg.ttl - cfg.margin));
                    let mut lease = Lease {
                        store: store.clone(),
                        key,
                        cfg: cfg.clone(),
                        record,
                        version,
                        took_over: prev.filter(|p| !p.released),
                        deadline: Arc::new(deadline),
                        unresolved: Vec::new(),
                        clock,
                    };
                    // A write that took longer than the lease is good for (a loaded store)
                    // leaves a lease whose deadline has passed. Nothing was served under it,
                    // so renewing is safe even past the deadline: a few tries, then give up.
                    let mut renewals = 0;
                    while !lease.may_serve(lease.clock.now()) {
                        if renewals == SLOW_ACQUIRE_RENEWALS {
                            return Err(lease.past_deadline());
                        }
                        renewals += 1;
                        lease.cas_renew(false).await?;
                    }
                    return Ok(lease);
                }
                None => {
                    // Someone else wrote first (the holder renewing, or a racer): look again.
                    continue;
                }
            }
        }
        let prev = prev.expect("only a live record is not taken");
        match mode {
            Mode::Normal | Mode::Takeover => {
                return Err(Error::Held {
                    expires_in: until_free(&prev, wall, cfg),
                    record: Box::new(prev),
                })
            }
            Mode::Wait(_) => {
                let now = clock.now();
                let remaining = match wait_until {
                    Some(t) if now >= t => {
                        return Err(Error::Timeout {
                            record: Box::new(prev),
                        })
                    }
                    Some(t) => t - now,
                    None => Duration::MAX,
                };
                let pause = Duration::from_secs(1).min(remaining).min(
                    (until_free(&prev, wall, cfg) + Duration::from_millis(1))
                        .max(Duration::from_millis(20)),
                );
                clock.sleep(pause).await;
            }
        }
    }
}

/// Until when a holder may serve: the start of its last successful renewal (or of the
/// acquiring write) + ttl − margin, on the lease's monotonic clock. Shared between the
/// `Lease` (which moves it) and whoever checks it on every request (a lock-free read).
#[derive(Debug)]
pub struct ServingDeadline {
    clock: Arc<dyn Clock>,
    /// The start of the acquiring write: no deadline is earlier.
    origin: Instant,
    after_origin_ns: AtomicU64,
}

impl ServingDeadline {
    /// The deadline.
    pub fn get(&self) -> Instant {
        self.origin + Duration::from_nanos(self.after_origin_ns.load(Ordering::SeqCst))
    }

    /// Whether the holder may still serve and publish at `now`: strictly before the deadline.
    pub fn may_serve(&self, now: Instant) -> bool {
        now < self.get()
    }

    /// `may_serve` at the lease clock's present.
    pub fn may_serve_now(&self) -> bool {
        self.may_serve(self.clock.now())
    }

    /// The lease clock's present (monotonic).
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    fn set(&self, deadline: Instant) {
        let ns = deadline.saturating_duration_since(self.origin).as_nanos() as u64;
        self.after_origin_ns.store(ns, Ordering::SeqCst);
    }
}

/// A held lease. Renew it every `renew_every`; it may serve until its deadline, which only a
/// successful renewal moves.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    key: String,
    cfg: LeaseConfig,
    record: LeaseRecord,
    version: Version,
    took_over: Option<LeaseRecord>,
    deadline: Arc<ServingDeadline>,
    /// Nonces of renewals that failed with an error (they may have landed all the same).
    unresolved: Vec<String>,
    clock: Arc<dyn Clock>,
}

/// Renewals `acquire` tries when the acquiring write itself outlasted ttl − margin.
const SLOW_ACQUIRE_RENEWALS: u32 = 3;

/// Failed renewals remembered (one every `renew_every` until the deadline: a handful).
const MAX_UNRESOLVED: usize = 16;

/// Fence generations tried on top of an old holder that keeps publishing.
const FENCE_ATTEMPTS: u32 = 100;

impl Lease {
    pub fn epoch(&self) -> u64 {
        self.record.epoch
    }

    /// The record as last written by us.
    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// The previous record if we took it over from a holder that had NOT released it
    /// (expired or forced): `fence` must run before anything is served or published.
    pub fn took_over(&self) -> Option<&LeaseRecord> {
        self.took_over.as_ref()
    }

    /// Monotonic instant until which this node may serve writes: start of the last
    /// successful renewal (read from the clock BEFORE sending the request) + ttl − margin.
    pub fn deadline(&self) -> Instant {
        self.deadline.get()
    }

    /// Whether this node may serve and publish at `now` (before the deadline).
    pub fn may_serve(&self, now: Instant) -> bool {
        self.deadline.may_serve(now)
    }

    /// The deadline as a handle that stays current as the lease is renewed, for checks that
    /// must not wait for the lease (every request of a mount).
    pub fn serving_deadline(&self) -> Arc<ServingDeadline> {
        self.deadline.clone()
    }

    /// CAS the record with a new expiry, which moves the deadline. `Lost` if the version
    /// changed under us (someone took over), if the deadline has passed before the request
    /// or when its reply arrives, or if no reply came before the deadline. A `Store` error
    /// leaves the lease as it was: try again until the deadline (a renewal that failed but
    /// landed is recognized by its nonce next time).
    pub async fn renew(&mut self) -> Result<(), Error> {
        let now = self.clock.now();
        let deadline = self.deadline.get();
        if now >= deadline {
            return Err(self.past_deadline());
        }
        let unanswered = format!(
            "workspace {}: the lease renewal did not answer before the deadline",
            self.record.workspace
        );
        let clock = self.clock.clone();
        let limit = clock.sleep(deadline - now);
        tokio::select! {
            biased;
            r = self.cas_renew(true) => r,
            () = limit => Err(Error::Lost { reason: unanswered }),
        }
    }

    /// `renew`; with `served` false (a lease just acquired, under which nothing was served
    /// yet) a passed deadline is no reason to stop: a successful CAS proves nobody took the
    /// epoch in between, and the new deadline counts from this request's start.
    async fn cas_renew(&mut self, served: bool) -> Result<(), Error> {
        loop {
            let start = self.clock.now();
            if served && !self.may_serve(start) {
                return Err(self.past_deadline());
            }
            let wall = self.clock.wall_ms();
            let mut record = self.record.clone();
            record.renewed_ms = wall;
            record.expires_ms = wall + ms(self.cfg.ttl);
            record.ttl_ms = ms(self.cfg.ttl);
            record.nonce = new_nonce();
            let res = self
                .store
                .put_cas_versioned(&self.key, Some(&self.version), encode(&record))
                .await;
            match res {
                Err(e) => {
                    if self.unresolved.len() >= MAX_UNRESOLVED {
                        self.unresolved.remove(0);
                    }
                    self.unresolved.push(record.nonce);
                    return Err(e.into());
                }
                Ok(Some(version)) => {
                    self.version = version;
                    self.record = record;
                    self.unresolved.clear();
                    if served && !self.may_serve(self.clock.now()) {
                        return Err(self.past_deadline());
                    }
                    self.deadline.set(start + (self.cfg.ttl - self.cfg.margin));
                    return Ok(());
                }
                Ok(None) => self.changed_under_us().await?,
            }
        }
    }

    /// After a takeover from a holder that had not released (`took_over`), publishes the
    /// fence: the latest generation's content again, with our epoch, at latest + 1, so that
    /// the old holder's next publish finds the number taken and it stops. If the old holder
    /// published once more first, fences on top of that. None without a takeover: a holder
    /// that released published nothing after, so there is nothing to fence.
    ///
    /// The workspace must exist. Blocks on `repo`'s runtime (publication checks gc the same
    /// way every publish does): call it from a thread outside that runtime.
    pub fn fence(&self, repo: &Arc<Repo>) -> Result<Option<GenRecord>, Error> {
        if self.took_over.is_none() {
            return Ok(None);
        }
        let ws = &self.record.workspace;
        for _ in 0..FENCE_ATTEMPTS {
            let latest = repo
                .block_on(generation::latest(&repo.store, ws))?
                .ok_or_else(|| chunkstore::Error::UnknownWorkspace(ws.clone()))?;
            self.check_epoch(&latest)?;
            let mut rec = publish::derived(&latest, ws, Some(&latest), "fence");
            rec.epoch = self.epoch();
            match publish::publish_checked(repo, &mut rec, &HashSet::from([repo.root_of(&latest)?]))
            {
                Ok(()) => return Ok(Some(rec)),
                // The old holder published once more before it stopped: fence on top of that.
                Err(chunkstore::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(chunkstore::Error::Conflict(format!(
            "workspace {ws}: the previous holder keeps publishing; could not fence it"
        ))
        .into())
    }

    /// `Lost` if generation `rec` carries a newer epoch than ours: another node took the
    /// workspace over after we did, and fenced us out.
    pub fn check_epoch(&self, rec: &GenRecord) -> Result<(), Error> {
        if rec.epoch > self.epoch() {
            return Err(Error::Lost {
                reason: format!(
                    "workspace {}: generation {} carries epoch {}, newer than our lease's ({}): \
                     another node took over",
                    rec.workspace,
                    rec.number,
                    rec.epoch,
                    self.epoch()
                ),
            });
        }
        Ok(())
    }

    /// Planned release: CAS released=true (same epoch); the next acquire takes it at once.
    pub async fn release(mut self) -> Result<(), Error> {
        loop {
            let mut record = self.record.clone();
            record.released = true;
            record.renewed_ms = self.clock.wall_ms();
            record.nonce = new_nonce();
            match self
                .store
                .put_cas_versioned(&self.key, Some(&self.version), encode(&record))
                .await?
            {
                Some(_) => return Ok(()),
                None => self.changed_under_us().await?,
            }
        }
    }

    fn past_deadline(&self) -> Error {
        Error::Lost {
            reason: format!(
                "workspace {}: the lease (epoch {}) was not renewed before its deadline \
                 (ttl {} − margin {} after the last renewal); another node may take it over",
                self.record.workspace,
                self.record.epoch,
                fmt_duration(self.cfg.ttl),
                fmt_duration(self.cfg.margin)
            ),
        }
    }

    /// Our CAS lost: Ok if the record is our own renewal whose outcome was unknown (adopted:
    /// try again from it), else `Lost` saying who has it now.
    async fn changed_under_us(&mut self) -> Result<(), Error> {
        let ws = self.record.workspace.clone();
        let Some((record, version)) = read_versioned(&self.store, &ws).await? else {
            return Err(Error::Lost {
                reason: format!("workspace {ws}: the lease record was deleted"),
            });
        };
        if record.epoch == self.record.epoch
            && !record.released
            && self.unresolved.contains(&record.nonce)
        {
            self.record = record;
            self.version = version;
            self.unresolved.clear();
            return Ok(());
        }
        let reason = if record.epoch != self.record.epoch {
            format!(
                "workspace {ws} was taken over by {}, epoch {} (ours was {}): this node must \
                 stop writing",
                holder_text(&record.holder),
                record.epoch,
                self.record.epoch
            )
        } else {
            format!(
                "workspace {ws}: the lease record (epoch {}) was changed by another writer{}",
                record.epoch,
                if record.released { " (released)" } else { "" }
            )
        };
        Err(Error::Lost { reason })
    }
}
