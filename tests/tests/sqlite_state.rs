//! What each generation records about a database (docs/SEMANTICS.md) against what the real
//! `sqlite3` sees after restoring that generation: page count, the WAL's last commit frame
//! (the log size `PRAGMA wal_checkpoint` reports after recovery), rows committed as whole
//! transactions; and the drill recomputing the checksum. Damage to frames an earlier
//! generation recorded as committed, made through the mount, is reported; a torn tail is
//! not.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use owfs_tests::Case;

/// Writers: each process commits transactions of a few rows into `t` (its id and a sequence
/// number), updates and deletes some, until it has made `n`.
const WRITER: &str = r#"
import sqlite3, sys, random, time
db, mode, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
con = sqlite3.connect(db, timeout=60, isolation_level=None)
con.execute("PRAGMA journal_mode=" + mode)
con.execute("CREATE TABLE IF NOT EXISTS t(p INTEGER, s INTEGER, v BLOB, PRIMARY KEY(p, s))")
rnd = random.Random(me)
for s in range(1, n + 1):
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t VALUES (?, ?, ?)", (me, s, rnd.randbytes(rnd.choice([50, 900, 5000]))))
    if s % 7 == 0:
        con.execute("UPDATE t SET v = randomblob(2000) WHERE p = ? AND s = ?", (me, s - 3))
    if s % 11 == 0:
        con.execute("UPDATE t SET v = NULL WHERE p = ? AND s = ?", (me, s - 5))
    con.execute("COMMIT")
    time.sleep(0.01)
    if mode == "WAL" and me == 0 and s % 25 == 0:
        con.execute("PRAGMA wal_checkpoint(PASSIVE)")
"#;

fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process that runs `sql` on `db` (one statement at a time), says "open" and keeps its
/// connection until killed.
fn hold(db: &Path, sql: &str) -> std::process::Child {
    let mut p = Command::new("python3")
        .args([
            "-c",
            r#"
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
for s in sys.argv[2].split(";"):
    if s.strip():
        con.execute(s)
print("open", flush=True)
sys.stdin.read()
"#,
            db.to_str().unwrap(),
            sql,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(p.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "open");
    p
}

/// Generations of `ws` as `owfs log --json` lists them, oldest first.
fn generations(c: &Case, ws: &str) -> Vec<serde_json::Value> {
    let mut v = c.json(&["log", ws]).as_array().unwrap().clone();
    v.sort_by_key(|g| g["number"].as_u64().unwrap());
    v
}

fn workload(c: &Case, mode: &str) {
    let ws = format!("st-{}", mode.to_lowercase());
    let m = c.mount_rw(&ws, &format!("m-{ws}"), &["commit_interval_ms=300"]);
    let db = m.path("app.db");
    // The table exists before the writers start: every generation that holds the database
    // holds its table (a cut between the header and the CREATE had nothing to count).
    sqlite3(
        &db,
        &format!(
            "PRAGMA journal_mode={mode}; \
             CREATE TABLE IF NOT EXISTS t(p INTEGER, s INTEGER, v BLOB, PRIMARY KEY(p, s));"
        ),
    );
    let procs: Vec<_> = (0..3)
        .map(|me| {
            Command::new("python3")
                .args(["-c", WRITER, db.to_str().unwrap(), mode])
                .arg(me.to_string())
                .arg("120")
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Generations cut while the writers run (the interval's, and these).
    for _ in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        m.sync();
    }
    for mut p in procs {
        assert!(p.wait().unwrap().success());
    }
    m.sync();
    m.umount();
    let gens = generations(c, &ws);
    let mut checked = 0;
    let mut with_frames = 0;
    for g in &gens {
        let Some(st) = g["sqlite"].get("app.db") else {
            continue;
        };
        let n = g["number"].as_u64().unwrap();
        assert!(st["corruption"].is_null(), "[{}] gen {n}: {st}", c.name);
        let restored = c.restore(&format!("{ws}@{n}"), &format!("r-{ws}-{n}"));
        let rdb = restored.join("app.db");
        let out = sqlite3(
            &rdb,
            "PRAGMA page_count; PRAGMA wal_checkpoint(PASSIVE); \
             SELECT p, count(*), max(s) FROM t GROUP BY p;",
        );
        let mut lines = out.lines();
        let pages: u64 = lines.next().unwrap().parse().unwrap();
        assert_eq!(
            pages,
            st["page_count"].as_u64().unwrap(),
            "[{}] {mode} gen {n}: page count ({st})",
            c.name
        );
        let ckpt: Vec<i64> = lines
            .next()
            .unwrap()
            .split('|')
            .map(|x| x.parse().unwrap())
            .collect();
        if mode == "WAL" {
            assert_eq!(st["journal_mode"], "wal", "[{}] gen {n}", c.name);
            let recorded = st["wal"]["last_commit"].as_i64().unwrap_or(0);
            assert_eq!(
                ckpt[1], recorded,
                "[{}] gen {n}: frames SQLite recovers vs the recorded last commit ({st})",
                c.name
            );
            with_frames += (recorded > 0) as usize;
        } else {
            assert_eq!(st["journal_mode"], "rollback", "[{}] gen {n}", c.name);
        }
        // Whole transactions: each writer's rows are 1..=k, none missing.
        for l in lines {
            let v: Vec<u64> = l.split('|').map(|x| x.parse().unwrap()).collect();
            assert_eq!(v[1], v[2], "[{}] gen {n}: writer {} rows {l}", c.name, v[0]);
        }
        // The drill recomputes the checksum from the restored files.
        let d = c.json(&["drill", &format!("{ws}@{n}")]);
        assert_eq!(d["ok"], true, "[{}] drill of gen {n}: {d}", c.name);
        assert_eq!(d["recorded"][0]["path"], "app.db");
        std::fs::remove_dir_all(&restored).unwrap();
        checked += 1;
    }
    assert!(checked >= 4, "[{}] {mode}: {checked} generations", c.name);
    if mode == "WAL" {
        assert!(with_frames >= 2, "[{}] {with_frames} with frames", c.name);
    }
}

#[test]
fn every_generation_records_what_sqlite_recovers_wal() {
    for c in Case::all() {
        workload(&c, "WAL");
    }
}

#[test]
fn every_generation_records_what_sqlite_recovers_rollback() {
    for c in Case::all() {
        workload(&c, "DELETE");
    }
}

/// The recorded state of `app.db` in the newest generation.
fn latest_state(c: &Case, ws: &str) -> serde_json::Value {
    generations(c, ws).last().unwrap()["sqlite"]["app.db"].clone()
}

#[test]
fn damaged_committed_frames_are_reported_a_torn_tail_is_not() {
    for c in Case::all() {
        let ws = "dmg";
        let m = c.mount_rw(ws, "m-dmg", &["commit_interval_ms=600000"]);
        let db = m.path("app.db");
        // A writer that stays open: the last connection to close would checkpoint the WAL
        // away.
        let mut holder = hold(
            &db,
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(v); \
             INSERT INTO t VALUES (randomblob(3000)); INSERT INTO t VALUES (randomblob(3000)); \
             INSERT INTO t VALUES (randomblob(3000));",
        );
        m.sync();
        let first = latest_state(&c, ws);
        let committed = first["wal"]["last_commit"].as_u64().unwrap();
        assert!(committed >= 3, "[{}] {first}", c.name);
        let wal_path = m.path("app.db-wal");
        let wal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&wal_path)
            .unwrap();
        let len = wal.metadata().unwrap().len();
        let frame = 24 + first["page_size"].as_u64().unwrap();

        // A torn tail: half a frame after the last commit. Not damage.
        wal.write_all_at(&vec![0x5a; frame as usize / 2], len)
            .unwrap();
        m.sync();
        let torn = latest_state(&c, ws);
        assert!(torn["corruption"].is_null(), "[{}] {torn}", c.name);
        assert_eq!(torn["wal"]["last_commit"].as_u64(), Some(committed));

        // One byte flipped in the page of the second frame, committed in the generation
        // before: reported in the record and in status.
        let at = 32 + frame + 24 + 100;
        let mut b = [0u8; 1];
        wal.read_exact_at(&mut b, at).unwrap();
        wal.write_all_at(&[b[0] ^ 0x10], at).unwrap();
        drop(wal);
        m.sync();
        let hit = latest_state(&c, ws);
        let why = hit["corruption"].as_str().unwrap_or_default();
        assert!(
            why.contains("frame 2 is no longer valid"),
            "[{}] {hit}",
            c.name
        );
        assert!(hit["wal"]["last_commit"].as_u64().unwrap() < committed);
        let st = m.status();
        assert_eq!(st["sqlite"]["wal_damage"], 1, "[{}] {st}", c.name);
        let long = c.ok(&["log", ws, "-l", "-n", "1"]);
        assert!(long.contains("WAL DAMAGE"), "[{}] {long}", c.name);
        // Reported once: the next generation starts from what this one recorded.
        std::fs::write(m.path("other"), b"x").unwrap();
        m.sync();
        assert!(latest_state(&c, ws)["corruption"].is_null());
        assert_eq!(m.status()["sqlite"]["wal_damage"], 1);
        holder.kill().unwrap();
        holder.wait().unwrap();
        m.umount();
    }
}

/// A rollback-journal transaction still open at the cut (its changed pages already in the
/// database file, the journal hot): the generation records the rolled-back state, and the
/// drill restores it, saying so.
#[test]
fn a_hot_journal_is_recorded_rolled_back() {
    let c = Case::file();
    let ws = "hot";
    let m = c.mount_rw(ws, "m-hot", &["commit_interval_ms=600000"]);
    let db = m.path("app.db");
    sqlite3(
        &db,
        "CREATE TABLE t(v); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n \
         WHERE i < 300) INSERT INTO t SELECT randomblob(500) FROM n;",
    );
    let mut p = hold(
        &db,
        "PRAGMA cache_size=2; BEGIN; UPDATE t SET v = randomblob(600); \
         INSERT INTO t SELECT randomblob(700) FROM t",
    );
    m.sync();
    drop(p.stdin.take());
    p.wait().unwrap();
    let st = latest_state(&c, ws);
    assert_eq!(st["hot_journal"], true, "{st}");
    let n = generations(&c, ws).last().unwrap()["number"]
        .as_u64()
        .unwrap();
    let d = c.json(&["drill", &format!("{ws}@{n}")]);
    assert_eq!(d["ok"], true, "{d}");
    assert_eq!(d["recorded"][0]["rolled_back"], true, "{d}");
    let text = c.ok(&["drill", &format!("{ws}@{n}")]);
    assert!(text.contains("rolled back the hot journal"), "{text}");
    let r = c.restore(&format!("{ws}@{n}"), "r-hot");
    assert_eq!(
        sqlite3(&r.join("app.db"), "SELECT count(*) FROM t").trim(),
        "300"
    );
    m.umount();
}
