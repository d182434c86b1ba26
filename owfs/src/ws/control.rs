//! The daemon's control socket: `owfs sync`, `owfs status` and `owfs umount` talk to the
//! daemon serving a mount point through a Unix socket named after that mount point. One JSON
//! request per line, one JSON reply per line.

use std::io::{BufRead, BufReader, Write};
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

pub fn serve(shared: Arc<Shared>) -> Result<Control> {
    let path = socket_path(&shared.mountpoint);
    let dir = path.parent().expect("socket has a directory");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
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

fn handle(conn: UnixStream, shared: &Arc<Shared>, done: &Arc<(Mutex<Done>, Condvar)>) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut line = String::new();
    if !matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        // A readiness probe (`owfs mount` connects and closes) or a client gone.
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
    let mut s = UnixStream::connect(&path).map_err(|_| {
        Error::io(
            mountpoint,
            std::io::Error::other(
                "no owfs daemon serves this mount point (not mounted read-write by owfs?)",
            ),
        )
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
