//! `owfs mount` and `owfs umount`: options, the daemon in the foreground, and the background
//! start that returns once the kernel shows the mount.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::generation::GenRecord;
use chunkstore::{Error, Repo, Result};

use crate::daemon::fuse::{Connection, Operations};
use crate::timetravel::TimeTravel;

/// How long the background start waits for the kernel to show the mount.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct MountOpts {
    pub read_only: bool,
    pub ws: crate::daemon::WsOptions,
}

impl MountOpts {
    pub fn parse(s: Option<&str>) -> Result<MountOpts> {
        let mut o = MountOpts::default();
        for opt in s.unwrap_or("").split(',').filter(|x| !x.is_empty()) {
            match opt.split_once('=') {
                None if opt == "ro" => o.read_only = true,
                None if opt == "rw" => o.read_only = false,
                None if opt == "nosuid" => o.ws.flags.nosuid = true,
                None if opt == "suid" => o.ws.flags.nosuid = false,
                None if opt == "nodev" => o.ws.flags.nodev = true,
                None if opt == "dev" => o.ws.flags.nodev = false,
                None if opt == "noexec" => o.ws.flags.noexec = true,
                None if opt == "exec" => o.ws.flags.noexec = false,
                // Always in effect.
                None if opt == "allow_other" || opt == "default_permissions" => {}
                _ if is_mount8_only(opt) => {}
                Some((k, v)) => o.ws.set(k, v)?,
                None => o.ws.set(opt, "")?,
            }
        }
        let refuse = |name: &str, reason: &str| {
            Err(Error::BadOption {
                option: name.into(),
                reason: reason.into(),
            })
        };
        match (o.read_only, &o.ws.fork_from, o.ws.rollback_to) {
            (_, Some(_), Some(_)) => refuse(
                "fork=, rollback=",
                "a mount either starts a new workspace as a fork or rolls an existing one back, not both",
            ),
            (true, Some(_), _) | (true, _, Some(_)) => refuse(
                "ro",
                "-o ro serves a generation as it is: fork= and rollback= are for read-write mounts",
            ),
            _ => Ok(o),
        }
    }
}

/// Options only mount(8), systemd and fstab act on (`noauto`, `_netdev`, `x-systemd.*`, …):
/// they reach `owfs mount` and the mount helper and say nothing to the daemon.
pub fn is_mount8_only(opt: &str) -> bool {
    let key = opt.split_once('=').map_or(opt, |(k, _)| k);
    matches!(
        key,
        "defaults"
            | "auto"
            | "noauto"
            | "nofail"
            | "_netdev"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "comment"
            | "loop"
            | "helper"
    ) || key.starts_with("x-")
}

fn mount_err(mountpoint: &Path, e: std::io::Error) -> Error {
    Error::io(mountpoint, e)
}

/// Is `path` a mount point of an owfs filesystem (per /proc/self/mountinfo)?
pub fn is_owfs_mount(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-");
        f.len() > 4
            && Path::new(f[4]) == canon
            && sep.is_some_and(|i| {
                f.get(i + 1).is_some_and(|t| t.starts_with("fuse"))
                    && f.get(i + 2).is_some_and(|s| s.starts_with("owfs"))
            })
    })
}

