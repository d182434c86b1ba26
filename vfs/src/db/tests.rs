//! Checked against SQLite itself: what `open` says a set of files holds equals what SQLite
//! opens from a copy of them (page count; the checksum of the database file after SQLite
//! has recovered it and checkpointed), and `Tracked::update` from the changed pages always
//! equals `open` from scratch.

use super::*;
use crate::wal::Stop;
use std::path::Path;

fn files_of<'a>(
    db: &'a Vec<u8>,
    wal: Option<&'a Vec<u8>>,
    journal: Option<&'a Vec<u8>>,
) -> Files<'a> {
    let src = |b: &'a Vec<u8>| Source {
        bytes: b,
        len: b.len() as u64,
    };
    Files {
        db: src(db),
        wal: wal.map(src),
        journal: journal.map(src),
    }
}

/// The files of `db` as they are now (a cut of them: no process's lock goes with them).
#[derive(Clone)]
struct Snap {
    db: Vec<u8>,
    wal: Option<Vec<u8>>,
    journal: Option<Vec<u8>>,
}

fn snap(db: &Path) -> Snap {
    let read = |suffix: &str| {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        std::fs::read(p).ok()
    };
    Snap {
        db: std::fs::read(db).unwrap(),
        wal: read("-wal"),
        journal: read("-journal"),
    }
}

impl Snap {
    fn files(&self) -> Files<'_> {
        files_of(&self.db, self.wal.as_ref(), self.journal.as_ref())
    }

    /// What SQLite opens from a copy of these files: its page count, and the checksum of
    /// its database file once recovered and checkpointed into it.
    fn sqlite_sees(&self) -> (u32, u64) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.db");
        std::fs::write(&p, &self.db).unwrap();
        if let Some(w) = &self.wal {
            std::fs::write(dir.path().join("c.db-wal"), w).unwrap();
        }
        if let Some(j) = &self.journal {
            std::fs::write(dir.path().join("c.db-journal"), j).unwrap();
        }
        let c = rusqlite::Connection::open(&p).unwrap();
        let count: u32 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        if mode == "wal" {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        drop(c);
        let bytes = std::fs::read(&p).unwrap();
        let ps = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
        let ps = if ps == 1 { 65536 } else { ps };
        let mut sum = 0;
        for n in 1..=count as usize {
            let mut page = vec![0u8; ps];
            let have = &bytes[((n - 1) * ps).min(bytes.len())..(n * ps).min(bytes.len())];
            page[..have.len()].copy_from_slice(have);
            sum ^= page_crc(n as u32, &page);
        }
        (count, sum)
    }
}

/// Byte ranges where `new` differs from `old` (by 512-byte blocks), and its growth.
fn diff(old: Option<&[u8]>, new: Option<&[u8]>) -> Change {
    let (old, new) = (old.unwrap_or(&[]), new.unwrap_or(&[]));
    if old == new {
        return Change::None;
    }
    let mut r = Vec::new();
    let mut at = 0;
    while at < new.len() {
        let end = (at + 512).min(new.len());
        if old.get(at..end) != Some(&new[at..end]) {
            r.push(at as u64..end as u64);
        }
        at = end;
    }
    Change::Ranges(r)
}

fn check(s: &Snap) -> Tracked {
    let t = open(s.files()).unwrap().expect("a database");
    let (count, sum) = s.sqlite_sees();
    assert_eq!(t.state().page_count, count, "page count");
    assert_eq!(t.state().checksum, sum, "checksum");
    t
}

/// Follows a database through cuts taken while `work` runs a step at a time: at every cut
/// the tracked state equals both `open` from scratch and what SQLite opens.
fn follow(db: &Path, steps: usize, mut work: impl FnMut(usize)) -> Vec<State> {
    work(0);
    let mut prev = snap(db);
    let mut t = check(&prev);
    let mut states = vec![t.state().clone()];
    for i in 1..steps {
        work(i);
        let s = snap(db);
        let changes = Changes {
            db: diff(Some(&prev.db), Some(&s.db)),
            wal: diff(prev.wal.as_deref(), s.wal.as_deref()),
            journal: diff(prev.journal.as_deref(), s.journal.as_deref()),
        };
        assert!(t.update(s.files(), &changes).unwrap(), "still a database");
        let fresh = check(&s);
        assert_eq!(
            t.state(),
            fresh.state(),
            "step {i}: incremental = from scratch"
        );
        states.push(t.state().clone());
        prev = s;
    }
    states
}

