//! The read-write workspace mount: a FUSE file system whose working copy lives on local disk,
//! and a committer that cuts a generation of it every commit interval and on `sync`.

mod committer;
mod content;
pub mod control;
pub mod faults;
mod flusher;
pub(crate) mod fuse;
mod holder;
mod inodes;
pub mod lifecycle;
mod lockorder;
mod ops;
mod ranges;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::generation::{self, GenRecord};
use chunkstore::{Error, Repo, Result};
use parking_lot::{Condvar, Mutex, RwLock};

use inodes::{Attr, Body, NKind, Node, Table, ROOT};
use lifecycle::{Lifecycle, Phase, Stop};

/// Barriers a commit tries before it cuts with names held back by renames whose sources
/// kept arriving during its flushes (inodes::Replaced).
const CUT_ATTEMPTS: u32 = 4;

/// Options of the read-write mount (`-o a=b,c`, and the lease flags).
#[derive(Debug, Clone)]
pub struct WsOptions {
    pub commit_interval: Duration,
    pub max_backlog_bytes: u64,
    pub prefetch: bool,
    pub threads: usize,
    /// `-o uring=`: serve FUSE requests through io_uring queues.
    pub uring: Uring,
    /// `-o read_ahead_kb=`: the kernel's readahead on the mount (0: its 128 KiB default).
    pub read_ahead_kb: u64,
    pub lease: lease::LeaseConfig,
    /// Shell command run when the lease is lost (before the daemon exits).
    pub on_lease_loss: Option<String>,
    /// `--wait[=DURATION]`: wait for a held workspace (None inside: forever).
    pub wait: Option<Option<Duration>>,
    /// `--takeover`: fence out the holder before its lease expires.
    pub takeover: bool,
    /// `-o nosuid,nodev,noexec`: the kernel's mount flags.
    pub flags: KernelFlags,
    /// `-o fork=SRC[@N]`: a workspace that does not exist yet starts as a fork of SRC@N.
    pub fork_from: Option<String>,
    /// `-o rollback=N`: once the lease is ours, publish generation N's content and serve it.
    pub rollback_to: Option<u64>,
}

/// Mount flags the kernel enforces (`-o nosuid`, `nodev`, `noexec`; off by default, as on a
/// local disk).
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelFlags {
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
}

impl KernelFlags {
    pub fn options(self) -> Vec<fuser::MountOption> {
        use fuser::MountOption as M;
        vec![
            if self.nosuid { M::NoSuid } else { M::Suid },
            if self.nodev { M::NoDev } else { M::Dev },
            if self.noexec { M::NoExec } else { M::Exec },
        ]
    }
}

impl Default for WsOptions {
    fn default() -> Self {
        WsOptions {
            commit_interval: Duration::from_millis(1000),
            max_backlog_bytes: 512 << 20,
            prefetch: true,
            threads: 4,
            uring: Uring::Auto,
            read_ahead_kb: 4096,
            lease: lease::LeaseConfig::default(),
            on_lease_loss: None,
            wait: None,
            takeover: false,
            flags: KernelFlags::default(),
            fork_from: None,
            rollback_to: None,
        }
    }
}

impl WsOptions {
    fn lease_mode(&self) -> lease::Mode {
        if self.takeover {
            lease::Mode::Takeover
        } else if let Some(w) = self.wait {
            lease::Mode::Wait(w)
        } else {
            lease::Mode::Normal
        }
    }
}

/// `-o uring=auto|off`: FUSE over io_uring (docs/decisions/fuse-over-io-uring.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uring {
    /// Use it where the kernel has it; as root, turn on the fuse module's `enable_uring`
    /// parameter first (it only lets servers that ask for io_uring use it).
    Auto,
    /// Serve everything through /dev/fuse.
    Off,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub commits: u64,
    /// Index objects written for packs of earlier commits (`write_index_if_due`).
    pub deferred_index_writes: u64,
    /// Names cuts held at their content before a rename replaced them (inodes::Replaced).
    pub names_held_back: u64,
    pub commit_failures: u64,
    pub last_error: Option<String>,
    /// Barrier durations of the last cuts, in microseconds (most recent last, at most 4096).
    pub barriers_us: std::collections::VecDeque<u64>,
    pub last_commit_ms: u64,
    pub last_commit_duration_ms: u64,
    pub throttled_writes: u64,
    /// Index objects of this mount merged into one (docs/decisions/index-compaction.md).
    pub index_compactions: u64,
    pub index_objects_merged: u64,
    pub last_compaction_ms: u64,
    /// WRITEs the daemon answered with an error (the cache directory full, an I/O error):
    /// the kernel drops those pages, so their bytes are in no generation.
    pub lost_writes: u64,
    pub lost_write_bytes: u64,
    pub last_lost_write: Option<String>,
    /// The inode of the last lost write and its path.
    pub last_lost_path: (u64, String),
    /// `lost_writes` as of the last `owfs sync` (or fsync of the root) that reported them.
    pub lost_reported: u64,
    /// Databases whose WAL lost frames an earlier generation recorded as committed
    /// (committer/sqlite.rs), and the last one found.
    pub sqlite_damage: u64,
    pub last_sqlite_damage: Option<String>,
}