/// Serves `rec` read-only on `mountpoint` until it is unmounted.
pub fn run_read_only(
    repo: Arc<Repo>,
    rec: GenRecord,
    mountpoint: &Path,
    flags: crate::daemon::KernelFlags,
) -> Result<i32> {
    let spec = rec.spec();
    let fs = TimeTravel::new(repo, rec)?;
    let mut options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(format!("owfs:{spec}")),
        fuser::MountOption::Subtype("owfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    options.extend(flags.options());
    eprintln!("owfs: serving {spec} read-only on {}", mountpoint.display());
    let conn = Connection::open(mountpoint, &options, &fs.init_config())
        .map_err(|e| mount_err(mountpoint, e))?;
    conn.serve(&fs, 2, &|| false)
        .map_err(|e| mount_err(mountpoint, e))?;
    Ok(0)
}

/// Starts `owfs mount -f` as a detached daemon (with `forwarded`: the `-o`, `--wait` and
/// `--takeover` arguments, which `opts` holds parsed) and returns once the mount is visible
/// and, for a read-write mount, its control socket answers (`owfs status`, `sync` and
/// `umount` work the moment this returns).
pub fn spawn_and_wait(
    store: Option<&str>,
    spec: &str,
    mountpoint: &Path,
    cache_dir: Option<&Path>,
    forwarded: &[String],
    opts: &MountOpts,
) -> Result<i32> {
    clear_dead_mount(mountpoint);
    let exe = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", e))?;
    let log: PathBuf = std::env::temp_dir().join(format!("owfs-mount-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).map_err(|e| Error::io(&log, e))?;
    let mut cmd = Command::new(exe);
    if let Some(s) = store {
        cmd.arg("--store").arg(s);
    }
    cmd.args(["mount", "-f", spec]).arg(mountpoint);
    if let Some(c) = cache_dir {
        cmd.arg("--cache-dir").arg(c);
    }
    cmd.args(forwarded);
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| Error::io(&log, e))?)
        .stderr(log_file);
    // SAFETY: setsid and close_range are async-signal-safe system calls. setsid detaches the
    // daemon from our session; close_range keeps it from holding whatever else our caller left
    // open without close-on-exec (a pipe a supervisor reads to its end, say), which would make
    // that caller wait for as long as the mount lives.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            rustix::process::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|e| Error::io("owfs mount -f", e))?;
    let t0 = Instant::now();
    let socket = std::fs::canonicalize(mountpoint)
        .ok()
        .map(|m| crate::daemon::control::socket_path(&m));
    // A stale socket of a killed daemon may still be there: it must answer.
    let answers = || {
        opts.read_only
            || socket
                .as_ref()
                .is_none_or(|s| std::os::unix::net::UnixStream::connect(s).is_ok())
    };
    loop {
        if is_owfs_mount(mountpoint) && answers() {
            println!(
                "mounted {spec} on {} (log: {})",
                mountpoint.display(),
                log.display()
            );
            return Ok(0);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            eprint!("{text}");
            return Ok(status.code().unwrap_or(1).max(1));
        }
        // With --wait the daemon may wait for the holder's lease as long as it was told to.
        if opts.ws.wait.is_none() && t0.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            return Err(Error::io(
                mountpoint,
                std::io::Error::other("the mount did not become ready in 60 s"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mount left behind by a daemon that stopped after losing its lease answers ENOTCONN:
/// detach it so the mount point can be used again.
pub fn clear_dead_mount(mountpoint: &Path) {
    if is_owfs_mount(mountpoint) {
        if let Err(e) = std::fs::metadata(mountpoint) {
            if e.raw_os_error() == Some(libc::ENOTCONN) {
                eprintln!(
                    "owfs: {}: a dead owfs mount (its daemon stopped) was there; detaching it",
                    mountpoint.display()
                );
                let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

pub fn umount(mountpoint: &Path, json: bool, handoff: bool) -> Result<i32> {
    if is_owfs_mount(mountpoint) && std::fs::metadata(mountpoint).is_err() {
        clear_dead_mount(mountpoint);
        println!(
            "{}: the daemon had stopped; the dead mount was detached (nothing to commit)",
            mountpoint.display()
        );
        return Ok(0);
    }
    if !is_owfs_mount(mountpoint) {
        return Err(Error::io(
            mountpoint,
            std::io::Error::other("not an owfs mount point"),
        ));
    }
    // A read-write mount: the daemon commits, unmounts, commits what came last, and answers
    // once that generation is durable.
    let canon = std::fs::canonicalize(mountpoint).map_err(|e| Error::io(mountpoint, e))?;
    if crate::daemon::control::socket_path(&canon).exists() {
        let v = crate::daemon::control::request(mountpoint, "umount")?;
        if let Some(why) = v["lost_writes"].as_str() {
            eprintln!("owfs: warning: {why}");
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else if handoff {
            println!(
                "handed off {}: generation {} is durable and the lease is released; mount it on the next node",
                v["spec"].as_str().unwrap_or_default(),
                v["generation"]
            );
        } else {
            println!(
                "unmounted {}; generation {} is durable",
                mountpoint.display(),
                v["generation"]
            );
        }
        return Ok(0);
    }
    rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty())
        .map_err(|e| mount_err(mountpoint, e.into()))?;
    println!("unmounted {}", mountpoint.display());
    Ok(0)
}
