//! The daemon's control socket: `owfs sync`, `owfs status` and `owfs umount` talk to the
//! daemon serving a mount point through a Unix socket named after that mount point. One JSON
//! request per line, one JSON reply per line.
//!
//! Only the daemon's own user (and root) is answered: the socket's directory is 0700 and
//! the socket 0600 whatever the umask, and each connection's peer credentials are checked,
//! so that a directory left open by someone (or a socket made reachable) still answers
//! nobody else (docs/SEMANTICS.md, "Limits").

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chunkstore::{Error, Result};
use parking_lot::{Condvar, Mutex};
use serde_json::{json, Value};

use super::Shared;

fn runtime_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        PathBuf::from("/run/owfs")
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(x).join("owfs")
    } else {
        std::env::temp_dir().join(format!("owfs-{}", rustix::process::geteuid().as_raw()))
    }
}

/// The socket of the daemon serving `mountpoint` (canonical path).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let h = chunkstore::Hash::of(mountpoint.as_os_str().as_encoded_bytes());
    runtime_dir().join(format!("{}.sock", &h.to_hex()[..24]))
}

/// Final state handed from the daemon's main thread to `umount` requests waiting for it.
#[derive(Default)]
struct Done {
    ok: Option<bool>,
    waiting: u32,
}

pub struct Control {
    done: Arc<(Mutex<Done>, Condvar)>,
    path: PathBuf,
}