struct SyncState {
    /// Sync requests numbered from 1; a cut serves every request made before it started.
    requested: u64,
    done_ok: u64,
    done_err: u64,
    err: Option<String>,
    last: GenRecord,
    /// The committer has ended (after its last commit, or after the lease was lost).
    finished: bool,
    /// The last commit, made once the mount was gone (or halted), succeeded: it holds every
    /// write the daemon took. Whether the mount ended well is this, not `done_ok` against
    /// `requested`: a request counted after that commit (the unmount's own, when the
    /// committer's timer won the race) asks for nothing it lacks.
    final_ok: bool,
}

impl SyncState {
    /// Someone waits for a commit not yet done (`owfs sync`, fsync of the root, backpressure).
    fn asked(&self) -> bool {
        self.requested > self.done_ok.max(self.done_err)
    }
}

pub struct Shared {
    pub repo: Arc<Repo>,
    pub ws: String,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub opts: WsOptions,
    table: lockorder::Ordered<Table>,
    /// Mutations hold it shared; the cut holds it exclusively (the barrier).
    gate: lockorder::Gate,
    /// Bytes written and not yet in a durable generation.
    pending: AtomicU64,
    backpressure: Condvar,
    backpressure_lock: Mutex<()>,
    sync: Mutex<SyncState>,
    sync_cv: Condvar,
    /// Serving, unmounting, halting, lease lost, stopped (lifecycle.rs).
    life: Lifecycle,
    /// The lease epoch every generation from this mount carries.
    epoch: u64,
    /// The workspace's lease, its serving deadline and its renewer's state (holder.rs).
    lease: holder::MountLease,
    /// The committer is flushing the kernel's dirty pages: throttled writers must go on, or
    /// the flush (which needs request threads) could never finish.
    flushing: AtomicBool,
    /// Does the committer's syncfs in a child process (see flusher.rs), once mounted; unset:
    /// in-thread.
    flusher: std::sync::OnceLock<flusher::Flusher>,
    /// Checks of each frozen file between the cut and the upload (committer/checks.rs).
    checks: RwLock<committer::checks::Checks>,
    /// Each database's page CRCs, kept by the committer between cuts (committer/sqlite.rs).
    databases: Mutex<committer::sqlite::KeptDbs>,
    /// The fault knobs of the tests (`OWFS_FAULTS`); all off in a release build.
    pub(crate) faults: faults::Faults,
    pub stats: Mutex<Stats>,
    started: Instant,
    fuse_requests: [AtomicU64; FUSE_OPS.len()],
    /// io_uring queue threads that have served a request (0: all through /dev/fuse).
    pub(crate) uring_threads: std::sync::atomic::AtomicU32,
    /// Tells the kernel to drop cached attributes the daemon changed on its own.
    notifier: std::sync::OnceLock<fuse::Notifier>,
}

/// The kinds of FUSE request, counted per kind (`owfs status --json` → `fuse_requests`):
/// every request the kernel sends costs a round trip, so these show what caching saved.
macro_rules! fuse_ops {
    ($($op:ident = $name:literal),* $(,)?) => {
        #[derive(Clone, Copy)]
        pub(crate) enum Op {
            $($op),*
        }
        const FUSE_OPS: &[&str] = &[$($name),*];
    };
}

