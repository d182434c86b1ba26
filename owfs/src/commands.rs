//! One function per command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chunkstore::gc::{self, GcOptions};
use chunkstore::generation::{self, GenRecord};
use chunkstore::progress::Progress;
use chunkstore::publish;
use chunkstore::read::{self, Found};
use chunkstore::restore::{restore_tree, RestoreOptions};
use chunkstore::tree::Kind;
use chunkstore::{Error, Repo, Result, Store};
use serde_json::json;

use crate::cli::{Cli, Command};
use crate::ui::{self, Bar};
use owfs::exit;

/// The embedded default store: /var/lib/owfs/store for root, else under $XDG_DATA_HOME.
pub fn default_store_url() -> String {
    let dir: PathBuf = if rustix_is_root() {
        PathBuf::from("/var/lib/owfs/store")
    } else {
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        base.join("owfs/store")
    };
    format!("file://{}", dir.display())
}

fn rustix_is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn open(cli: &Cli, rt: &tokio::runtime::Handle, create: bool) -> Result<Arc<Repo>> {
    let url = cli.store.clone().unwrap_or_else(default_store_url);
    let store = Store::open_with(&url, create)?;
    Repo::open(store, rt.clone(), create)
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// Runs the command; its failure is the store's or the lease's (`owfs::exit` maps both).
pub fn run(cli: &Cli, rt: tokio::runtime::Handle) -> owfs::error::Result<i32> {
    let bars = !cli.json && !cli.quiet;
    match &cli.command {
        Command::Snapshot { dir, ws } => {
            let repo = open(cli, &rt, true)?;
            let progress = Arc::new(Progress::default());
            let t0 = Instant::now();
            let done = {
                let _bar = Bar::start(progress.clone(), "snapshot:", bars);
                publish::snapshot(&repo, dir, ws, &progress)?
            };
            let secs = t0.elapsed().as_secs_f64();
            if cli.json {
                let mut v = serde_json::to_value(&done).expect("json");
                v["seconds"] = json!(secs);
                print_json(&v);
            } else {
                let g = &done.generation;
                println!(
                    "{}: {} files, {} dirs, {} ({} read, {} new in the store) in {:.2}s, {} PUTs",
                    g.spec(),
                    done.tree.files,
                    done.tree.dirs,
                    ui::size(done.tree.bytes),
                    ui::size(done.tree.bytes_read),
                    ui::size(done.write.stored_bytes_new),
                    secs,
                    done.requests.puts
                );
                if done.tree.skipped > 0 {
                    eprintln!(
                        "owfs: note: {} sockets were not stored (sockets cannot be persisted)",
                        done.tree.skipped
                    );
                }
            }
            Ok(0)
        }
        Command::Log { ws, limit, long } => {
            let repo = open(cli, &rt, false)?;
            generation::check_workspace_name(ws)?;
            let mut numbers = repo.block_on(generation::list_generations(&repo.store, ws))?;
            if numbers.is_empty() {
                return Err(Error::UnknownWorkspace(ws.clone()).into());
            }
            numbers.reverse();
            if let Some(l) = limit {
                numbers.truncate(*l);
            }
            let recs = fetch_records(&repo, ws, &numbers)?;
            if cli.json {
                print_json(&serde_json::to_value(&recs).expect("json"));
            } else {
                println!(
                    "{:>8}  {:<20}  {:>8}  {:>10}  {:>10}  KIND",
                    "GEN", "TIME (UTC)", "FILES", "BYTES", "NEW"
                );
                for r in &recs {
                    let kind = match &r.origin {
                        Some(o) => format!("{} of {o}", r.kind),
                        None => r.kind.clone(),
                    };
                    println!(
                        "{:>8}  {:<20}  {:>8}  {:>10}  {:>10}  {}",
                        r.number,
                        ui::time(r.created_ms),
                        r.files,
                        ui::size(r.bytes),
                        ui::size(r.bytes_new),
                        kind
                    );
                    if *long {
                        for (path, d) in &r.sqlite {
                            println!("{:>10}{}", "", db_line(path, d));
                        }
                    }
                }
            }
            Ok(0)
        }
        Command::Ls { spec, path, long } => {
            let repo = open(cli, &rt, false)?;
            let rec = repo.block_on(generation::resolve(&repo.store, spec))?;
            let entries = match read::lookup(&repo, repo.root_of(&rec)?, path, &rec.spec())? {
                Found::Dir(t) => t.entries,
                Found::Entry(e) => vec![e],
            };
            if cli.json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        json!({
                            "name": e.name_lossy(), "kind": format!("{:?}", e.kind).to_lowercase(),
                            "mode": format!("{:o}", e.mode), "uid": e.uid, "gid": e.gid, "size": e.size,
                            "mtime_ns": e.mtime_ns,
                            "target": if e.kind == Kind::Symlink { Some(String::from_utf8_lossy(&e.target).into_owned()) } else { None },
                        })
                    })
                    .collect();
                print_json(&json!({ "generation": rec.spec(), "path": path, "entries": v }));
            } else {
                let mut out = std::io::stdout().lock();
                for e in &entries {
                    let name = e.name_lossy();
                    let line = if *long {
                        let t = match e.kind {
                            Kind::Dir => 'd',
                            Kind::Symlink => 'l',
                            Kind::Fifo => 'p',
                            Kind::CharDev => 'c',
                            Kind::BlockDev => 'b',
                            Kind::File => '-',
                        };
                        let target = if e.kind == Kind::Symlink {
                            format!(" -> {}", String::from_utf8_lossy(&e.target))
                        } else {
                            String::new()
                        };
                        format!(
                            "{t}{:04o} {:>5} {:>5} {:>12} {} {name}{target}",
                            e.mode,
                            e.uid,
                            e.gid,
                            e.size,
                            ui::time((e.mtime_ns.max(0) / 1_000_000) as u64)
                        )
                    } else if e.kind == Kind::Dir {
                        format!("{name}/")
                    } else {
                        name
                    };
                    let _ = writeln!(out, "{line}");
                }
            }
            Ok(0)
        }
        Command::Cat { spec, path } => {
            let repo = open(cli, &rt, false)?;
            let rec = repo.block_on(generation::resolve(&repo.store, spec))?;
            match read::lookup(&repo, repo.root_of(&rec)?, path, &rec.spec())? {
                Found::Entry(e) if e.kind == Kind::File => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    read::write_file(&repo, &e, path, &mut out)?;
                    out.flush().map_err(|e| Error::io("<stdout>", e))?;
                    Ok(0)
                }
                _ => Err(Error::UnknownPath {
                    at: rec.spec(),
                    path: format!("{path} (not a regular file)"),
                }
                .into()),
            }
        }
        Command::Restore { spec, dir, force } => {
            let repo = open(cli, &rt, false)?;
            let rec = repo.block_on(generation::resolve(&repo.store, spec))?;
            if !force && !is_empty_dir(dir)? {
                return Err(Error::Conflict(format!(
                    "{} is not empty; restore into an empty directory, or pass --force to replace entries of the same names",
                    dir.display()
                ))
                .into());
            }
            let progress = Arc::new(Progress::default());
            progress
                .total_bytes
                .store(rec.bytes, std::sync::atomic::Ordering::Relaxed);
            let t0 = Instant::now();
            let report = {
                let _bar = Bar::start(progress.clone(), "restore:", bars);
                restore_tree(
                    &repo,
                    repo.root_of(&rec)?,
                    dir,
                    RestoreOptions {
                        keep_going: false,
                        progress: &progress,
                    },
                )?
            };
            let secs = t0.elapsed().as_secs_f64();
            if cli.json {
                print_json(
                    &json!({ "generation": rec.spec(), "target": dir, "files": report.files,
                    "dirs": report.dirs, "bytes": report.bytes, "link_copies": report.link_copies,
                    "seconds": secs, "requests": repo.store.counters() }),
                );
            } else {
                println!(
                    "restored {} into {}: {} files, {} dirs, {} in {:.2}s",
                    rec.spec(),
                    dir.display(),
                    report.files,
                    report.dirs,
                    ui::size(report.bytes),
                    secs
                );
            }
            if report.link_copies > 0 && !cli.quiet {
                eprintln!(
                    "owfs: note: {} hard links were restored as copies: {} allows fewer links \
                     to one file than the workspace holds (ext4: 65,000)",
                    report.link_copies,
                    dir.display()
                );
            }
            Ok(0)
        }
        Command::Fork { spec, new } => {
            let repo = open(cli, &rt, false)?;
            let src = repo.block_on(generation::resolve(&repo.store, spec))?;
            let rec = publish::fork(&repo, &src, new)?;
            report_gen(cli, &rec, &format!("forked {} as", src.spec()));
            Ok(0)
        }
        Command::Rollback { ws, n } => {
            let repo = open(cli, &rt, false)?;
            generation::check_workspace_name(ws)?;
            if let Some(l) = live_lease(&repo, ws)? {
                return Err(owfs::error::Error::Mounted(format!(
                    "workspace {ws} is mounted by node {} (host {}, pid {}): a rollback now would make that mount's next commit fail and stop it; unmount it first (`owfs umount`), or roll back as it mounts: `owfs mount {ws} DIR -o rollback={n}`",
                    l.holder.node, l.holder.host, l.holder.pid
                )));
            }
            let rec = publish::rollback(&repo, ws, *n, None)?;
            report_gen(cli, &rec, &format!("rolled back {ws} to generation {n} as"));
            Ok(0)
        }
        Command::Drill { spec, scratch } => Ok(drill(cli, &rt, spec, scratch.as_deref())?),
        Command::Gc {
            dry_run,
            keep_last,
            keep_within,
            grace,
        } => {
            let repo = open(cli, &rt, false)?;
            if !*dry_run {
                refuse_short_grace_while_mounted(&repo, *grace)?;
            }
            let opts = GcOptions {
                dry_run: *dry_run,
                keep_last: *keep_last,
                keep_within: *keep_within,
                grace: *grace,
            };
            let r = gc::gc(&repo, &opts)?;
            if cli.json {
                print_json(&serde_json::to_value(&r).expect("json"));
            } else {
                let verb = if r.dry_run { "would delete" } else { "deleted" };
                println!(
                    "gc{}: {} workspaces, {} generations kept, {verb} {} generations; {} packs: {verb} {} ({}), condemned {} (deleted by a run at least --grace later), {} resurrected; {} unreferenced inside live packs",
                    if r.dry_run { " (dry run)" } else { "" },
                    r.workspaces,
                    r.generations_kept,
                    r.generations_deleted.len(),
                    r.packs_total,
                    r.packs_deleted,
                    ui::size(r.bytes_deleted),
                    r.packs_condemned,
                    r.packs_resurrected,
                    ui::size(r.bytes_dead_in_live_packs),
                );
            }
            Ok(0)
        }
        Command::Mount {
            spec,
            mountpoint,
            options,
            foreground,
            cache_dir,
            wait,
            takeover,
            prefetch_only,
        } => {
            let mut opts = owfs::mount::MountOpts::parse(options.as_deref())?;
            if *prefetch_only {
                let repo = open(cli, &rt, false)?;
                let bars = !cli.json && !cli.quiet;
                let progress = Arc::new(chunkstore::progress::Progress::default());
                let report = {
                    let _bar = ui::Bar::start(progress.clone(), "pre-pull:", bars);
                    owfs::daemon::prepull(&repo, spec, cache_dir.clone(), &progress)?
                };
                if cli.json {
                    print_json(&serde_json::to_value(&report).expect("json"));
                } else {
                    println!(
                        "pre-pulled {}: {} files, {} blobs ({} already here), {} fetched in {} requests",
                        report.generation,
                        report.files,
                        report.blobs,
                        report.blobs_already_cached,
                        ui::size(report.bytes_fetched),
                        report.requests
                    );
                }
                return Ok(0);
            }
            let mountpoint = mountpoint.as_deref().expect("clap requires it");
            opts.ws.takeover = *takeover;
            opts.ws.wait = match wait.as_deref() {
                None => None,
                Some("forever") => Some(None),
                Some(d) => Some(Some(humantime::parse_duration(d).map_err(|e| {
                    Error::BadOption {
                        option: format!("--wait={d}"),
                        reason: format!("{e}; give a duration such as 90s or 5m"),
                    }
                })?)),
            };
            if !*foreground {
                let mut forwarded: Vec<String> = Vec::new();
                if let Some(o) = options {
                    forwarded.extend(["-o".into(), o.clone()]);
                }
                if let Some(w) = wait {
                    forwarded.push(format!("--wait={w}"));
                }
                if *takeover {
                    forwarded.push("--takeover".into());
                }
                return Ok(owfs::mount::spawn_and_wait(
                    cli.store.as_deref(),
                    spec,
                    mountpoint,
                    cache_dir.as_deref(),
                    &forwarded,
                    &opts,
                )?);
            }
            if opts.read_only {
                let repo = open(cli, &rt, false)?;
                let rec = repo.block_on(generation::resolve(&repo.store, spec))?;
                return Ok(owfs::mount::run_read_only(
                    repo,
                    rec,
                    mountpoint,
                    opts.ws.flags,
                )?);
            }
            let (ws, sel) = generation::parse_selector(spec)?;
            if sel != generation::Selector::Latest {
                return Err(Error::BadName {
                    name: spec.clone(),
                    reason: format!(
                        "a read-write mount serves a workspace's latest generation; mount {spec} with -o ro (read-only), `owfs mount NEW DIR -o fork={spec}` (a new workspace from it), or `owfs mount {ws} DIR -o rollback={}` (back to it)",
                        match sel {
                            generation::Selector::Number(n) => n.to_string(),
                            _ => "N".to_string(),
                        }
                    ),
                }
                .into());
            }
            // The store is created on first use, like the workspace.
            let repo = open(cli, &rt, true)?;
            // The daemon says why it stopped; the status is the binary's business.
            owfs::daemon::run(repo, &ws, mountpoint, cache_dir.clone(), opts.ws)
                .map(|stop| stop.exit_code())
        }
        Command::Umount { mountpoint } => Ok(owfs::mount::umount(mountpoint, cli.json, false)?),
        Command::Handoff { mountpoint } => Ok(owfs::mount::umount(mountpoint, cli.json, true)?),
        Command::Sync { mountpoint } => {
            let v = owfs::daemon::control::request(mountpoint, "sync")?;
            if cli.json {
                print_json(&v);
            } else {
                println!("{}", v["spec"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        Command::Status { target } => Ok(status(cli, &rt, target)?),
        Command::Workspaces => {
            let repo = open(cli, &rt, false)?;
            let names = repo.block_on(generation::list_workspaces(&repo.store))?;
            if cli.json {
                print_json(&json!(names));
            } else {
                for n in names {
                    println!("{n}");
                }
            }
            Ok(0)
        }
    }
}

/// Shortest `gc --grace` allowed while a workspace of the store is mounted: a mount merges
/// its own index objects while their packs are younger than `COMPACT_MAX_AGE_MS` (10 min),
/// so a gc that condemned and deleted a younger pack could see a later merge name it again
/// (docs/decisions/index-compaction.md). 5 minutes more cover clock skew and the merge.
const GC_GRACE_WHILE_MOUNTED: std::time::Duration =
    std::time::Duration::from_millis(chunkstore::repo::COMPACT_MAX_AGE_MS + 5 * 60 * 1000);

fn refuse_short_grace_while_mounted(repo: &Repo, grace: std::time::Duration) -> Result<()> {
    if grace >= GC_GRACE_WHILE_MOUNTED {
        return Ok(());
    }
    for ws in repo.block_on(generation::list_workspaces(&repo.store))? {
        if let Some(l) = live_lease(repo, &ws)? {
            return Err(Error::Conflict(format!(
                "gc --grace {} refused: workspace {ws} is mounted by {} (lease live), and a \
                 mount may still name packs younger than {} in the index; use --grace {} or \
                 more, or run gc once no workspace is mounted",
                humantime::format_duration(grace),
                l.holder.node,
                humantime::format_duration(std::time::Duration::from_millis(
                    chunkstore::repo::COMPACT_MAX_AGE_MS
                )),
                humantime::format_duration(GC_GRACE_WHILE_MOUNTED),
            )));
        }
    }
    Ok(())
}

/// The lease of `ws` if a node holds it: one a mount could not take without --takeover.
fn live_lease(repo: &Repo, ws: &str) -> Result<Option<lease::LeaseRecord>> {
    let lease = repo.block_on(lease::read(&repo.store, ws))?;
    let (now, cfg) = (generation::now_ms(), lease::LeaseConfig::default());
    Ok(lease.filter(|l| !lease::is_free(l, now, &cfg)))
}

/// `owfs status MOUNTPOINT|WS`: from the daemon if TARGET is an owfs mount, else from the
/// store (lease and latest generation only).
fn status(cli: &Cli, rt: &tokio::runtime::Handle, target: &str) -> Result<i32> {
    let path = std::path::Path::new(target);
    let st = if owfs::mount::is_owfs_mount(path) {
        owfs::daemon::control::request(path, "status")?["status"].take()
    } else {
        generation::check_workspace_name(target).map_err(|_| Error::BadName {
            name: target.to_string(),
            reason: "neither an owfs mount point nor a workspace name".into(),
        })?;
        let repo = open(cli, rt, false)?;
        let latest = repo
            .block_on(generation::latest(&repo.store, target))?
            .ok_or_else(|| Error::UnknownWorkspace(target.to_string()))?;
        let lease = repo.block_on(lease::read(&repo.store, target))?;
        let now = generation::now_ms();
        json!({
            "workspace": target,
            "store": repo.store.url(),
            "generation": latest.number,
            "generation_age_ms": now.saturating_sub(latest.created_ms),
            "epoch": latest.epoch,
            "lease": lease.map(|l| json!({
                "epoch": l.epoch,
                "holder": {"node": l.holder.node, "host": l.holder.host, "pid": l.holder.pid},
                "expires_ms": l.expires_ms,
                "expires_in_ms": l.expires_ms.saturating_sub(now),
                "released": l.released,
                "ttl_ms": l.ttl_ms,
            })),
        })
    };
    if cli.json {
        print_json(&st);
        return Ok(0);
    }
    let line = |k: &str, v: String| println!("{k:<11} {v}");
    line(
        "workspace",
        st["workspace"].as_str().unwrap_or_default().into(),
    );
    if let Some(m) = st["mountpoint"].as_str() {
        line("mountpoint", m.into());
    }
    line("store", st["store"].as_str().unwrap_or_default().into());
    line(
        "generation",
        format!(
            "{} ({} ago)",
            st["generation"],
            ui::ms(st["generation_age_ms"].as_u64().unwrap_or(0))
        ),
    );
    let l = &st["lease"];
    if l.is_null() {
        line("lease", "none (no node has mounted it)".into());
    } else if l["released"] == json!(true) {
        line("lease", format!("free (released at epoch {})", l["epoch"]));
    } else {
        let h = &l["holder"];
        let left = l["expires_in_ms"].as_u64().unwrap_or(0);
        line(
            "lease",
            format!(
                "epoch {}, held by node {} (host {}, pid {}), {}",
                l["epoch"],
                h["node"].as_str().unwrap_or("?"),
                h["host"].as_str().unwrap_or("?"),
                h["pid"],
                if left > 0 {
                    format!("expires in {}", ui::ms(left))
                } else {
                    "expired".into()
                }
            ),
        );
    }
    if !st["pending_bytes"].is_null() {
        line(
            "pending",
            format!("{} bytes not yet in a generation", st["pending_bytes"]),
        );
        line(
            "commits",
            format!(
                "{} ok, {} failed; barrier p99 {} us",
                st["commits"], st["commit_failures"], st["barrier_us"]["p99"]
            ),
        );
    }
    if let Some(t) = st["fuse_transport"].as_str() {
        line("transport", t.into());
    }
    if let Some(e) = st["last_error"].as_str() {
        line("last error", e.into());
    }
    if let Some(e) = l["lost"].as_str() {
        line("state", format!("LEASE LOST: {e}"));
    } else if st["failed"] == json!(true) {
        line("state", "FAILED: file operations return EIO".into());
    }
    Ok(0)
}

fn report_gen(cli: &Cli, rec: &GenRecord, what: &str) {
    if cli.json {
        print_json(&serde_json::to_value(rec).expect("json"));
    } else {
        println!("{what} {}", rec.spec());
    }
}

fn fetch_records(repo: &Arc<Repo>, ws: &str, numbers: &[u64]) -> Result<Vec<GenRecord>> {
    use futures::StreamExt;
    let store = &repo.store;
    let recs: Vec<Result<GenRecord>> = repo.block_on(
        futures::stream::iter(
            numbers
                .iter()
                .map(|&n| generation::get_generation(store, ws, n)),
        )
        .buffered(16)
        .collect(),
    );
    recs.into_iter().collect()
}

fn is_empty_dir(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// One database's recorded state on one line (`owfs log -l`).
fn db_line(path: &str, d: &chunkstore::generation::DbState) -> String {
    let mode = match &d.wal {
        Some(w) => format!(
            "wal: last commit frame {} (salts {:08x} {:08x}, checkpoint {}{})",
            w.last_commit,
            w.salt1,
            w.salt2,
            w.checkpoint_seq,
            if w.torn_frames > 0 {
                format!(", {} uncommitted frames after it", w.torn_frames)
            } else {
                String::new()
            }
        ),
        None if d.hot_journal => format!("{}, hot journal (rolled back on open)", d.journal_mode),
        None => d.journal_mode.clone(),
    };
    let damage = match &d.corruption {
        Some(c) => format!("  WAL DAMAGE: {c}"),
        None => String::new(),
    };
    format!(
        "{path}: {} pages of {} B, {mode}, checksum {}{damage}",
        d.page_count, d.page_size, d.checksum
    )
}

fn drill(
    cli: &Cli,
    rt: &tokio::runtime::Handle,
    spec: &str,
    scratch: Option<&Path>,
) -> Result<i32> {
    let repo = open(cli, rt, false)?;
    let rec = repo.block_on(generation::resolve(&repo.store, spec))?;
    let progress = Arc::new(Progress::default());
    let v = {
        let _bar = Bar::start(progress.clone(), "drill:", !cli.json && !cli.quiet);
        owfs::drill::drill(&repo, &rec, scratch, &progress)?
    };
    if cli.json {
        print_json(&serde_json::to_value(&v).expect("json"));
    } else if v.ok {
        println!(
            "drill {}: OK: {} files, {} verified, {} SQLite databases pass integrity_check, in {:.2}s",
            v.generation,
            v.files,
            ui::size(v.bytes),
            v.databases,
            v.seconds
        );
        for d in &v.recorded {
            println!(
                "  {}: {} pages, checksum {} as recorded{}",
                d.path,
                d.page_count,
                d.checksum,
                if d.rolled_back {
                    "; SQLite rolled back the hot journal this generation holds"
                } else {
                    ""
                }
            );
        }
    } else {
        println!(
            "drill {}: FAILED: {} problems",
            v.generation,
            v.problems.len()
        );
        for p in &v.problems {
            println!("  {p}");
        }
    }
    Ok(if v.ok { 0 } else { exit::DRILL_FAILED })
}