impl Control {
    /// Called once the mount is gone and the final commit ran: answers pending `umount`s.
    pub fn finish(&self, ok: bool) {
        let (m, cv) = &*self.done;
        let mut d = m.lock();
        d.ok = Some(ok);
        cv.notify_all();
        let t0 = std::time::Instant::now();
        while d.waiting > 0 && t0.elapsed() < Duration::from_secs(5) {
            cv.wait_for(&mut d, Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A request line longer than this is refused (the requests are a few dozen bytes).
const MAX_REQUEST_BYTES: u64 = 4096;
/// A client that sends no request line within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket's directory: created 0700, or, if it exists, owned by us and made 0700. One
/// that another user owns is refused: they could replace our socket with theirs.
fn private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(dir, e)),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    let me = rustix::process::geteuid().as_raw();
    if !m.is_dir() || m.uid() != me {
        return Err(Error::io(
            dir,
            std::io::Error::other(format!(
                "the control socket's directory belongs to uid {} (not this user, uid {me}) or \
                 is not a directory: remove it",
                m.uid()
            )),
        ));
    }
    if m.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

pub fn serve(shared: Arc<Shared>) -> Result<Control> {
    let path = socket_path(&shared.mountpoint);
    let dir = path.parent().expect("socket has a directory");
    private_dir(dir)?;
    if path.exists() {
        // A previous daemon for this mount point died; its socket is stale.
        if UnixStream::connect(&path).is_ok() {
            return Err(Error::Conflict(format!(
                "another owfs daemon already serves {}",
                shared.mountpoint.display()
            )));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|e| Error::io(&path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(&path, e))?;
    let done: Arc<(Mutex<Done>, Condvar)> = Arc::default();
    let d2 = done.clone();
    std::thread::Builder::new()
        .name("owfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (s, d) = (shared.clone(), d2.clone());
                let _ = std::thread::Builder::new()
                    .name("owfs-control-conn".into())
                    .spawn(move || handle(conn, &s, &d));
            }
        })
        .map_err(|e| Error::io("thread", e))?;
    Ok(Control { done, path })
}

/// Whether the peer of `conn` may talk to this daemon: its own user, or root.
fn peer_allowed(conn: &UnixStream) -> std::result::Result<(), String> {
    let me = rustix::process::geteuid().as_raw();
    match rustix::net::sockopt::socket_peercred(conn) {
        Ok(c) if c.uid.as_raw() == me || c.uid.is_root() => Ok(()),
        Ok(c) => Err(format!(
            "refused: this daemon answers only its own user (uid {me}) and root, not uid {}",
            c.uid.as_raw()
        )),
        Err(e) => Err(format!("refused: the peer's credentials are unknown ({e})")),
    }
}

fn handle(conn: UnixStream, shared: &Arc<Shared>, done: &Arc<(Mutex<Done>, Condvar)>) {
    // The request is read first (bounded in size and time), so that a refused client reads
    // the refusal instead of finding the connection closed under its request.
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    })
    .take(MAX_REQUEST_BYTES);
    let mut line = String::new();
    if !matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        // A readiness probe (`owfs mount` connects and closes) or a client gone.
        return;
    }
    if let Err(why) = peer_allowed(&conn) {
        let mut w = conn;
        let _ = writeln!(w, "{}", json!({"ok": false, "error": why}));
        return;
    }
    let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let reply = match req.get("op").and_then(|o| o.as_str()) {
        Some("status") => json!({"ok": true, "status": shared.status()}),
        Some("sync") => match shared.sync_reporting_lost() {
            Ok((rec, lost)) => match lost {
                None => json!({"ok": true, "generation": rec.number, "spec": rec.spec()}),
                Some(why) => json!({
                    "ok": false,
                    "error": format!("generation {} is durable, but {why}", rec.spec()),
                    "generation": rec.number,
                    "lost_writes": true,
                    "cache_dir": shared.cache_dir,
                }),
            },
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Some("umount") => umount(shared, done),
        _ => json!({"ok": false, "error": format!("unknown request {line:?}")}),
    };
    let mut w = conn;
    let _ = writeln!(w, "{reply}");
    if req.get("op").and_then(|o| o.as_str()) == Some("umount") {
        let (m, cv) = &**done;
        m.lock().waiting -= 1;
        cv.notify_all();
    }
}

fn umount(shared: &Arc<Shared>, done: &Arc<(Mutex<Done>, Condvar)>) -> Value {
    {
        done.0.lock().waiting += 1;
    }
    let seen = shared.stats.lock().lost_reported;
    // Commit first, so the pause after the unmount covers only the last writes.
    if let Err(e) = shared.sync_now() {
        return json!({"ok": false, "error": format!("commit before unmount failed: {e}")});
    }
    // A workload that opens and closes files keeps the mount busy for moments: retry a while.
    let t0 = std::time::Instant::now();
    let mut res = rustix::mount::unmount(&shared.mountpoint, rustix::mount::UnmountFlags::empty());
    while res == Err(rustix::io::Errno::BUSY) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
        res = rustix::mount::unmount(&shared.mountpoint, rustix::mount::UnmountFlags::empty());
    }
    if let Err(e) = res {
        let why = if e == rustix::io::Errno::BUSY {
            "the mount point is busy (a process has a file or directory open there, or its working directory is inside)".to_string()
        } else {
            e.to_string()
        };
        return json!({"ok": false, "error": format!("cannot unmount: {why}")});
    }
    let (m, cv) = &**done;
    let mut d = m.lock();
    while d.ok.is_none() {
        cv.wait(&mut d);
    }
    let ok = d.ok == Some(true);
    drop(d);
    let st = shared.status();
    if ok {
        json!({
            "ok": true,
            "generation": st["generation"],
            "spec": format!("{}@{}", shared.ws, st["generation"]),
            // Lost writes no sync reported yet (the cache directory was full): said, not fatal.
            "lost_writes": shared.lost_writes_since(seen),
            "status": st,
        })
    } else {
        json!({"ok": false, "error": format!("the final commit failed: {}", st["last_error"]), "status": st})
    }
}

/// Sends one request to the daemon serving `mountpoint`.
pub fn request(mountpoint: &Path, op: &str) -> Result<Value> {
    let canon = std::fs::canonicalize(mountpoint).map_err(|e| Error::io(mountpoint, e))?;
    let path = socket_path(&canon);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "the owfs daemon serving this mount point belongs to another user (run this as \
             that user, or as root)"
        } else {
            "no owfs daemon serves this mount point (not mounted read-write by owfs?)"
        };
        Error::io(mountpoint, std::io::Error::other(why))
    })?;
    writeln!(s, "{}", json!({"op": op})).map_err(|e| Error::io(&path, e))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&line).map_err(|_| {
        Error::io(
            &path,
            std::io::Error::other(
                "the daemon closed the connection without a reply (it may have exited)",
            ),
        )
    })?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else if v["lost_writes"] == json!(true) {
        // Not the store's fault: the cache directory refused bytes (full, or an I/O error).
        Err(Error::io(
            Path::new(v["cache_dir"].as_str().unwrap_or_default()),
            std::io::Error::other(
                v["error"]
                    .as_str()
                    .unwrap_or("writes were lost")
                    .to_string(),
            ),
        ))
    } else {
        Err(Error::Store {
            store: canon.display().to_string(),
            detail: v["error"].as_str().unwrap_or("request failed").to_string(),
        })
    }
}
