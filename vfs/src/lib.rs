//! SQLite awareness: recognising database files by their header, checking restored copies
//! with `PRAGMA integrity_check` (drills), reading a WAL as SQLite's recovery reads it
//! (`wal`), and a database's state and checksum as SQLite would open it from a set of files
//! (`db`: what each generation records, docs/SEMANTICS.md). The crate is named for what it is about to hold, the read-only SQLite VFS over
//! generations (docs/DESIGN.md §6), which does not exist yet.

pub mod db;
pub mod wal;

use std::io::Read;
use std::path::Path;

pub const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot open as SQLite: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: integrity_check could not run: {source}")]
    Check {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
}

/// Whether `head`, a file's first 16 bytes, is SQLite's database header (companions
/// `-wal`, `-journal` and `-shm` have none).
pub fn is_database_header(head: &[u8; 16]) -> bool {
    head == SQLITE_HEADER
}

/// Whether `path` starts with the SQLite database header.
pub fn is_database(path: &Path) -> bool {
    let mut head = [0u8; 16];
    match std::fs::File::open(path) {
        Ok(mut f) => f.read_exact(&mut head).is_ok() && is_database_header(&head),
        Err(_) => false,
    }
}

/// Runs `PRAGMA integrity_check` on a database restored for a drill; returns the problems found
/// (empty: "ok"). Opens it read-write, as any program would, so that SQLite first recovers it
/// (rolls back a hot journal, reads the WAL up to its last commit): the check sees what a
/// program restarting on this copy would see, and may change the copy while doing so. Never
/// call it on a live database that programs use.
pub fn integrity_check(path: &Path) -> Result<Vec<String>, Error> {
    let shown = path.display().to_string();
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| Error::Open {
        path: shown.clone(),
        source,
    })?;
    let mut stmt = conn
        .prepare("PRAGMA integrity_check")
        .map_err(|source| Error::Check {
            path: shown.clone(),
            source,
        })?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|source| Error::Check {
            path: shown.clone(),
            source,
        })?;
    Ok(rows.into_iter().filter(|r| r != "ok").collect())
}

/// `PRAGMA page_count` of the database at `path`, opened read-write as [`integrity_check`]
/// opens it (same caveats).
pub fn page_count(path: &Path) -> Result<u32, Error> {
    let shown = path.display().to_string();
    let conn = rusqlite::Connection::open(path).map_err(|source| Error::Open {
        path: shown.clone(),
        source,
    })?;
    conn.query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(|source| Error::Check {
            path: shown,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_checks_a_database() {
        let dir = std::env::temp_dir().join(format!("owfs-vfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("a.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1),(2);")
            .unwrap();
        drop(conn);
        assert!(is_database(&db));
        assert!(integrity_check(&db).unwrap().is_empty());
        let txt = dir.join("b.txt");
        std::fs::write(&txt, b"hello").unwrap();
        assert!(!is_database(&txt));
        // Damage a b-tree page: the check must report it.
        let mut bytes = std::fs::read(&db).unwrap();
        let page = 4096;
        for b in &mut bytes[page + 8..page + 64] {
            *b = 0xff;
        }
        std::fs::write(&db, &bytes).unwrap();
        let bad = integrity_check(&db);
        assert!(bad.map(|v| !v.is_empty()).unwrap_or(true));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
