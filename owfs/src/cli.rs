//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

const ABOUT: &str = "owfs: a durable local workspace for ephemeral compute.

A workspace is a directory tree (typically app.db + files/) whose every committed state is an
atomic, versioned generation in an object store: content-defined chunks, deduplicated across
all workspaces of the store, verified by BLAKE3 on every read.

Names: WS is a workspace (letters, digits, . _ -); WS@N is its generation N; WS alone is its
latest generation. Wherever a generation is read, a time names the newest generation at or
before it: WS@2026-12-07T10:02:00Z (UTC) or WS@-5m (that long ago; s, m, h, d).

Stores: --store file:///abs/path or s3://bucket/prefix (or OWFS_STORE). Without either, the
embedded default store on local disk: /var/lib/owfs/store for root, else
$XDG_DATA_HOME/owfs/store. S3 uses the standard AWS_* variables; AWS_ENDPOINT_URL selects an
S3-compatible service (plain http:// only when that URL says so).

Exit status: 0 ok, 2 usage, 3 unknown workspace/generation/path, 4 store unreachable, 5 access
denied, 6 object missing from the store, 7 corrupt data, 8 unsupported format, 9 unsafe
manifest, 10 conflict (target not empty, name taken, lost a race), 11 workspace held by another
node, 12 drill found problems, 13 the mount lost its lease and stopped, 14 the mount could no
longer answer every request and stopped (docs/EXIT_CODES.md).";

#[derive(Parser, Debug)]
#[command(name = "owfs", version, about = ABOUT, long_about = ABOUT)]
pub struct Cli {
    /// Store URL: file:///abs/path or s3://bucket/prefix.
    #[arg(long, global = true, env = "OWFS_STORE", value_name = "URL")]
    pub store: Option<String>,

    /// Machine-readable output (one JSON document on stdout).
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Commit a plain directory as WS's next generation (creating WS).
    ///
    /// Only what changed since WS's latest generation is read (size, mtime, inode and ctime
    /// decide), and only chunks the store lacks are uploaded.
    Snapshot {
        /// Directory to commit.
        dir: PathBuf,
        /// Workspace.
        ws: String,
    },
    /// List generations, newest first: number, time, files, bytes, bytes new.
    Log {
        /// Workspace.
        ws: String,
        /// Show at most this many.
        #[arg(long, short = 'n')]
        limit: Option<usize>,
        /// Also each generation's SQLite databases: page count, journal mode, the WAL's last
        /// commit frame, checksum (`--json` always has them).
        #[arg(long, short = 'l')]
        long: bool,
    },
    /// List a directory of a generation.
    Ls {
        /// WS, WS@N, WS@TIME (UTC) or WS@-AGE (e.g. WS@-5m).
        spec: String,
        /// Directory inside the workspace.
        #[arg(default_value = "/")]
        path: String,
        /// Long format: type and mode, owner, size, mtime.
        #[arg(short, long)]
        long: bool,
    },
    /// Write a file of a generation to stdout.
    Cat {
        /// WS, WS@N, WS@TIME (UTC) or WS@-AGE (e.g. WS@-5m).
        spec: String,
        /// File inside the workspace.
        path: String,
    },
    /// Restore a generation into DIR, bit-exact.
    Restore {
        /// WS, WS@N, WS@TIME (UTC) or WS@-AGE (e.g. WS@-5m).
        spec: String,
        /// Target directory (created if missing; must be empty unless --force).
        dir: PathBuf,
        /// Restore into a non-empty DIR, replacing entries of the same names.
        #[arg(long)]
        force: bool,
    },
    /// Start workspace NEW at WS[@N]: O(1), no data copied.
    Fork {
        /// WS, WS@N, WS@TIME (UTC) or WS@-AGE (e.g. WS@-5m).
        spec: String,
        /// Name of the new workspace.
        new: String,
    },
    /// Publish a new generation of WS whose content equals generation N (history is kept).
    ///
    /// Refused (status 11) while WS is mounted: the mount's next commit would fail and stop
    /// it. Unmount first, or roll back as it mounts: `owfs mount WS DIR -o rollback=N`.
    Rollback {
        /// Workspace.
        ws: String,
        /// Generation to return to.
        n: u64,
    },
    /// Restore drill: verify every tree and chunk, restore into a scratch directory, run
    /// `PRAGMA integrity_check` on every SQLite database, and check each database state the
    /// generation recorded (page count, checksum) against what SQLite recovers from the
    /// restored files. Exit 12 on any problem.
    Drill {
        /// WS, WS@N, WS@TIME (UTC) or WS@-AGE (e.g. WS@-5m).
        spec: String,
        /// Scratch directory parent (default: $TMPDIR).
        #[arg(long)]
        scratch: Option<PathBuf>,
    },
    /// Delete what no kept generation of any workspace references.
    ///
    /// Without retention flags every generation is kept and only unreferenced data goes.
    /// Safe while commits run: objects younger than --grace are never touched, and a pack is
    /// deleted only by a later run, --grace after it was condemned.
    Gc {
        /// Report what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep the newest N generations of each workspace.
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Keep generations newer than this (e.g. 7d, 12h).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        keep_within: Option<std::time::Duration>,
        /// Grace period (default 1h); under 15m it is refused while a workspace is mounted.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1h")]
        grace: std::time::Duration,
    },
    /// List the workspaces of the store.
    Workspaces,
    /// Mount a workspace read-write (or a generation read-only with -o ro).
    ///
    /// Read-write: WS is served from a working copy on local disk (--cache-dir); the workspace
    /// is created if it does not exist. Contents are fetched from the store on first access and
    /// prefetched in the background, so mounting does not wait for the whole workspace. Every
    /// commit interval (1 s) a generation of what changed is committed; `owfs sync` or fsync of
    /// the mount's root directory waits for one; `owfs umount` commits a final one.
    ///
    /// With `-o ro` (time travel): a read-only view of WS@N (or WS's latest) served straight
    /// from the store, nothing restored first.
    ///
    /// With `-o fork=SRC@N`: WS starts as a fork of SRC@N (O(1), nothing copied) if it does not
    /// exist yet; the same command run again (after a crash, on another node) mounts the fork
    /// as it is, and any other existing WS is refused (status 10). With `-o rollback=N`: once
    /// the lease is taken, generation N's content is published as WS's newest generation
    /// (history is kept) and served; every mount with this option rolls back again.
    ///
    /// One writer per workspace: the mount takes the workspace's lease first. If another node
    /// holds it, the mount fails at once naming the holder and when its lease expires (status
    /// 11); --wait waits for it, --takeover fences the holder out now. A node that cannot renew
    /// its lease stops (every file operation returns EIO, the on_lease_loss hook runs, the
    /// daemon exits with status 13) before any other node may take over.
    ///
    /// Options (-o, comma-separated): ro; commit_interval_ms=N (default 1000);
    /// max_backlog_mb=N (writers slow down when this much is not yet uploaded; default 512);
    /// prefetch=0 (fetch only on access); threads=N (FUSE request threads, default 4);
    /// uring=auto|off (FUSE over io_uring where the kernel has it, the default; as root this
    /// turns on /sys/module/fuse/parameters/enable_uring); read_ahead_kb=N (the kernel's
    /// readahead on the mount, default 4096; 0 keeps the kernel's 128);
    /// lease_ttl_ms=N (default 30000), lease_renew_ms=N (10000), lease_margin_ms=N (5000),
    /// lease_skew_ms=N (largest clock difference between nodes, 2000); on_lease_loss=CMD
    /// (run by /bin/sh with OWFS_WORKSPACE, OWFS_MOUNTPOINT, OWFS_REASON; no commas: use a
    /// script); fork=SRC[@N]; rollback=N.
    ///
    /// Returns once the mount is ready (the daemon goes on in the background) unless -f.
    ///
    /// Also `mount -t owfs WS DIR -o store=URL,cache_dir=DIR,OPTIONS` and /etc/fstab lines of
    /// type owfs, once /sbin/mount.owfs is a symlink to this binary; the store and AWS_*
    /// variables may come from /etc/owfs/env (or -o env_file=PATH); nosuid, nodev and noexec
    /// are kernel flags (docs/decisions/mount-helper.md).
    Mount {
        /// WS (read-write), or WS@N with -o ro.
        spec: String,
        /// Directory to mount on (must exist); not with --prefetch-only.
        #[arg(required_unless_present = "prefetch_only")]
        mountpoint: Option<PathBuf>,
        /// Mount options, comma-separated (see above).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Option<String>,
        /// Stay in the foreground (the daemon runs in this process).
        #[arg(short, long)]
        foreground: bool,
        /// Local working copy (default /var/lib/owfs/cache/WS for root, else
        /// ~/.cache/owfs/WS). Emptied at mount: the store holds the truth.
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// If another node holds the workspace, wait until it releases it or its lease
        /// expires (at most DURATION, e.g. 90s; forever without a value).
        #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "forever", conflicts_with = "takeover")]
        wait: Option<String>,
        /// Take the workspace from its holder now, before its lease expires. The holder is
        /// fenced: its next commit is refused and it stops; what it wrote since its last
        /// generation is lost.
        #[arg(long)]
        takeover: bool,
        /// Pre-pull: download WS's latest generation into --cache-dir and exit, without
        /// mounting and without taking the lease (the node serving WS keeps running). A
        /// later mount with the same --cache-dir reads from that copy and fetches only what
        /// changed since, so a planned handoff pauses for the last delta only. Run it again
        /// just before the handoff to shrink the delta further.
        #[arg(long, conflicts_with_all = ["wait", "takeover", "foreground"])]
        prefetch_only: bool,
    },
    /// Commit a final generation, release the lease and unmount; returns once that generation
    /// is durable, so another node's mount proceeds at once and loses nothing.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Planned handoff: the same as umount (final generation, lease released), for the node
    /// that gives the workspace to another; prints the generation the next node starts from.
    Handoff {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Commit now: returns once every write made before the call is in a durable generation,
    /// and prints it (WS@N).
    Sync {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// State of a workspace: the lease (holder, epoch, expiry), the last generation and its
    /// age (the sync lag); for a mount point also the bytes not yet uploaded and the commits.
    Status {
        /// A mount point, or a workspace name (read from the store).
        target: String,
    },
}
