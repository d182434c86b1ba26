//! The epoch-fenced lease of a workspace (DESIGN.md §5, `docs/decisions/lease.md`).
//!
//! The lease of workspace W is the mutable object `ws/W/lease`: a pretty JSON `LeaseRecord`
//! changed only by compare-and-swap (`Store::put_cas`). Acquiring it creates it (epoch 1) or
//! replaces a released or expired record (or any record, with `Mode::Takeover`) by one with
//! the next epoch. The holder renews it well inside the TTL and stops serving writes at its
//! `deadline()` (monotonic clock) if it could not; another node takes over only once its wall
//! clock passes `expires_ms + max_skew`. A node that took over from a holder that had not
//! released publishes a fence generation before anything else (`Lease::took_over`).

// `LeaseError` carries whole records (who holds it, for the message); the lease is touched
// once per renewal, so the size of its `Result`s does not matter.
#![allow(clippy::result_large_err)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use chunkstore::generation::{new_nonce, now_ms};
use chunkstore::store::Version;
use chunkstore::Store;
use serde::{Deserialize, Serialize};

/// `LeaseRecord::format` written and understood.
pub const FORMAT: u32 = 1;

/// Key of the lease object of workspace `ws`.
pub fn lease_key(ws: &str) -> String {
    format!("ws/{ws}/lease")
}

/// Who holds (or held) a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The node's name (`--node`, else the host name).
    pub node: String,
    pub host: String,
    pub pid: u32,
}

impl Holder {
    /// This process on this host, under the node name `node`.
    pub fn this_process(node: &str) -> Holder {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Holder {
            node: node.to_string(),
            host,
            pid: std::process::id(),
        }
    }
}

/// The content of `ws/W/lease`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// 1.
    pub format: u32,
    pub workspace: String,
    /// Bumped by every acquisition; the holder's publishes carry it (fencing).
    pub epoch: u64,
    pub holder: Holder,
    /// Holder's wall clock (ms since the Unix epoch) when this epoch was acquired.
    pub acquired_ms: u64,
    /// Holder's wall clock at the start of the last renewal.
    pub renewed_ms: u64,
    /// `renewed_ms + ttl_ms`: others may take over once their wall clock passes this plus
    /// their `max_skew`.
    pub expires_ms: u64,
    pub ttl_ms: u64,
    /// Planned release: free at once, no fence needed.
    pub released: bool,
    /// Random per write: tells our own write from another's after an ambiguous failure.
    pub nonce: String,
}

/// Lease timing. `validate` checks the relations the safety argument needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Validity of a renewal, from its start.
    pub ttl: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// The holder stops serving writes this long before the TTL runs out (by its monotonic
    /// clock): covers clock rate error and the time to stop.
    pub margin: Duration,
    /// Assumed bound on the difference between nodes' wall clocks; a taker waits this long
    /// past `expires_ms`.
    pub max_skew: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            margin: Duration::from_secs(5),
            max_skew: Duration::from_secs(2),
        }
    }
}

impl LeaseConfig {
    /// Checks: margin > 0, margin < ttl, 0 < renew_every < ttl − margin. The error says what
    /// to change.
    pub fn validate(&self) -> Result<(), LeaseError> {
        let bad = |what: String| Err(LeaseError::Config(what));
        if self.margin.is_zero() {
            return bad(
                "the margin must be above 0 (default 5 s): the holder must stop \
                        before its lease runs out"
                    .into(),
            );
        }
        if self.margin >= self.ttl {
            return bad(format!(
                "the margin ({}) must be shorter than the ttl ({}): raise the ttl or lower \
                 the margin",
                fmt_duration(self.margin),
                fmt_duration(self.ttl)
            ));
        }
        if self.renew_every.is_zero() {
            return bad("renew_every must be above 0 (default 10 s)".into());
        }
        let window = self.ttl - self.margin;
        if self.renew_every >= window {
            return bad(format!(
                "renew_every ({}) must be shorter than ttl − margin ({} − {} = {}), else the \
                 holder stops before its first renewal: lower renew_every (ideally to a third \
                 of the ttl or less) or raise the ttl",
                fmt_duration(self.renew_every),
                fmt_duration(self.ttl),
                fmt_duration(self.margin),
                fmt_duration(window)
            ));
        }
        Ok(())
    }
}