fuse_ops! {
    Lookup = "lookup",
    Forget = "forget",
    Getattr = "getattr",
    Setattr = "setattr",
    Readlink = "readlink",
    Mknod = "mknod",
    Mkdir = "mkdir",
    Unlink = "unlink",
    Rmdir = "rmdir",
    Symlink = "symlink",
    Rename = "rename",
    Link = "link",
    Open = "open",
    Read = "read",
    Write = "write",
    Flush = "flush",
    Release = "release",
    Fsync = "fsync",
    Opendir = "opendir",
    Readdir = "readdir",
    Readdirplus = "readdirplus",
    Releasedir = "releasedir",
    Fsyncdir = "fsyncdir",
    Statfs = "statfs",
    Setxattr = "setxattr",
    Getxattr = "getxattr",
    Listxattr = "listxattr",
    Removexattr = "removexattr",
    Create = "create",
    Fallocate = "fallocate",
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Shared {
    fn count(&self, op: Op) {
        self.fuse_requests[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Fail-stop of a mount that can no longer answer every request: an io_uring queue ended
    /// after it registered, and the kernel keeps putting its CPU's requests on it, where they
    /// would wait forever (every caller on that CPU, the committer's flush, any unmount).
    /// File operations now fail with EIO; the committer makes a last commit of what the
    /// daemon received, without flushing the kernel (that flush could itself wait forever);
    /// `Daemon::serve` then releases the lease if that commit is durable and returns
    /// `Stop::Halted`: the process exits with status 14, the kernel aborts the connection,
    /// and every caller still waiting gets an error. Writes still in the kernel's page cache
    /// are lost, as in a crash.
    pub(super) fn halt(&self, why: &str) {
        if !self.life.advance(Phase::Halting, Some(why), true) {
            // Stopping already, for this or another reason.
            return;
        }
        eprintln!(
            "owfs: {}: STOPPING: {why}. File operations on {} now fail with EIO; committing \
             what the daemon received (writes still in the kernel's page cache are lost, as in \
             a crash)",
            self.ws,
            self.mountpoint.display()
        );
        self.request_commit();
    }

    /// Status for `owfs status` and the control socket.
    pub fn status(&self) -> serde_json::Value {
        let s = self.sync.lock();
        let st = self.stats.lock().clone();
        let mut b: Vec<u64> = st.barriers_us.iter().copied().collect();
        b.sort_unstable();
        let pct = |p: f64| -> u64 {
            if b.is_empty() {
                0
            } else {
                b[((b.len() as f64 - 1.0) * p).round() as usize]
            }
        };
        serde_json::json!({
            "workspace": self.ws,
            "mountpoint": self.mountpoint,
            "cache_dir": self.cache_dir,
            "store": self.repo.store.url(),
            "pid": std::process::id(),
            "generation": s.last.number,
            "generation_age_ms": generation::now_ms().saturating_sub(s.last.created_ms),
            "epoch": self.epoch,
            "lease": self.lease_status(),
            "pending_bytes": self.pending.load(Ordering::Relaxed),
            "failed": self.life.lease_lost(),
            "phase": format!("{:?}", self.life.phase()),
            "uptime_s": self.started.elapsed().as_secs(),
            "commits": st.commits,
            "deferred_index_writes": st.deferred_index_writes,
            "names_held_back": st.names_held_back,
            "commit_failures": st.commit_failures,
            "last_error": st.last_error,
            "last_commit_duration_ms": st.last_commit_duration_ms,
            "throttled_writes": st.throttled_writes,
            "lost_writes": {"count": st.lost_writes, "bytes": st.lost_write_bytes, "last": st.last_lost_write},
            "sqlite": {"databases": s.last.sqlite.len(), "wal_damage": st.sqlite_damage, "last_damage": st.last_sqlite_damage},
            "index_compactions": {"count": st.index_compactions, "objects_merged": st.index_objects_merged},
            "barrier_us": {"count": b.len(), "p50": pct(0.5), "p99": pct(0.99), "max": b.last().copied().unwrap_or(0)},
            "requests": self.repo.store.counters(),
            "fuse_transport": match self.uring_threads.load(Ordering::Relaxed) {
                0 => "/dev/fuse".to_string(),
                n => format!("io_uring ({n} queue threads)"),
            },
            "fuse_requests": FUSE_OPS
                .iter()
                .zip(&self.fuse_requests)
                .filter(|(_, n)| n.load(Ordering::Relaxed) > 0)
                .map(|(o, n)| (o.to_string(), serde_json::json!(n.load(Ordering::Relaxed))))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
}

fn parse_number(v: &str, key: &str) -> Result<u64> {
    v.parse::<u64>().map_err(|_| Error::BadOption {
        option: format!("{key}={v}"),
        reason: "expected a whole number".into(),
    })
}

impl WsOptions {
    pub fn set(&mut self, key: &str, v: &str) -> Result<()> {
        match key {
            "commit_interval_ms" => {
                self.commit_interval = Duration::from_millis(parse_number(v, key)?.max(10))
            }
            "max_backlog_mb" => self.max_backlog_bytes = parse_number(v, key)?.max(1) << 20,
            "prefetch" => self.prefetch = v != "0" && v != "false" && v != "no",
            "threads" => self.threads = parse_number(v, key)?.clamp(1, 64) as usize,
            "uring" => {
                self.uring = match v {
                    "auto" | "on" | "1" | "yes" | "true" => Uring::Auto,
                    "off" | "0" | "no" | "false" => Uring::Off,
                    _ => {
                        return Err(Error::BadOption {
                            option: format!("{key}={v}"),
                            reason: "expected auto or off".into(),
                        })
                    }
                }
            }
            "read_ahead_kb" => self.read_ahead_kb = parse_number(v, key)?.min(1 << 20),
            "lease_ttl_ms" => self.lease.ttl = Duration::from_millis(parse_number(v, key)?),
            "lease_renew_ms" => {
                self.lease.renew_every = Duration::from_millis(parse_number(v, key)?)
            }
            "lease_margin_ms" => self.lease.margin = Duration::from_millis(parse_number(v, key)?),
            "lease_skew_ms" => self.lease.max_skew = Duration::from_millis(parse_number(v, key)?),
            "on_lease_loss" => self.on_lease_loss = Some(v.to_string()).filter(|c| !c.is_empty()),
            "fork" => {
                generation::parse_selector(v)?;
                self.fork_from = Some(v.to_string());
            }
            "rollback" => self.rollback_to = Some(parse_number(v, key)?),
            _ => {
                return Err(Error::BadOption {
                    option: key.to_string(),
                    reason: "unknown mount option (known: ro, rw, nosuid, nodev, noexec, commit_interval_ms=, max_backlog_mb=, prefetch=, threads=, uring=, read_ahead_kb=, lease_ttl_ms=, lease_renew_ms=, lease_margin_ms=, lease_skew_ms=, on_lease_loss=, fork=, rollback=)".into(),
                })
            }
        }
        Ok(())
    }
}

/// `-o fork=FROM`: forks FROM (`SRC` or `SRC@N`) as `ws` unless `ws` exists. An existing `ws`
/// is mounted as it is only if it was forked from that generation (the same mount command
/// run again, after a crash or on another node, continues the fork); otherwise the mount is
/// refused, so that no workspace is served as something it is not.
fn fork_unless_forked(repo: &Arc<Repo>, ws: &str, from: &str) -> Result<()> {
    generation::check_workspace_name(ws)?;
    // A time names the generation it finds now (a relative one moves on: run again later,
    // the same command may name a newer generation, and then refuses the existing fork).
    let (src_ws, src_n) = match generation::parse_selector(from)? {
        (src, generation::Selector::Latest) => (src, None),
        (src, generation::Selector::Number(n)) => (src, Some(n)),
        (src, generation::Selector::AtOrBefore(ms)) => {
            let n = repo.block_on(generation::number_at_or_before(&repo.store, &src, ms))?;
            (src, Some(n))
        }
    };
    let from = &match src_n {
        Some(n) => format!("{src_ws}@{n}"),
        None => src_ws.clone(),
    };
    let rec = match first_generation(repo, ws, from)? {
        Some(rec) => rec,
        None => {
            let src = repo.block_on(generation::resolve(&repo.store, from))?;
            match chunkstore::publish::fork(repo, &src, ws) {
                Ok(rec) => {
                    eprintln!("owfs: {ws}: forked from {} as {}", src.spec(), rec.spec());
                    return Ok(());
                }
                // Another node forked it at the same moment: check theirs. Otherwise the
                // conflict is the source's (gc condemned what it needs): say that.
                Err(e @ Error::Conflict(_)) => first_generation(repo, ws, from)?.ok_or(e)?,
                Err(e) => return Err(e),
            }
        }
    };
    let origin = rec
        .origin
        .as_deref()
        .and_then(|o| generation::parse_spec(o).ok());
    let same = rec.kind == "fork"
        && origin.is_some_and(|(o_ws, o_n)| o_ws == src_ws && src_n.is_none_or(|n| o_n == Some(n)));
    if !same {
        return Err(Error::Conflict(format!(
            "workspace {ws} already exists and did not start as a fork of {from} (its generation 1 is a {}{}); mount it without fork=, or fork into a new name",
            rec.kind,
            rec.origin.as_deref().map(|o| format!(" of {o}")).unwrap_or_default()
        )));
    }
    eprintln!(
        "owfs: {ws}: exists, forked from {}: mounting it as it is",
        rec.origin.as_deref().unwrap_or("?")
    );
    Ok(())
}

/// Generation 1 of `ws` (None: no such workspace), for `fork_unless_forked`.
fn first_generation(repo: &Arc<Repo>, ws: &str, from: &str) -> Result<Option<GenRecord>> {
    match repo.block_on(generation::get_generation(&repo.store, ws, 1)) {
        Ok(rec) => Ok(Some(rec)),
        Err(Error::UnknownWorkspace(_)) => Ok(None),
        // Deleted by gc retention: nothing says where the workspace came from.
        Err(Error::UnknownGeneration { .. }) => Err(Error::Conflict(format!(
            "workspace {ws} already exists and its generation 1, which would show it is a fork of {from}, was deleted by gc; mount it without fork="
        ))),
        Err(e) => Err(e),
    }
}

/// Where a workspace's working copy lives unless --cache-dir says otherwise.
pub fn default_cache_dir(ws: &str) -> PathBuf {
    let base = if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/lib/owfs/cache")
    } else if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(x).join("owfs")
    } else {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache/owfs")
    };
    base.join(ws)
}

/// The latest generation of `ws`, creating the workspace (an empty generation 1) if needed.
pub fn latest_or_create(repo: &Arc<Repo>, ws: &str, epoch: u64) -> Result<GenRecord> {
    generation::check_workspace_name(ws)?;
    if let Some(rec) = repo.block_on(generation::latest(&repo.store, ws))? {
        return Ok(rec);
    }
    let tree = chunkstore::tree::Tree::default().encode();
    let hash = chunkstore::Hash::of(&tree);
    let mut w = chunkstore::writer::BlobWriter::new(repo.clone())?;
    w.add(hash, chunkstore::pack::BlobKind::Tree, tree)?;
    let reused = std::mem::take(&mut w.reused);
    let write = w.finish()?;
    let mut rec = chunkstore::publish::record(chunkstore::publish::NewGen {
        ws,
        parent: None,
        kind: "create",
        origin: None,
        root: hash,
        tree: Default::default(),
        write,
        epoch,
    });
    rec.root_attr = Some(chunkstore::generation::RootAttr {
        mode: 0o755,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        mtime_ns: now_ns(),
    });
    match chunkstore::publish::publish_checked(repo, &mut rec, &reused) {
        Ok(()) => Ok(rec),
        // Someone created it at the same time: use theirs.
        Err(Error::Conflict(_)) => repo
            .block_on(generation::latest(&repo.store, ws))?
            .ok_or_else(|| Error::UnknownWorkspace(ws.to_string())),
        Err(e) => Err(e),
    }
}

/// Where a pre-pull leaves verified blobs for the next mount of this cache directory.
fn blobs_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("blobs")
}

/// `owfs mount --prefetch-only WS`: downloads WS's latest generation into the cache
/// directory's blob cache, without the lease (the serving node goes on). `progress` counts
/// what is fetched, for a caller that shows it.
pub fn prepull(
    repo: &Arc<Repo>,
    ws: &str,
    cache_dir: Option<PathBuf>,
    progress: &Arc<chunkstore::progress::Progress>,
) -> Result<chunkstore::prepull::PrepullReport> {
    let rec = repo
        .block_on(generation::latest(&repo.store, ws))?
        .ok_or_else(|| Error::UnknownWorkspace(ws.to_string()))?;
    let cache_dir = cache_dir.unwrap_or_else(|| default_cache_dir(ws));
    let _lock = lock_cache(&cache_dir)?;
    let cache = Arc::new(chunkstore::blobcache::BlobCache::open(&blobs_dir(
        &cache_dir,
    ))?);
    chunkstore::prepull::prepull(repo, &rec, &cache, progress)
}

/// One process per cache directory (a mount or a pre-pull). The lock file names its holder
/// and whether it is `finishing`: a daemon that has answered its unmount and is still cleaning
/// up (a GiB of pre-pulled blobs takes a second to delete). A mount right after an unmount
/// waits for that instead of failing; any other holder is a conflict at once.
fn lock_cache(cache_dir: &Path) -> Result<std::fs::File> {
    use rustix::fs::{flock, FlockOperation};
    // The working copy is the workspace in the clear: the owner's alone.
    chunkstore::private::private_dir(cache_dir)?;
    let lock_path = cache_dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    let t0 = Instant::now();
    let mut told = false;
    while flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
        let holder = holder.trim();
        if !holder.ends_with(" finishing") || t0.elapsed() > CACHE_FINISH_WAIT {
            let by = if holder.is_empty() {
                String::new()
            } else {
                format!(" ({holder})")
            };
            return Err(Error::Conflict(format!(
                "cache directory {} is in use by another owfs mount{by}; give this mount its own --cache-dir",
                cache_dir.display()
            )));
        }
        if !told {
            eprintln!(
                "owfs: waiting for the previous mount of {} to finish ({holder})",
                cache_dir.display()
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    note_cache_holder(&lock, "serving");
    Ok(lock)
}

/// How long a mount waits for the previous holder of its cache directory to finish.
const CACHE_FINISH_WAIT: Duration = Duration::from_secs(120);

/// Writes `pid N STATE` into the (held) lock file, for the next process that finds it locked.
fn note_cache_holder(lock: &std::fs::File, state: &str) {
    use std::os::unix::fs::FileExt;
    let note = format!("pid {} {state}\n", std::process::id());
    // Overwrite, then cut: a reader never sees an empty or a half-old `finishing`.
    let _ = lock.write_all_at(note.as_bytes(), 0);
    let _ = lock.set_len(note.len() as u64);
}

/// Takes the cache directory for this mount: one daemon per cache directory.
fn prepare_cache(cache_dir: &Path) -> Result<(std::fs::File, PathBuf)> {
    let lock = lock_cache(cache_dir)?;
    let data = cache_dir.join("data");
    // The working copy restarts from the generation: a previous run's files are stale.
    if data.exists() {
        std::fs::remove_dir_all(&data).map_err(|e| Error::io(&data, e))?;
    }
    std::fs::create_dir_all(&data).map_err(|e| Error::io(&data, e))?;
    Ok((lock, data))
}

fn root_node(rec: &GenRecord) -> Result<Node> {
    let ra = rec.root_attr.unwrap_or(chunkstore::generation::RootAttr {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: rec.created_ms as i64 * 1_000_000,
    });
    let e = chunkstore::tree::Entry {
        name: Vec::new(),
        kind: chunkstore::tree::Kind::Dir,
        mode: ra.mode,
        uid: ra.uid,
        gid: ra.gid,
        mtime_ns: ra.mtime_ns,
        size: 0,
        link: 0,
        ino: ROOT,
        ctime_ns: ra.mtime_ns,
        rdev: 0,
        xattrs: Vec::new(),
        target: Vec::new(),
        subtree: Some(rec.root_hash()?),
        content: Default::default(),
    };
    let tree = e.subtree;
    Ok(Node {
        kind: NKind::Dir,
        attr: Attr {
            perm: ra.mode & 0o7777,
            uid: ra.uid,
            gid: ra.gid,
            size: 4096,
            atime_ns: ra.mtime_ns,
            mtime_ns: ra.mtime_ns,
            ctime_ns: ra.mtime_ns,
            rdev: 0,
            nlink: 2,
        },
        xattrs: Default::default(),
        body: Body::Dir {
            children: None,
            tree,
            parent: ROOT,
        },
        parents: Vec::new(),
        lookups: 1,
        committed: Some(Arc::new(e)),
        touched: 0,
        local_only: false,
        replaced: None,
    })
}

/// Blocks SIGTERM, SIGINT and SIGHUP in every thread; one thread waits for them and unmounts.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask on this thread (the
    // threads spawned after inherit it).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Raises the soft limit on open files to the hard limit: the daemon keeps up to 1,024 cache
/// files open (at most half the limit), plus the store's connections.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let r = getrlimit(Resource::Nofile);
    if r.current != r.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: r.maximum,
                ..r
            },
        );
    }
}

/// The committer's priority. A periodic commit nobody waits for runs at nice
/// `BACKGROUND_NICE` (with the pack workers it starts, which inherit it): chunking, hashing and
/// compressing then yield the CPUs to the workload on a small machine, yet still get about a
/// tenth of a contended CPU, so commits slow down under load but never stop. A commit someone
/// waits for (`owfs sync`, fsync of the root, a throttled writer, the unmount) runs at the
/// normal priority. Used only where the thread may return to nice 0 (root, or RLIMIT_NICE
/// allowing it): elsewhere a thread that raised its nice value could never lower it again.
struct Nice {
    usable: bool,
    background: bool,
}

const BACKGROUND_NICE: i32 = 10;

impl Nice {
    fn new() -> Nice {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain system call filling a local struct.
        let nice_0_allowed =
            unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) } == 0 && lim.rlim_cur >= 20;
        Nice {
            usable: rustix::process::geteuid().is_root() || nice_0_allowed,
            background: false,
        }
    }

    fn background(&mut self, on: bool) {
        if self.usable && on != self.background {
            let ok = set_nice(if on { BACKGROUND_NICE } else { 0 });
            if ok {
                self.background = on;
            } else if !on {
                // Root without CAP_SYS_NICE (a restricted container): stuck in the background.
                eprintln!("owfs: cannot return the committer to nice 0; it stays at nice {BACKGROUND_NICE}");
                self.usable = false;
            }
        }
    }
}

