//! Crash: SIGKILL of the daemon at a random moment of a workload of SQLite transactions and
//! file writes, then a mount of the same workspace on an empty cache directory. The database
//! passes integrity_check, its rows are a prefix of the transactions, everything before the
//! last successful sync is there, files and rows come from the same cut, and the state the
//! generation recorded for each database is what SQLite recovers (`owfs drill`, page count).
//!
//! Beside it, three writer processes loop as editors, git and pip do: one SQLite transaction
//! in a shared database, then the number of that row written to `files/wK.tmp` and renamed
//! over `files/wK`, without fsync. Every file's content is checked against what its writer
//! could have written: never a byte nobody wrote (docs/decisions/frozen-bytes-outlive-names.md).
//!
//! `OWFS_CRASH_TRIALS=N` sets the trials per store and journal mode (default 2);
//! `OWFS_CRASH_STORES=file` limits the stores. scripts/crash-soak.sh runs many.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use owfs_tests::{kill_and_detach, Case};
use rand::{Rng, SeedableRng};

const WORKLOAD: &str = r#"
import os, sqlite3, sys
mnt, mode = sys.argv[1], sys.argv[2]
db = sqlite3.connect(os.path.join(mnt, "app.db"), isolation_level=None, timeout=30)
db.execute(f"PRAGMA journal_mode={mode}")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS t(i INTEGER PRIMARY KEY, v BLOB)")
os.makedirs(os.path.join(mnt, "files"), exist_ok=True)
i = 0
while True:
    i += 1
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES(?, randomblob(700))", (i,))
    db.execute("COMMIT")
    # After row i is committed: files/last says i (atomically, by rename).
    tmp = os.path.join(mnt, "files", "last.tmp")
    with open(tmp, "w") as f:
        f.write(str(i))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(mnt, "files", "last"))
    if i % 10 == 0:
        with open(os.path.join(mnt, "files", f"r{i}"), "wb") as f:
            f.write(str(i).encode() * 500)
    if i % 25 == 0:
        fd = os.open(mnt, os.O_RDONLY)
        os.fsync(fd)  # fsync of the mount's root: owfs sync
        os.close(fd)
        print(f"synced {i}", flush=True)
"#;

/// Writer K of the rename pattern: row (k, i) committed, then `files/wK` says i.
const WRITER: &str = r#"
import os, sqlite3, sys
mnt, mode, k = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(os.path.join(mnt, "files"), exist_ok=True)
db = sqlite3.connect(os.path.join(mnt, "writers.db"), isolation_level=None, timeout=30)
db.execute(f"PRAGMA journal_mode={mode}")
db.execute("CREATE TABLE IF NOT EXISTS w(k INTEGER, i INTEGER, PRIMARY KEY(k, i))")
i = 0
while True:
    i += 1
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO w VALUES(?, ?)", (int(k), i))
    db.execute("COMMIT")
    tmp = os.path.join(mnt, "files", f"w{k}.tmp")
    with open(tmp, "w") as f:
        f.write(str(i))
    os.rename(tmp, os.path.join(mnt, "files", f"w{k}"))
"#;

const WRITERS: u32 = 3;

/// The rename writers' part of a recovered workspace: each `files/wK` (and a `wK.tmp` left
/// behind) holds a number its writer wrote, after that row was committed in the same cut.
fn check_writers(m: &owfs_tests::RwMount) -> Result<String, String> {
    let db_path = m.path("writers.db");
    let rows: Vec<(i64, i64, i64)> = if db_path.exists() {
        let db = rusqlite::Connection::open(&db_path).map_err(|e| e.to_string())?;
        let ic: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| format!("writers.db integrity_check: {e}"))?;
        if ic != "ok" {
            return Err(format!("writers.db integrity_check: {ic}"));
        }
        let rows = match db.prepare("SELECT k, count(*), max(i) FROM w GROUP BY k") {
            Ok(mut q) => q
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| e.to_string())?
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?,
            Err(_) => Vec::new(), // killed before the table was committed
        };
        rows
    } else {
        Vec::new()
    };
    for &(k, count, max) in &rows {
        if count != max {
            return Err(format!("writer {k}: {count} rows, max {max}: not a prefix"));
        }
    }
    let mut out = Vec::new();
    for k in 0..WRITERS as i64 {
        let max = rows.iter().find(|r| r.0 == k).map_or(0, |r| r.2);
        for name in [format!("files/w{k}"), format!("files/w{k}.tmp")] {
            let Ok(bytes) = std::fs::read(m.path(&name)) else {
                continue;
            };
            let text = String::from_utf8(bytes.clone()).unwrap_or_default();
            let v: i64 = match text.parse() {
                Ok(v) if v > 0 => v,
                // The temporary file's name may come before its bytes (nothing replaced).
                _ if name.ends_with(".tmp") && bytes.is_empty() => continue,
                _ => {
                    return Err(format!(
                    "{name} holds {bytes:?}: bytes writer {k} never wrote (its rows end at {max})"
                ))
                }
            };
            if v > max {
                return Err(format!(
                    "{name} says {v} but writer {k}'s rows end at {max}: not one cut"
                ));
            }
            if !name.ends_with(".tmp") {
                out.push(format!("w{k}={v}/{max}"));
            }
        }
    }
    Ok(out.join(" "))
}

/// `python3 -c script args…`, its stderr dropped.
fn python(
    script: &str,
    args: &[&std::ffi::OsStr],
    stdout: Stdio,
) -> Result<std::process::Child, String> {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("python3: {e}"))
}