/// How `acquire` treats a lease that another node holds and has not let expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fail with `LeaseError::Held`.
    Normal,
    /// Wait until it is released or expires (up to the given time; `None` = forever), then
    /// take it; `LeaseError::Timeout` if the time runs out.
    Wait(Option<Duration>),
    /// Take it at once (the old holder is fenced out and stops).
    Takeover,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "workspace {} is held by {}, epoch {}; its lease expires in {}. Use --wait to wait \
         for it, or --takeover to fence it out (it will be stopped).",
        .record.workspace,
        holder_text(&.record.holder),
        .record.epoch,
        fmt_seconds(*.expires_in)
    )]
    Held {
        record: LeaseRecord,
        /// Until the lease may be taken without `--takeover` (by our wall clock, skew
        /// included).
        expires_in: Duration,
    },

    /// Renewal found another epoch or holder, or our deadline passed: stop writing.
    #[error("lost the lease: {reason}")]
    Lost { reason: String },

    #[error("lease: {0}")]
    Store(#[from] chunkstore::Error),

    #[error(
        "gave up waiting for workspace {}: it is still held by {}, epoch {}. Try again \
         later, or use --takeover to fence it out (it will be stopped).",
        .record.workspace,
        holder_text(&.record.holder),
        .record.epoch
    )]
    Timeout { record: LeaseRecord },

    /// `LeaseConfig::validate` refused the settings.
    #[error("invalid lease settings: {0}")]
    Config(String),
}

fn holder_text(h: &Holder) -> String {
    format!("node {} (host {}, pid {})", h.node, h.host, h.pid)
}

