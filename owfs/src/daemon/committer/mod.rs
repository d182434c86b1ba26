//! The committer: every commit interval, on `owfs sync` and on fsync of the root, it brings
//! the kernel's dirty pages to the daemon (`flush_kernel`), cuts (`cut.rs`: the barrier that
//! freezes what changed), reads each changed database's state from the frozen bytes
//! (`sqlite.rs`), runs the per-file checks on them (`checks.rs`), uploads what changed and
//! publishes the generation (`cut.rs`: `commit_cut`). Also here: the sync
//! requests its callers wait on, backpressure on writers, lost writes, and the merging of the
//! mount's index objects after commits.

pub(super) mod checks;
pub(super) mod cut;
pub(super) mod sqlite;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::generation::{self, GenRecord};
use chunkstore::{Error, Result};

use super::inodes::{self, Body};
use super::lifecycle::Phase;
use super::{flusher, Nice, Shared, CUT_ATTEMPTS};
use cut::CutOutcome;

/// Packs whose index object may wait (one a commit, as a rule) ...
const DEFERRED_PACKS: usize = 16;
/// ... and how long the oldest may wait.
const DEFERRED_MS: u64 = 30_000;

impl Shared {
    /// Waits while the upload backlog is over its bound.
    pub(in crate::daemon) fn throttle(&self) {
        let max = self.opts.max_backlog_bytes;
        if self.pending.load(Ordering::Relaxed) <= max {
            return;
        }
        self.stats.lock().throttled_writes += 1;
        self.request_commit();
        let mut g = self.backpressure_lock.lock();
        let t0 = Instant::now();
        while self.pending.load(Ordering::Relaxed) > max
            && !self.life.lease_lost()
            && !self.flushing.load(Ordering::Relaxed)
            && t0.elapsed() < Duration::from_secs(60)
        {
            self.backpressure
                .wait_for(&mut g, Duration::from_millis(100));
        }
    }

    pub(in crate::daemon) fn request_commit(&self) -> u64 {
        let mut s = self.sync.lock();
        s.requested += 1;
        self.sync_cv.notify_all();
        s.requested
    }

    /// Returns once a generation holding every write made before the call is durable.
    pub fn sync_now(&self) -> Result<GenRecord> {
        let my = self.request_commit();
        let mut s = self.sync.lock();
        loop {
            if self.life.phase() == Phase::Halting {
                // The last commit does not flush the kernel: it may lack writes made before.
                return Err(Error::Store {
                    store: self.repo.store.url().to_string(),
                    detail: format!("the mount stopped: {}", self.life.why().unwrap_or_default()),
                });
            }
            if s.done_ok >= my {
                return Ok(s.last.clone());
            }
            if s.done_err >= my {
                return Err(Error::Store {
                    store: self.repo.store.url().to_string(),
                    detail: s.err.clone().unwrap_or_else(|| "commit failed".into()),
                });
            }
            if s.finished {
                return Err(Error::Store {
                    store: self.repo.store.url().to_string(),
                    detail: "the mount stopped before the commit".into(),
                });
            }
            self.sync_cv.wait(&mut s);
        }
    }

    /// A WRITE the daemon could not store (its pages are gone from the kernel too). Said on
    /// stderr at the first one since the last report, counted in status, and reported by the
    /// next `sync` (`sync_reporting_lost`).
    pub(in crate::daemon) fn note_lost_write(
        &self,
        ino: u64,
        offset: u64,
        len: usize,
        err: fuser::Errno,
    ) {
        let err = std::io::Error::from_raw_os_error(err.code());
        // A stream of lost writes is usually one file's: find its path once.
        let known = {
            let st = self.stats.lock();
            (st.last_lost_path.0 == ino).then(|| st.last_lost_path.1.clone())
        };
        let path = known.unwrap_or_else(|| self.path_of(ino));
        let what = format!("{len} bytes at offset {offset} of {path} ({err})");
        let first = {
            let mut st = self.stats.lock();
            st.last_lost_path = (ino, path);
            st.lost_writes += 1;
            st.lost_write_bytes += len as u64;
            st.last_lost_write = Some(what.clone());
            st.lost_writes - st.lost_reported == 1
        };
        if first {
            eprintln!(
                "owfs: {}: LOST WRITE: {what}: the kernel has dropped these bytes and no \
                 generation will hold them; free space in the cache directory {} (the mount's \
                 `df` shows it); `owfs sync` reports this",
                self.ws,
                self.cache_dir.display()
            );
        }
    }