#[test]
fn a_wal_database_through_commits_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; \
         CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);",
    )
    .unwrap();
    let states = follow(&db, 24, |i| {
        for j in 0..(i * 7 % 30) {
            c.execute(
                "INSERT INTO t(v) VALUES (?1)",
                [format!("{i}-{j}-{}", "x".repeat(j * 53 % 900))],
            )
            .unwrap();
        }
        c.execute("DELETE FROM t WHERE k % 11 = ?1", [i as i64 % 11])
            .unwrap();
        if i % 5 == 4 {
            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .unwrap();
        }
        if i % 9 == 8 {
            // The log restarts: new salts, frames overwritten from the start.
            c.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                .unwrap();
        }
    });
    assert!(states.iter().all(|s| s.mode == Mode::Wal));
    let salts: HashSet<_> = states
        .iter()
        .filter_map(|s| s.wal.as_ref().map(|w| w.header.salt1))
        .collect();
    assert!(salts.len() > 1, "the log restarted during the test");
}

#[test]
fn a_rollback_database_with_hot_journals() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=PERSIST; PRAGMA cache_size=2; \
         CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);",
    )
    .unwrap();
    let mut hot = 0;
    let states = follow(&db, 16, |i| {
        if i % 3 == 2 {
            // Left open: with a tiny cache SQLite spills changed pages into the database
            // file before the commit; the journal is hot.
            let _ = c.execute("COMMIT", []);
            c.execute("BEGIN", []).unwrap();
            for j in 0..200 {
                c.execute(
                    "INSERT INTO t(v) VALUES (?1)",
                    [format!("{i}-{j}-{}", "y".repeat(300))],
                )
                .unwrap();
            }
            c.execute("UPDATE t SET v = v || 'z' WHERE k % 3 = 0", [])
                .unwrap();
        } else {
            let _ = c.execute("COMMIT", []);
            c.execute(
                "INSERT INTO t(v) VALUES (?1)",
                [format!("{i}-{}", "w".repeat(i * 100))],
            )
            .unwrap();
        }
    });
    for s in &states {
        assert_eq!(s.mode, Mode::Rollback);
        hot += s.hot_journal as usize;
    }
    assert!(hot >= 3, "hot journals seen: {hot}");
}

#[test]
fn a_cut_inside_a_transaction_records_the_commit_before() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(v);
         INSERT INTO t VALUES (randomblob(3000));",
    )
    .unwrap();
    let before = snap(&db);
    c.execute(
        "INSERT INTO t SELECT randomblob(3000) FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL \
         SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6)",
        [],
    )
    .unwrap();
    let mut s = snap(&db);
    // Cut the log three frames and a bit into the last transaction.
    let w = s.wal.as_mut().unwrap();
    let frame = 24 + 4096;
    w.truncate(before.wal.as_ref().unwrap().len() + 3 * frame + 10);
    let t = check(&s);
    let wal = t.state().wal.clone().unwrap();
    let old = before.wal.unwrap();
    let whole = wal::scan(&old[..], old.len() as u64)
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        wal.last_commit, whole.last_commit,
        "the commit before the cut"
    );
    assert_eq!(wal.valid_frames, whole.valid_frames + 3, "a torn tail");
    assert_eq!(wal.stop, Stop::End);
}

#[test]
fn what_is_no_database_is_none() {
    assert!(open(files_of(&Vec::new(), None, None)).unwrap().is_none());
    assert!(open(files_of(&vec![7u8; 4096], None, None))
        .unwrap()
        .is_none());
}
