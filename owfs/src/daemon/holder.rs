//! The mount's side of the lease. The protocol (acquire, fence, renew, the serving deadline,
//! release) is the lease crate's `lease::fence` (docs/decisions/lease.md,
//! docs/decisions/fencing-in-one-place.md); a mount adds this node's identity, a thread that
//! renews on schedule, its reaction to a lost lease (fail-stop) and what `owfs status` shows.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::generation;
use chunkstore::{Error, Repo, Result};
use lease::{Holder, Lease, LeaseConfig, Mode, ServingDeadline, SystemClock};
use parking_lot::{Condvar, Mutex};

use super::lifecycle::Phase;
use super::Shared;

/// What `owfs status` shows of the lease.
#[derive(Debug, Default, Clone)]
pub struct LeaseStats {
    pub renewals: u64,
    pub renew_failures: u64,
    pub last_renew_error: Option<String>,
    pub lost: Option<String>,
}

/// The lease of a running mount.
pub(super) struct MountLease {
    /// The lease while held; taken by the release at the end of a planned unmount.
    held: Mutex<Option<Lease>>,
    /// Its serving deadline, read without `held`'s lock on every request.
    deadline: Arc<ServingDeadline>,
    stats: Mutex<LeaseStats>,
    /// Set to end the renewer (the mount is finishing).
    stop: Mutex<bool>,
    stop_cv: Condvar,
}

impl MountLease {
    pub(super) fn new(lease: Lease) -> MountLease {
        MountLease {
            deadline: lease.serving_deadline(),
            held: Mutex::new(Some(lease)),
            stats: Mutex::new(LeaseStats::default()),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
        }
    }
}

/// This node's identity: a random id kept in the cache directory (two cache directories on
/// one machine are two nodes), the host name and our pid.
pub fn holder(cache_dir: &Path) -> Result<Holder> {
    let path = cache_dir.join("node-id");
    let node = match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            let id = generation::new_nonce()[..16].to_string();
            std::fs::write(&path, format!("{id}\n")).map_err(|e| Error::io(&path, e))?;
            id
        }
    };
    Ok(Holder::this_process(&node))
}

/// Takes the lease on the system clock (or fails naming its holder). Logs while waiting.
pub fn acquire(
    repo: &Arc<Repo>,
    ws: &str,
    holder: Holder,
    cfg: &LeaseConfig,
    mode: Mode,
) -> std::result::Result<Lease, lease::Error> {
    if let Mode::Wait(_) = mode {
        if let Ok(Some(rec)) = repo.block_on(lease::read(&repo.store, ws)) {
            if !rec.released {
                eprintln!(
                    "owfs: {ws} is held by node {} (host {}, pid {}), epoch {}; waiting for it",
                    rec.holder.node, rec.holder.host, rec.holder.pid, rec.epoch
                );
            }
        }
    }
    repo.block_on(lease::acquire(
        &repo.store,
        ws,
        holder,
        cfg,
        mode,
        Arc::new(SystemClock),
    ))
}

impl Shared {
    /// Whether this node may still serve and commit writes: no failure, and the lease's
    /// deadline (by our monotonic clock) not passed.
    pub(super) fn serving(&self) -> bool {
        !self.life.lease_lost() && self.lease.deadline.may_serve_now()
    }

    /// Whether file operations are answered: the phase (neither halting nor lease lost, which
    /// `answers_requests` covers) and the lease's deadline, one load each.
    pub(super) fn answers_requests(&self) -> bool {
        self.life.answers_requests() && self.lease.deadline.may_serve_now()
    }

    /// Right before publishing generation `number`: `Lost` unless this node may still serve.
    pub(super) fn may_publish(&self, number: u64) -> std::result::Result<(), lease::Error> {
        if self.serving() {
            return Ok(());
        }
        Err(lease::Error::Lost {
            reason: format!(
                "workspace {}: the lease's deadline passed before generation {number} was \
                 published",
                self.ws
            ),
        })
    }