    /// `sync_now`, and the writes lost since the last report, if any, as the error of this
    /// sync. Like a file's writeback errors for fsync (errseq): every sync that began before
    /// a loss was reported fails, concurrent ones included, and none after.
    pub fn sync_reporting_lost(&self) -> Result<(GenRecord, Option<String>)> {
        let seen = self.stats.lock().lost_reported;
        let rec = self.sync_now()?;
        Ok((rec, self.lost_writes_since(seen)))
    }

    /// Writes lost since `seen` (a `lost_reported` taken before), as an error message; they
    /// count as reported from now on.
    pub(in crate::daemon) fn lost_writes_since(&self, seen: u64) -> Option<String> {
        let mut st = self.stats.lock();
        let now = st.lost_writes;
        st.lost_reported = st.lost_reported.max(now);
        (now > seen).then(|| {
            format!(
                "{} write(s) could not be stored in the cache directory {} and are in no \
                 generation (last: {}); the generation is durable without them",
                now - seen,
                self.cache_dir.display(),
                st.last_lost_write.as_deref().unwrap_or("?")
            )
        })
    }

    /// A path of `ino` in the mount, for messages (the first name found; `inode N` if none).
    pub(in crate::daemon) fn path_of(&self, ino: u64) -> String {
        let t = self.table.lock();
        let mut parts: Vec<String> = Vec::new();
        let mut cur = ino;
        while cur != inodes::ROOT && parts.len() < 256 {
            let found = t.nodes.iter().find_map(|(&dir, n)| {
                n.children()
                    .and_then(|c| c.iter().find(|(_, &c)| c == cur))
                    .map(|(name, _)| (dir, String::from_utf8_lossy(name).into_owned()))
            });
            let Some((dir, name)) = found else {
                return format!("inode {ino}");
            };
            parts.push(name);
            cur = dir;
        }
        parts.reverse();
        format!("{}/{}", self.mountpoint.display(), parts.join("/"))
    }

    /// The regular files the kernel holds (its lookups not all forgotten): the only ones
    /// that can have pages in the kernel's writeback.
    pub(in crate::daemon) fn kernel_files(&self) -> Vec<u64> {
        let t = self.table.lock();
        t.nodes
            .iter()
            .filter(|(_, n)| n.lookups > 0 && matches!(n.body, Body::File(_)))
            .map(|(&ino, _)| ino)
            .collect()
    }