/// Sets the calling thread's nice value (Linux: per thread).
fn set_nice(n: i32) -> bool {
    // SAFETY: plain system call on the calling thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) == 0 }
}

/// A named daemon thread.
fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io("thread", e))
}

/// A read-write daemon of one workspace. `start` takes the lease, fences a previous holder,
/// applies a fork or rollback and loads the inode table; nothing is mounted yet. `serve`
/// mounts it and serves until it stops, and says why. Tests drive a started daemon
/// in-process instead (tests.rs).
pub struct Daemon {
    s: Arc<Shared>,
    /// Held while the daemon owns its cache directory (see `lock_cache`).
    cache_lock: std::fs::File,
    /// The generation the daemon started from.
    started_from: GenRecord,
}

/// Mounts workspace `ws` read-write on `mountpoint` and serves it until it stops.
pub fn run(
    repo: Arc<Repo>,
    ws: &str,
    mountpoint: &Path,
    cache_dir: Option<PathBuf>,
    opts: WsOptions,
) -> crate::error::Result<Stop> {
    Daemon::start(repo, ws, mountpoint, cache_dir, opts)?.serve()
}

impl Daemon {
    pub fn start(
        repo: Arc<Repo>,
        ws: &str,
        mountpoint: &Path,
        cache_dir: Option<PathBuf>,
        opts: WsOptions,
    ) -> crate::error::Result<Daemon> {
        generation::check_workspace_name(ws)?;
        opts.lease.validate()?;
        let cache_dir = cache_dir.unwrap_or_else(|| default_cache_dir(ws));
        let (cache_lock, data_dir) = prepare_cache(&cache_dir)?;
        if let Some(from) = &opts.fork_from {
            fork_unless_forked(&repo, ws, from)?;
        }
        if let Some(n) = opts.rollback_to {
            // Before the lease: a wrong N fails here, not with the lease held.
            repo.block_on(generation::get_generation(&repo.store, ws, n))?;
        }
        // One writer per workspace: the lease first, then (after a takeover) the fence, and
        // only then anything else that publishes.
        let lease = holder::acquire(
            &repo,
            ws,
            holder::holder(&cache_dir)?,
            &opts.lease,
            opts.lease_mode(),
        )?;
        let epoch = lease.epoch();
        if let Some(prev) = lease.took_over() {
            eprintln!(
                "owfs: {ws}: took over from node {} (host {}, pid {}, epoch {}); fencing it out",
                prev.holder.node, prev.holder.host, prev.holder.pid, prev.epoch
            );
        }
        // The workspace may not exist yet if the old holder died before creating it.
        let latest = latest_or_create(&repo, ws, epoch)?;
        let rec = lease.fence(&repo)?.unwrap_or(latest);
        lease.check_epoch(&rec)?;
        let rec = match opts.rollback_to {
            Some(n) => match chunkstore::publish::rollback(&repo, ws, n, Some(epoch)) {
                Ok(back) => {
                    eprintln!(
                        "owfs: {ws}: rolled back to generation {n} as {}",
                        back.spec()
                    );
                    back
                }
                Err(e) => {
                    // Nothing was served: free the workspace for the next attempt at once.
                    let _ = repo.block_on(lease.release());
                    return Err(e.into());
                }
            },
            None => rec,
        };
        let mountpoint = std::fs::canonicalize(mountpoint).map_err(|e| Error::io(mountpoint, e))?;
        // Packs a crashed mount left without an index object: found by their trailers at
        // the first read, then named in this mount's next index object.
        repo.index_what_it_adopts();
        // The head's own pack may be inside its record (docs/decisions/
        // one-request-a-commit.md); the index tells whether an index object names it yet.
        repo.ensure_index()?;
        repo.root_of(&rec)?;
        // A pre-pull left blobs here: read them before asking the store.
        if blobs_dir(&cache_dir).is_dir() {
            repo.set_blob_cache(Some(Arc::new(chunkstore::blobcache::BlobCache::open(
                &blobs_dir(&cache_dir),
            )?)));
        }
        let totals = (rec.files as i64, rec.dirs as i64, rec.bytes as i64);
        let table = Table::new(data_dir, root_node(&rec)?, totals);
        let shared = Arc::new(Shared {
            repo,
            ws: ws.to_string(),
            mountpoint,
            cache_dir,
            opts,
            table: lockorder::Ordered::new(lockorder::Rank::Table, table),
            gate: lockorder::Gate::new(),
            pending: AtomicU64::new(0),
            backpressure: Condvar::new(),
            backpressure_lock: Mutex::new(()),
            sync: Mutex::new(SyncState {
                requested: 0,
                done_ok: 0,
                final_ok: false,
                done_err: 0,
                err: None,
                last: rec.clone(),
                finished: false,
            }),
            sync_cv: Condvar::new(),
            life: Lifecycle::new(),
            epoch,
            lease: holder::MountLease::new(lease),
            flushing: AtomicBool::new(false),
            flusher: std::sync::OnceLock::new(),
            checks: RwLock::new(Default::default()),
            databases: Mutex::new(Default::default()),
            faults: faults::Faults::from_env(),
            stats: Mutex::new(Stats::default()),
            started: Instant::now(),
            fuse_requests: Default::default(),
            uring_threads: Default::default(),
            notifier: std::sync::OnceLock::new(),
        });
        // Fail at mount time, not on first access, if the root is unreadable.
        shared.ensure_loaded(ROOT).map_err(|e| Error::Store {
            store: shared.repo.store.url().to_string(),
            detail: format!("cannot read the root of {}: {e:?}", rec.spec()),
        })?;
        Ok(Daemon {
            s: shared,
            cache_lock,
            started_from: rec,
        })
    }