fn trial(c: &Case, ws: &str, mode: &str, seed: u64, n: usize) -> Result<String, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let m = c.mount_rw(ws, &format!("m{n}"), &[]);
    let pid = m.daemon_pid();
    let mut child = python(WORKLOAD, &[m.at.as_os_str(), mode.as_ref()], Stdio::piped())?;
    let mut writers: Vec<_> = (0..WRITERS)
        .map(|k| {
            python(
                WRITER,
                &[m.at.as_os_str(), mode.as_ref(), k.to_string().as_ref()],
                Stdio::null(),
            )
        })
        .collect::<Result<_, _>>()?;
    let out = child.stdout.take().unwrap();
    let synced = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = synced.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(v) = line.strip_prefix("synced ") {
                s2.store(v.parse().unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let wait = Duration::from_millis(rng.random_range(200..2500));
    let t0 = Instant::now();
    while t0.elapsed() < wait {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The last sync that returned before the kill.
    let synced_before = synced.load(std::sync::atomic::Ordering::SeqCst);
    kill_and_detach(pid, &m.at);
    let _ = child.kill();
    let _ = child.wait();
    for w in &mut writers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let _ = reader.join();
    drop(m); // its daemon is dead and the mount detached: nothing left to unmount

    // Another node recovers at once: --takeover instead of waiting for the lease to expire.
    let m2 = c.mount_rw_with(ws, &format!("r{n}"), &[], &["--takeover"]);
    let check = (|| -> Result<String, String> {
        let epochs = c.history(ws);
        if epochs.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("epochs go down along the history: {epochs:?}"));
        }
        if epochs.last().map(|g| g.2.as_str()) != Some("fence") {
            return Err(format!(
                "the new node did not fence the dead one: {epochs:?}"
            ));
        }
        // The state each database's record claims is what SQLite recovers from the restored
        // files (the drill recomputes page count and checksum), and what it opens here.
        let drill = c.owfs(&["drill", ws]);
        if !drill.status.success() {
            return Err(format!(
                "drill of the recovered generation: {}{}",
                String::from_utf8_lossy(&drill.stdout),
                String::from_utf8_lossy(&drill.stderr)
            ));
        }
        let log = c.json(&["log", ws]);
        let recorded_pages = log[0]["sqlite"]["app.db"]["page_count"].as_i64();
        let writers = check_writers(&m2)?;
        let db_path = m2.path("app.db");
        if !db_path.exists() {
            return if synced_before == 0 {
                Ok("killed before the database was committed".into())
            } else {
                Err(format!(
                    "app.db missing, though row {synced_before} was synced"
                ))
            };
        }
        let db = rusqlite::Connection::open(&db_path).map_err(|e| e.to_string())?;
        let ic: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| format!("integrity_check: {e}"))?;
        if ic != "ok" {
            return Err(format!("integrity_check: {ic}"));
        }
        let pages: i64 = db
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        if recorded_pages != Some(pages) {
            return Err(format!(
                "SQLite opens {pages} pages, the generation recorded {recorded_pages:?}"
            ));
        }
        let has_table: i64 = db
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 't'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| e.to_string())?;
        if has_table == 0 {
            // Killed between creating the database and committing its table.
            return if synced_before == 0 {
                Ok("killed before the table was committed".into())
            } else {
                Err(format!(
                    "table missing, though row {synced_before} was synced"
                ))
            };
        }
        let (count, max): (i64, Option<i64>) = db
            .query_row("SELECT count(*), max(i) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(|e| e.to_string())?;
        let k = max.unwrap_or(0);
        if count != k {
            return Err(format!("rows are not a prefix: {count} rows, max {k}"));
        }
        if (k as u64) < synced_before {
            return Err(format!("row {synced_before} was synced, only {k} rows"));
        }
        let last: i64 = match std::fs::read_to_string(m2.path("files/last")) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("files/last is {s:?}"))?,
            Err(_) => 0,
        };
        if !(last == k || last == k - 1 || (k == 0 && last == 0)) {
            return Err(format!(
                "files/last is {last} but the database has {k} rows: not one cut"
            ));
        }
        for i in (10..=last).step_by(10) {
            let Ok(got) = std::fs::read(m2.path(&format!("files/r{i}"))) else {
                return Err(format!("files/r{i} missing though files/last is {last}"));
            };
            if got != i.to_string().repeat(500).into_bytes() {
                return Err(format!(
                    "files/r{i} holds {} bytes that are not {i} written 500 times",
                    got.len()
                ));
            }
        }
        Ok(format!(
            "{k} rows, last {last}, synced {synced_before}, killed at {wait:?}; {writers}"
        ))
    })();
    m2.umount();
    check
}

#[test]
fn sigkill_of_the_daemon_loses_nothing_committed_and_keeps_one_cut() {
    let trials: usize = std::env::var("OWFS_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let stores = std::env::var("OWFS_CRASH_STORES").unwrap_or_else(|_| "file,s3".into());
    let mut held = 0;
    let mut failed = Vec::new();
    let seed0: u64 = std::env::var("OWFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    for store in stores.split(',') {
        let c = if store == "s3" {
            Case::s3()
        } else {
            Case::file()
        };
        for mode in ["wal", "delete"] {
            for n in 0..trials {
                let seed = seed0.wrapping_add(n as u64);
                let ws = format!("crash-{mode}-{n}");
                match trial(&c, &ws, mode, seed, n) {
                    Ok(msg) => {
                        held += 1;
                        eprintln!("[{store} {mode} #{n} seed {seed}] held: {msg}");
                    }
                    Err(e) => {
                        eprintln!("[{store} {mode} #{n} seed {seed}] FAILED: {e}");
                        failed.push(format!("{store} {mode} seed {seed}: {e}"));
                    }
                }
            }
        }
    }
    eprintln!("crash trials: {held} of {} held", held + failed.len());
    assert!(failed.is_empty(), "crash trials failed: {failed:#?}");
}