    /// One commit attempt: flush the kernel's dirty pages, cut, upload, publish. `thorough`
    /// (a cut someone waits for): also wait until every write the flush started has reached
    /// the daemon (syncfs alone does not, see flusher.rs).
    pub(in crate::daemon) fn commit_once(
        &self,
        flush_kernel: bool,
        thorough: bool,
    ) -> crate::error::Result<Option<GenRecord>> {
        let mut attempt = 0;
        let cut = loop {
            if flush_kernel {
                self.flush_kernel(thorough && attempt == 0);
            } else if self.life.phase() != Phase::Halting {
                // Unmounted: the kernel wrote every page back before it let the mount go, so
                // what arrived of a rename's source is the file.
                self.table.lock().all_renames_flushed();
            }
            // Halting (the daemon cannot serve the kernel any more): pages the kernel still
            // holds never arrive, so the names stay held back.
            // A rename that replaced a file during the flush: flush its source too rather
            // than hold its name back, a few times, then cut anyway (inodes::Replaced).
            attempt += 1;
            if let Some(d) = self.faults.barrier_pause() {
                std::thread::sleep(d);
            }
            match self.cut(attempt >= self.faults.cut_attempts().unwrap_or(CUT_ATTEMPTS)) {
                CutOutcome::Nothing => return Ok(None),
                CutOutcome::FlushRenamesFirst => continue,
                CutOutcome::Cut(c) => break *c,
            }
        };
        if let Some(d) = self.faults.commit_pause() {
            std::thread::sleep(d);
        }
        if !cut.held_back.is_empty() {
            self.stats.lock().names_held_back += cut.held_back.len() as u64;
        }
        let barrier = cut.barrier;
        let parent = self.sync.lock().last.clone();
        let t0 = Instant::now();
        let r = self.commit_cut(cut, &parent);
        let mut st = self.stats.lock();
        if st.barriers_us.len() >= 4096 {
            st.barriers_us.pop_front();
        }
        st.barriers_us.push_back(barrier.as_micros() as u64);
        match &r {
            Ok(_) => {
                st.commits += 1;
                st.last_commit_ms = generation::now_ms();
                st.last_commit_duration_ms = t0.elapsed().as_millis() as u64;
            }
            Err(e) => {
                st.commit_failures += 1;
                st.last_error = Some(e.to_string());
            }
        }
        r.map(Some)
    }

    /// Brings the kernel's dirty pages to the daemon before a cut (`thorough`: every file's,
    /// and waits for them; else only starts them), and waits for the sources of renames that
    /// replaced a file, whose names are held back until then (inodes::Replaced). This thread
    /// serves no FUSE request, so the writes it causes can be served.
    pub(in crate::daemon) fn flush_kernel(&self, thorough: bool) {
        // Opening the mount point is a request too: release throttled writers first.
        self.flushing.store(true, Ordering::SeqCst);
        self.backpressure.notify_all();
        let (renames, sources) = self.table.lock().unflushed_renames();
        let mut wait = if thorough {
            self.kernel_files()
        } else {
            Vec::new()
        };
        wait.extend(sources);
        wait.sort_unstable();
        wait.dedup();
        // In the flusher child (see flusher.rs); here only if it could not be started or has
        // died.
        if self.flusher.get().is_none_or(|f| f.flush(&wait).is_err()) {
            flusher::flush_here(&self.mountpoint, &wait);
        }
        self.table.lock().renames_flushed_up_to(renames);
        self.flushing.store(false, Ordering::SeqCst);
    }