    /// Mounts the workspace and serves it: returns when it was unmounted (after the last
    /// commit), when an io_uring queue ended, or when the lease was lost.
    pub fn serve(self) -> crate::error::Result<Stop> {
        let Daemon {
            s: shared,
            cache_lock,
            started_from: rec,
        } = self;
        let (ws, mountpoint, cache_dir) = (
            shared.ws.clone(),
            shared.mountpoint.clone(),
            shared.cache_dir.clone(),
        );
        // Forked before /dev/fuse is opened, so that the child never holds it.
        match flusher::Flusher::spawn(&mountpoint) {
            Ok(f) => {
                let _ = shared.flusher.set(f);
            }
            Err(e) => {
                eprintln!("owfs: {ws}: no flusher process ({e}); the committer flushes itself")
            }
        }
        let sigset = block_signals();
        raise_nofile_limit();
        // A client of the control socket that goes away mid-answer must not end the daemon
        // (the CLI restores SIGPIPE's default to end quietly on a closed pipe).
        // SAFETY: setting a signal's disposition to ignored.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }

        let mut mount_options = vec![
            fuser::MountOption::FSName(format!("owfs:{ws}")),
            fuser::MountOption::Subtype("owfs".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::RW,
        ];
        mount_options.extend(shared.opts.flags.options());
        let fs = ops::OwfsFs::new(shared.clone());
        // Mounted and INIT answered (the io_uring queues started if INIT granted them).
        let conn = fuse::mount_rw(&fs, &mountpoint, &mount_options)
            .map_err(|e| Error::io(&mountpoint, e))?;
        let _ = shared.notifier.set(conn.notifier());
        if shared.opts.read_ahead_kb > 0 {
            if let Err(e) = crate::fuse_util::set_read_ahead(&mountpoint, shared.opts.read_ahead_kb)
            {
                eprintln!(
                    "owfs: warning: could not set readahead to {} KiB (sequential reads of \
                     files not yet local stay slower): {e}",
                    shared.opts.read_ahead_kb
                );
            }
        }
        eprintln!(
            "owfs: serving {} (generation {}) read-write on {}, cache {}",
            ws,
            rec.number,
            mountpoint.display(),
            cache_dir.display()
        );

        let s = shared.clone();
        let committer = spawn("owfs-commit", move || s.committer())?;
        let s = shared.clone();
        let renewer = spawn("owfs-lease", move || s.renewer())?;
        let control = control::serve(shared.clone())?;
        let mp = mountpoint.clone();
        spawn("owfs-signals", move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on the set blocked above.
            if unsafe { libc::sigwait(&sigset, &mut sig) } == 0 {
                eprintln!("owfs: signal {sig}: committing and unmounting");
                if rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::empty()).is_err() {
                    let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
                }
            }
        })?;
        let s = shared.clone();
        let prefetcher = if shared.opts.prefetch {
            Some(spawn("owfs-prefetch", move || s.prefetch())?)
        } else {
            None
        };
        let threads = shared.opts.threads;
        let s = shared.clone();
        spawn("owfs-fuse", move || {
            if let Err(e) = fuse::serve_rw(conn, &fs, threads) {
                eprintln!("owfs: the FUSE session ended with an error: {e}");
            }
            // Unmounted: the kernel has sent every dirty page. Commit what is left, then stop.
            if s.life.advance(Phase::Unmounting, None, true) {
                s.request_commit();
            }
        })?;

