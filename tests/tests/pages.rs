//! A database's cost in the store follows the pages its transactions change
//! (docs/decisions/sqlite-pages.md), counted from the objects that appear in the store: real
//! SQLite on a real mount, on `file://` and on S3.

use std::collections::HashSet;

use chunkstore::pack::{read_trailer, BlobKind};
use chunkstore::store::{Listed, Store};
use owfs_tests::{runtime, Case};
use rand::Rng;

const PAGE: u64 = 4096;

/// What a step added to the store: every new object's bytes, and of the new packs' blobs the
/// stored bytes of data chunks and of metadata (trees, nodes).
#[derive(Debug, Default)]
struct Added {
    objects: u64,
    bytes: u64,
    data: u64,
    meta: u64,
}

struct Watch {
    store: Store,
    rt: tokio::runtime::Runtime,
    seen: HashSet<String>,
}

impl Watch {
    fn new(case: &Case) -> Watch {
        let mut w = Watch {
            store: case.store(),
            rt: runtime(),
            seen: HashSet::new(),
        };
        w.seen = w.listed().into_iter().map(|l| l.key).collect();
        w
    }

    fn listed(&self) -> Vec<Listed> {
        let mut listed = Vec::new();
        for prefix in ["packs", "index", "ws"] {
            listed.extend(self.rt.block_on(self.store.list(prefix)).unwrap());
        }
        listed
    }

    /// The objects written since the last call (objects deleted meanwhile, such as index
    /// objects a merge replaced, are not counted).
    fn added(&mut self) -> Added {
        let mut a = Added::default();
        for l in self.listed() {
            if l.key.contains("/lease") || !self.seen.insert(l.key.clone()) {
                continue;
            }
            a.objects += 1;
            a.bytes += l.size;
            // A pack, or a generation record that carries one (docs/decisions/
            // one-request-a-commit.md).
            let entries = if l.key.starts_with("packs/") {
                let pack = self.rt.block_on(self.store.get(&l.key)).unwrap();
                read_trailer(&pack, &l.key).unwrap()
            } else if let Some((ws, n)) = chunkstore::generation::parse_record_key(&l.key) {
                let bytes = self.rt.block_on(self.store.get(&l.key)).unwrap();
                let rec = chunkstore::generation::decode_record(&bytes, &ws, n).unwrap();
                rec.embedded.map(|e| e.to_vec()).unwrap_or_default()
            } else {
                Vec::new()
            };
            for e in entries {
                match e.kind {
                    BlobKind::Data => a.data += e.stored_len as u64,
                    _ => a.meta += e.stored_len as u64,
                }
            }
        }
        a
    }
}

#[test]
fn a_transaction_costs_the_pages_it_changed_and_a_checkpoint_no_page() {
    for case in Case::all() {
        let m = case.mount_rw("pages", "mnt", &[]);
        let db = rusqlite::Connection::open(m.path("app.db")).unwrap();
        db.pragma_update(None, "journal_mode", "wal").unwrap();
        db.pragma_update(None, "synchronous", "normal").unwrap();
        // 256 MiB of rows nothing can compress or deduplicate.
        let rows: i64 = 880_000;
        db.execute_batch(&format!(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
             INSERT INTO t(v) SELECT randomblob(300) FROM n;"
        ))
        .unwrap();
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let size = std::fs::metadata(m.path("app.db")).unwrap().len();
        assert!(size >= 256 << 20, "database of {size} bytes");
        m.sync();
        let mut watch = Watch::new(&case);

        // N single-row updates at random rows, each committed by `owfs sync`: each changes one
        // leaf page, which reaches the store once, as a WAL frame's page.
        let n = 20u64;
        let mut rng = rand::rng();
        let mut total = Added::default();
        for _ in 0..n {
            let id = rng.random_range(1..=rows);
            db.execute("UPDATE t SET v = randomblob(300) WHERE id = ?1", [id])
                .unwrap();
            m.sync();
            let a = watch.added();
            total.bytes += a.bytes;
            total.data += a.data;
        }
        // Bounded metadata per commit, whatever the database's size: trees and nodes, the
        // index object, the generation record; plus, once, a merge of the mount's recent
        // index objects (at most 1,024 entries each, docs/decisions/index-compaction.md).
        let meta = total.bytes - total.data;
        assert!(
            meta <= n * (6 << 10) + (64 << 10),
            "{}: {n} commits added {meta} bytes besides their pages",
            case.name
        );
        assert!(
            total.data >= n * PAGE && total.data <= 2 * n * PAGE,
            "{}: {n} updates added {} bytes of pages, want {n} to {} pages' worth",
            case.name,
            total.data,
            2 * n
        );

        // A TRUNCATE checkpoint copies those pages into the database: the same chunks, so it
        // adds metadata only.
        let (busy, _, moved): (i64, i64, i64) = db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(busy, 0);
        assert_eq!(moved, 0, "TRUNCATE leaves an empty log");
        m.sync();
        let a = watch.added();
        assert_eq!(
            a.data, 0,
            "{}: the checkpoint uploaded pages: {a:?}",
            case.name
        );
        assert!(
            a.meta <= n * 4 * 1024,
            "{}: the checkpoint's metadata: {a:?}",
            case.name
        );

        // What the store holds is the database SQLite sees.
        let want: i64 = db
            .query_row("SELECT sum(length(v)) + count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        drop(db);
        let g = m.umount();
        let out = case.restore(&format!("pages@{g}"), "restored");
        let back = rusqlite::Connection::open(out.join("app.db")).unwrap();
        let got: i64 = back
            .query_row("SELECT sum(length(v)) + count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(got, want);
        let ok: String = back
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
}

#[test]
fn an_append_costs_what_was_appended_and_a_renamed_database_keeps_its_pages() {
    for case in Case::all() {
        let m = case.mount_rw("appends", "mnt", &[]);
        let mut rng = rand::rng();
        let mut log: Vec<u8> = (0..10 << 20).map(|_| rng.random()).collect();
        std::fs::write(m.path("agent.log"), &log).unwrap();
        let db = rusqlite::Connection::open(m.path("new.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE t(v BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
             INSERT INTO t SELECT randomblob(1000) FROM n;",
        )
        .unwrap();
        drop(db);
        m.sync();
        let mut watch = Watch::new(&case);
        for _ in 0..10 {
            let line: Vec<u8> = (0..300).map(|_| rng.random()).collect();
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(m.path("agent.log"))
                .unwrap();
            std::io::Write::write_all(&mut f, &line).unwrap();
            drop(f);
            log.extend_from_slice(&line);
            m.sync();
            let a = watch.added();
            // The appended bytes, and at most the file's short last chunk again.
            assert!(
                a.data <= 4096 + 300 + 64,
                "{}: an append of 300 bytes uploaded {} bytes of data: {a:?}",
                case.name,
                a.data
            );
        }
        // A database renamed into place: no byte changed, no page uploaded.
        std::fs::rename(m.path("new.db"), m.path("app.db")).unwrap();
        m.sync();
        let a = watch.added();
        assert_eq!(a.data, 0, "{}: the rename uploaded data: {a:?}", case.name);
        let g = m.umount();
        let out = case.restore(&format!("appends@{g}"), "restored");
        assert!(std::fs::read(out.join("agent.log")).unwrap() == log);
        let back = rusqlite::Connection::open(out.join("app.db")).unwrap();
        let n: i64 = back
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3000);
    }
}