/// Whole seconds, rounded up ("12 s").
fn fmt_seconds(d: Duration) -> String {
    format!("{} s", d.as_millis().div_ceil(1000))
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The stored form of a lease record: pretty JSON and a newline.
pub fn encode(record: &LeaseRecord) -> Bytes {
    let mut json = serde_json::to_vec_pretty(record).expect("a lease record serializes");
    json.push(b'\n');
    Bytes::from(json)
}

/// Reads the lease record of `ws` from its stored form: any bytes give a record or an error
/// (lease/tests/hostile.rs).
pub fn decode(bytes: &[u8], ws: &str) -> Result<LeaseRecord, LeaseError> {
    let key = lease_key(ws);
    let record: LeaseRecord = serde_json::from_slice(bytes).map_err(|e| {
        chunkstore::Error::corrupt(format!("lease record {key} is not valid JSON: {e}"))
    })?;
    if record.format != FORMAT {
        return Err(chunkstore::Error::Format {
            what: format!(
                "lease record {key} has format {} (this owfs knows {FORMAT}): upgrade owfs",
                record.format
            ),
        }
        .into());
    }
    if record.workspace != ws {
        return Err(chunkstore::Error::corrupt(format!(
            "lease record {key} names workspace {:?}",
            record.workspace
        ))
        .into());
    }
    // The next holder takes epoch + 1: u64::MAX has no successor (an overflow panic, or a
    // wrap to 0 that would undo fencing).
    if record.epoch == u64::MAX {
        return Err(chunkstore::Error::corrupt(format!(
            "lease record {key} has epoch {}, which cannot be followed",
            record.epoch
        ))
        .into());
    }
    Ok(record)
}

/// Whether others may take `record` over now (without forcing), by wall clock `wall_ms`.
pub fn is_free(record: &LeaseRecord, wall_ms: u64, cfg: &LeaseConfig) -> bool {
    record.released || wall_ms > record.expires_ms.saturating_add(ms(cfg.max_skew))
}

/// Time until `record` may be taken over without forcing (1 ms more and it is free).
fn until_free(record: &LeaseRecord, wall_ms: u64, cfg: &LeaseConfig) -> Duration {
    let free_at = record.expires_ms.saturating_add(ms(cfg.max_skew));
    Duration::from_millis(free_at.saturating_sub(wall_ms))
}

/// The current lease record of `ws`; None if it never had one.
pub async fn read(store: &Store, ws: &str) -> Result<Option<LeaseRecord>, LeaseError> {
    Ok(read_versioned(store, ws).await?.map(|(record, _)| record))
}

/// The current lease record of `ws` with its version (for the next CAS); None if absent.
async fn read_versioned(
    store: &Store,
    ws: &str,
) -> Result<Option<(LeaseRecord, Version)>, LeaseError> {
    match store.get_versioned(&lease_key(ws)).await? {
        None => Ok(None),
        Some((bytes, version)) => Ok(Some((decode(&bytes, ws)?, version))),
    }
}

/// Acquires the lease of `ws` for `holder` (see `Mode`). Absent: created with epoch 1.
/// Released or expired (our wall clock past `expires_ms + max_skew`), or forced: replaced
/// with the next epoch. A lost race re-reads and decides again (a racer that now holds it
/// live makes this `Held`, or keeps `Wait` waiting; `Takeover` forces only the record it
/// first read, never a racer's).
pub async fn acquire(
    store: &Store,
    ws: &str,
    holder: Holder,
    cfg: &LeaseConfig,
    mode: Mode,
) -> Result<Lease, LeaseError> {
    cfg.validate()?;
    let key = lease_key(ws);
    let wait_until = match mode {
        Mode::Wait(Some(limit)) => Some(Instant::now() + limit),
        _ => None,
    };
    let mut force = mode == Mode::Takeover;
    loop {
        let (prev, version) = read_versioned(store, ws).await?.unzip();
        let wall = now_ms();
        let take = match &prev {
            None => true,
            Some(p) => force || is_free(p, wall, cfg),
        };
        if take {
            let start = Instant::now();
            let wall = now_ms();
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
                    let mut lease = Lease {
                        store: store.clone(),
                        key,
                        cfg: cfg.clone(),
                        record,
                        version,
                        took_over: prev.filter(|p| !p.released),
                        deadline: start + (cfg.ttl - cfg.margin),
                        unresolved: Vec::new(),
                    };
                    // A write that took longer than the lease is good for (a loaded store)
                    // leaves a lease whose deadline has passed. Nothing was served under it,
                    // so renewing is safe even past the deadline: a few tries, then give up.
                    let mut renewals = 0;
                    while Instant::now() >= lease.deadline {
                        if renewals == SLOW_ACQUIRE_RENEWALS {
                            return Err(lease.past_deadline());
                        }
                        renewals += 1;
                        lease.cas_renew(false).await?;
                    }
                    return Ok(lease);
                }
                None => {
                    // Someone else wrote first: look again.
                    force = false;
                    continue;
                }
            }
        }
        let prev = prev.expect("only a live record is not taken");
        match mode {
            Mode::Normal | Mode::Takeover => {
                return Err(LeaseError::Held {
                    expires_in: until_free(&prev, wall, cfg),
                    record: prev,
                })
            }
            Mode::Wait(_) => {
                let now = Instant::now();
                let remaining = match wait_until {
                    Some(t) if now >= t => return Err(LeaseError::Timeout { record: prev }),
                    Some(t) => t - now,
                    None => Duration::MAX,
                };
                let pause = Duration::from_secs(1).min(remaining).min(
                    (until_free(&prev, wall, cfg) + Duration::from_millis(1))
                        .max(Duration::from_millis(20)),
                );
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// A held lease. Renew it every `renew_every`; stop serving writes at `deadline()` if a
/// renewal has not moved it.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    key: String,
    cfg: LeaseConfig,
    record: LeaseRecord,
    version: Version,
    took_over: Option<LeaseRecord>,
    deadline: Instant,
    /// Nonces of renewals that failed with an error (they may have landed all the same).
    unresolved: Vec<String>,
}

/// Renewals `acquire` tries when the acquiring write itself outlasted ttl − margin.
const SLOW_ACQUIRE_RENEWALS: u32 = 3;

/// Failed renewals remembered (one every `renew_every` until the deadline: a handful).
const MAX_UNRESOLVED: usize = 16;

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
    /// (expired or forced): the caller must publish a fence generation before anything else.
    pub fn took_over(&self) -> Option<&LeaseRecord> {
        self.took_over.as_ref()
    }

    /// Monotonic instant until which this node may serve writes: start of the last
    /// successful renewal (taken with Instant::now() BEFORE sending the request) + ttl −
    /// margin.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// CAS the record with a new expiry; Lost if the version changed under us (someone took
    /// over) or if we are already past deadline() when the reply arrives. A `Store` error
    /// leaves the lease as it was: try again until the deadline (a renewal that failed but
    /// landed is recognized by its nonce next time).
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        self.cas_renew(true).await
    }

    /// `renew`; with `served` false (a lease just acquired, under which nothing was served
    /// yet) a passed deadline is no reason to stop: a successful CAS proves nobody took the
    /// epoch in between, and the new deadline counts from this request's start.
    async fn cas_renew(&mut self, served: bool) -> Result<(), LeaseError> {
        loop {
            let start = Instant::now();
            if served && start >= self.deadline {
                return Err(self.past_deadline());
            }
            let wall = now_ms();
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
                    if served && Instant::now() >= self.deadline {
                        return Err(self.past_deadline());
                    }
                    self.deadline = start + (self.cfg.ttl - self.cfg.margin);
                    return Ok(());
                }
                Ok(None) => self.changed_under_us().await?,
            }
        }
    }

    /// Planned release: CAS released=true (same epoch); the next acquire takes it at once.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        loop {
            let mut record = self.record.clone();
            record.released = true;
            record.renewed_ms = now_ms();
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

    fn past_deadline(&self) -> LeaseError {
        LeaseError::Lost {
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
    async fn changed_under_us(&mut self) -> Result<(), LeaseError> {
        let ws = self.record.workspace.clone();
        let Some((record, version)) = read_versioned(&self.store, &ws).await? else {
            return Err(LeaseError::Lost {
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
        Err(LeaseError::Lost { reason })
    }
}