        match shared.life.wait_past_serving() {
            Phase::Halting => return Ok(shared.halted()),
            Phase::LeaseLost => return Ok(shared.stopped_by_lease_loss()),
            _ => {}
        }
        let _ = committer.join();
        // A queue may end or the lease be lost during the last commit.
        match shared.life.phase() {
            Phase::Halting => return Ok(shared.halted()),
            Phase::LeaseLost => return Ok(shared.stopped_by_lease_loss()),
            _ => {}
        }
        let (ok, last) = {
            let s = shared.sync.lock();
            (s.final_ok, s.last.clone())
        };
        if ok {
            // Merge what is left of this mount's index objects (up to 15 young ones), so that
            // short-lived mounts, the common case for sandboxes, do not leave one object per
            // commit to every later reader. One PUT and parallel DELETEs, under the lease.
            shared.compact_index_final();
        }
        shared.stop_renewer();
        let _ = renewer.join();
        if shared.life.lease_lost() {
            return Ok(shared.stopped_by_lease_loss());
        }
        if ok {
            // Planned handoff: everything is in the store; the next node may start at once.
            shared.release_lease();
        }
        // Answer `owfs umount`/`handoff` first: the next node may start now, and a mount of
        // this cache directory waits for the cleanup below.
        note_cache_holder(&cache_lock, "finishing");
        control.finish(ok);
        // The prefetcher stops at its next chunk (the store's runtime must outlive it).
        if let Some(p) = prefetcher {
            let _ = p.join();
        }
        shared.life.advance(Phase::Stopped, None, true);
        if !ok {
            eprintln!(
                "owfs: {ws}: the final commit failed; the last durable generation is {}",
                last.number
            );
            return Ok(Stop::FinalCommitFailed { last: last.number });
        }
        // Everything is in the store: the working copy (the workspace in the clear) and what
        // a pre-pull left go now, not at the next mount (decisions/local-files-private.md).
        // After the answer: deleting a GiB takes about a second.
        let _ = std::fs::remove_dir_all(blobs_dir(&cache_dir));
        let _ = std::fs::remove_dir_all(cache_dir.join("data"));
        eprintln!(
            "owfs: {ws}: unmounted; generation {} is durable",
            last.number
        );
        Ok(Stop::Unmounted { last: last.number })
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.s
    }

    /// In-process: one commit as the committer makes it, without a kernel to flush.
    #[cfg(test)]
    pub(crate) fn commit_now(&self) -> crate::error::Result<Option<GenRecord>> {
        let rec = self.s.commit_once(false, false)?;
        if let Some(rec) = &rec {
            self.s.sync.lock().last = rec.clone();
        }
        Ok(rec)
    }

    /// In-process: the last commit, then the lease released, as a clean unmount does.
    #[cfg(test)]
    pub(crate) fn finish(self) -> crate::error::Result<Option<GenRecord>> {
        self.s.life.advance(Phase::Unmounting, None, true);
        let rec = self.commit_now()?;
        self.s.release_lease();
        self.s.life.advance(Phase::Stopped, None, true);
        Ok(rec)
    }
}