    pub(in crate::daemon) fn committer(self: &Arc<Self>) {
        let mut nice = Nice::new();
        // Commits start every commit_interval (start to start, not end to start): the
        // recovery point is the interval plus one commit's duration, not plus two. A commit
        // that took longer than half the interval is followed by a rest of half of it, so
        // that long commits (a bulk transaction) do not run back to back, each uploading
        // again the pages of a transaction still being written.
        let mut due = Instant::now() + self.opts.commit_interval;
        loop {
            let (target, stop, asked) = {
                let mut s = self.sync.lock();
                if !s.asked() && !self.life.last_commit() {
                    let wait = due.saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        self.sync_cv.wait_for(&mut s, wait);
                    }
                }
                (s.requested, self.life.last_commit(), s.asked())
            };
            due = Instant::now() + self.opts.commit_interval;
            nice.background(!(asked || stop));
            if self.life.lease_lost() {
                // Nothing is committed any more: answer every waiter and end, whatever the
                // phase was (a loss during the last commit's retries included).
                let mut s = self.sync.lock();
                s.done_err = target;
                s.err = Some("the mount stopped serving writes".into());
                self.sync_cv.notify_all();
                break;
            }
            let r = self.commit_once(!stop, asked);
            due = due.max(Instant::now() + self.opts.commit_interval / 2);
            let committed = matches!(r, Ok(Some(_)));
            let mut s = self.sync.lock();
            match r {
                Ok(rec) => {
                    if let Some(rec) = rec {
                        s.last = rec;
                    }
                    // The last commit holds every write: the mount is gone. A request made
                    // after `target` was read (the unmount's own, racing this loop) is
                    // answered by it too, or `umount` would report a failed final commit.
                    s.done_ok = if stop {
                        target.max(s.requested)
                    } else {
                        target
                    };
                    s.final_ok = stop;
                }
                Err(e) => {
                    eprintln!("owfs: {}: commit failed: {e}", self.ws);
                    s.done_err = target;
                    s.err = Some(e.to_string());
                    if matches!(
                        e,
                        crate::error::Error::Store(Error::Conflict(_))
                            | crate::error::Error::Lease(_)
                    ) {
                        // Fenced: a node took the workspace over. Stop, never retry.
                        drop(s);
                        self.lease_lost(&format!("a commit was refused: {e}"));
                        s = self.sync.lock();
                    } else if stop {
                        // Unmounting: keep trying while the lease lasts (the renewer stops
                        // the node at its deadline); the data exists only here.
                        drop(s);
                        std::thread::sleep(Duration::from_secs(1));
                        let mut s2 = self.sync.lock();
                        s2.requested += 1;
                        continue;
                    }
                }
            }
            self.sync_cv.notify_all();
            if stop {
                break;
            }
            if committed {
                self.write_index_if_due(false);
                self.compact_index();
            }
        }
        // Whatever stopped the mount (`owfs umount`, umount(8), a signal), the log says
        // what no sync reported.
        let reported = self.stats.lock().lost_reported;
        if let Some(why) = self.lost_writes_since(reported) {
            eprintln!("owfs: {}: at the end of the mount: {why}", self.ws);
        }
        let mut s = self.sync.lock();
        s.finished = true;
        self.sync_cv.notify_all();
    }

    /// After a commit (its waiters already answered): merges this mount's recent index
    /// objects once there are enough of them. A failure only costs a later reader more GETs.
    pub(in crate::daemon) fn compact_index(&self) {
        let last = self.stats.lock().last_compaction_ms;
        match self.repo.compact_own_index(last) {
            Ok(None) => {}
            Ok(Some(c)) => {
                let mut st = self.stats.lock();
                st.index_compactions += 1;
                st.index_objects_merged += c.merged as u64;
                st.last_compaction_ms = generation::now_ms();
            }
            Err(e) => {
                eprintln!("owfs: {}: merging this mount's index objects: {e}", self.ws);
                self.stats.lock().last_compaction_ms = generation::now_ms();
            }
        }
    }

    /// At a clean stop: merges every index object of this mount still young enough, whatever
    /// the usual thresholds (at least two of them).
    pub(in crate::daemon) fn compact_index_final(&self) {
        self.write_index_if_due(true);
        self.stats.lock().last_compaction_ms = 0;
        self.compact_index();
    }

    /// Writes the index object of the packs recent commits left without one, once there
    /// are DEFERRED_PACKS of them or the oldest is DEFERRED_MS old (`force`: now). Until
    /// then other readers find those packs by their trailers (docs/decisions/
    /// one-pack-a-commit.md). A failure is retried at the next commit.
    fn write_index_if_due(&self, force: bool) {
        let Some((packs, since_ms)) = self.repo.deferred() else {
            return;
        };
        let due = force
            || packs >= DEFERRED_PACKS
            || generation::now_ms().saturating_sub(since_ms) >= DEFERRED_MS;
        if !due {
            return;
        }
        match self.repo.write_deferred_index() {
            Ok(_) => self.stats.lock().deferred_index_writes += 1,
            Err(e) => eprintln!(
                "owfs: {}: writing the index of recent commits: {e}",
                self.ws
            ),
        }
    }
}