    /// Fail-stop: every file operation now returns EIO and nothing more is committed. Runs
    /// the `on_lease_loss` hook, then lets `Daemon::serve` return `Stop::LeaseLost` (the
    /// process exits with status 13 without unmounting: the mount stays as a dead end,
    /// ENOTCONN, so that nothing can write to the directory under it believing it is the
    /// workspace).
    pub(super) fn lease_lost(&self, why: &str) {
        if self.life.advance(Phase::LeaseLost, Some(why), false) {
            eprintln!("owfs: {}: stopping writes: {why}", self.ws);
        }
        {
            let mut ls = self.lease.stats.lock();
            if ls.lost.is_some() {
                return;
            }
            ls.lost = Some(why.to_string());
        }
        {
            // Waiting `sync` callers learn why.
            let mut s = self.sync.lock();
            s.done_err = s.requested;
            s.err = Some(format!("lease lost: {why}"));
            self.sync_cv.notify_all();
        }
        // The kernel opens, appends to and stats files from its caches without asking (no
        // OPEN, attributes cached for an hour): drop every cached attribute, so that the next
        // path walk or write asks, and gets EIO. (Not on a request thread: offset -1 touches
        // attributes only.)
        if let Some(n) = self.notifier.get() {
            let inos: Vec<u64> = self.table.lock().nodes.keys().copied().collect();
            for ino in inos {
                let _ = n.inval_inode(fuser::INodeNo(ino), -1, 0);
            }
        }
        eprintln!(
            "owfs: {}: LEASE LOST: {why}. Every file operation on {} now fails with EIO; nothing written after this was committed.",
            self.ws,
            self.mountpoint.display()
        );
        if let Some(cmd) = &self.opts.on_lease_loss {
            eprintln!("owfs: {}: running on_lease_loss: {cmd}", self.ws);
            let st = std::process::Command::new("/bin/sh")
                .args(["-c", cmd])
                .env("OWFS_WORKSPACE", &self.ws)
                .env("OWFS_MOUNTPOINT", &self.mountpoint)
                .env("OWFS_REASON", why)
                .status();
            match st {
                Ok(s) => eprintln!("owfs: {}: on_lease_loss exited with {s}", self.ws),
                Err(e) => eprintln!("owfs: {}: on_lease_loss could not run: {e}", self.ws),
            }
        }
        let _ = std::fs::remove_file(super::control::socket_path(&self.mountpoint));
        eprintln!(
            "owfs: {}: stopping with status {} (lease lost); `umount {}` clears the dead mount",
            self.ws,
            crate::exit::LEASE_LOST,
            self.mountpoint.display()
        );
        self.life.settle();
    }

    /// Renews the lease every `renew_every`; retries sooner after a failure; stops the node
    /// when the deadline passes without a successful renewal or when the lease was taken.
    pub(super) fn renewer(self: &Arc<Self>) {
        let cfg = &self.opts.lease;
        let retry = (cfg.renew_every / 4).max(Duration::from_millis(50));
        let mut next = Instant::now() + cfg.renew_every;
        loop {
            {
                let mut stop = self.lease.stop.lock();
                while !*stop {
                    let now = Instant::now();
                    let wake = next.min(self.lease.deadline.get());
                    if now >= wake {
                        break;
                    }
                    self.lease.stop_cv.wait_for(&mut stop, wake - now);
                }
                if *stop {
                    return;
                }
            }
            if !self.lease.deadline.may_serve_now() {
                let last = self.lease.stats.lock().last_renew_error.clone();
                self.lease_lost(&format!(
                    "the lease could not be renewed before its deadline (last error: {})",
                    last.unwrap_or_else(|| "none".into())
                ));
                return;
            }
            let mut guard = self.lease.held.lock();
            let Some(lease) = guard.as_mut() else { return };
            // Bounded by the deadline: a renewal that has not answered by then is `Lost`.
            let r = self.repo.block_on(lease.renew());
            drop(guard);
            match r {
                Ok(()) => {
                    self.lease.stats.lock().renewals += 1;
                    next = Instant::now() + cfg.renew_every;
                }
                Err(lease::Error::Store(e)) => {
                    eprintln!("owfs: {}: lease renewal failed (will retry): {e}", self.ws);
                    let mut ls = self.lease.stats.lock();
                    ls.renew_failures += 1;
                    ls.last_renew_error = Some(e.to_string());
                    next = Instant::now() + retry;
                }
                Err(e) => {
                    self.lease_lost(&e.to_string());
                    return;
                }
            }
        }
    }

    pub(super) fn stop_renewer(&self) {
        *self.lease.stop.lock() = true;
        self.lease.stop_cv.notify_all();
    }

    /// Planned release after the final commit: the next node takes over at once.
    pub(super) fn release_lease(&self) {
        let Some(lease) = self.lease.held.lock().take() else {
            return;
        };
        let epoch = lease.epoch();
        match self.repo.block_on(lease.release()) {
            Ok(()) => eprintln!("owfs: {}: lease released (epoch {epoch})", self.ws),
            Err(e) => eprintln!(
                "owfs: {}: could not release the lease ({e}); another node can take over when it expires",
                self.ws
            ),
        }
    }

    pub(super) fn lease_status(&self) -> serde_json::Value {
        let ls = self.lease.stats.lock().clone();
        let g = self.lease.held.lock();
        let holder = g.as_ref().map(|l| l.record().holder.clone());
        let expires_ms = g.as_ref().map_or(0, |l| l.record().expires_ms);
        let deadline_in_ms = self
            .lease
            .deadline
            .get()
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        serde_json::json!({
            "epoch": self.epoch,
            "holder": holder.map(|h| serde_json::json!({"node": h.node, "host": h.host, "pid": h.pid})),
            "expires_ms": expires_ms,
            "expires_in_ms": expires_ms.saturating_sub(generation::now_ms()),
            "serving_for_ms": deadline_in_ms,
            "ttl_ms": self.opts.lease.ttl.as_millis() as u64,
            "renew_every_ms": self.opts.lease.renew_every.as_millis() as u64,
            "renewals": ls.renewals,
            "renew_failures": ls.renew_failures,
            "last_renew_error": ls.last_renew_error,
            "lost": ls.lost,
        })
    }
}