impl Shared {
    /// After `halt`: waits up to 20 s for the last commit, releases the lease if it is
    /// durable, and says how the daemon stopped.
    fn halted(&self) -> Stop {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (ok, last) = {
            let mut s = self.sync.lock();
            while !s.finished && Instant::now() < deadline {
                self.sync_cv.wait_until(&mut s, deadline);
            }
            (s.finished && s.final_ok, s.last.number)
        };
        if ok {
            self.stop_renewer();
            self.release_lease();
        }
        let _ = std::fs::remove_file(control::socket_path(&self.mountpoint));
        eprintln!(
            "owfs: {}: stopped{}; generation {last} is the last durable one. Exiting with \
             status {}; `umount {}` clears the dead mount",
            self.ws,
            if ok {
                ""
            } else {
                " (the last commit did not finish in 20 s)"
            },
            crate::exit::STOPPED,
            self.mountpoint.display()
        );
        Stop::Halted {
            why: self.life.why().unwrap_or_default(),
            last,
            committed: ok,
        }
    }

    /// After `lease_lost` (its hook has run): how the daemon stopped.
    fn stopped_by_lease_loss(&self) -> Stop {
        self.life.wait_settled();
        Stop::LeaseLost {
            why: self.life.why().unwrap_or_default(),
            last: self.sync.lock().last.number,
        }
    }
}
