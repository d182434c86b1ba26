//! Restore drills: a generation restored into a scratch directory with every byte verified,
//! each SQLite database in it checked, the verdict stored beside the workspace (`ws/WS/drill`)
//! for `owfs status` and anyone reading the store. `owfs drill` prints it.
//!
//! Each database the generation records (docs/SEMANTICS.md) is checked against its restored
//! files twice: read by vfs::db from the files as restored, and again after SQLite itself
//! has opened them (`integrity_check` recovers the WAL, rolls back a hot journal) and
//! closed them (which checkpoints the WAL into the database): page count and checksum
//! must equal the recorded ones both times, and `PRAGMA page_count` too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chunkstore::generation::{self, GenRecord};
use chunkstore::progress::Progress;
use chunkstore::restore::{remove_dir_tree, restore_tree, RestoreOptions};
use chunkstore::Repo;

/// What a drill found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    /// The generation drilled, as `WS@N`.
    pub generation: String,
    pub ok: bool,
    pub files: u64,
    pub bytes: u64,
    /// SQLite databases found and checked.
    pub databases: usize,
    /// The recorded state of each database, checked (by path in the workspace).
    pub recorded: Vec<DbCheck>,
    /// Everything that failed, one line each (empty when `ok`).
    pub problems: Vec<String>,
    pub seconds: f64,
    /// When the drill ended (ms since the epoch).
    pub time_ms: u64,
}

/// A database the generation records, as the drill found it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DbCheck {
    pub path: String,
    pub page_count: u32,
    pub checksum: String,
    /// SQLite rolled a hot journal back on open (the recorded state is the rolled-back one).
    pub rolled_back: bool,
    /// Page count and checksum equal the record's, from the restored files and after SQLite
    /// recovered them.
    pub ok: bool,
}

/// Reads the database at `db` (with its `-wal` and `-journal`) as vfs::db does.
fn read_state(db: &Path) -> std::io::Result<Option<vfs::db::State>> {
    let open = |suffix: &str| -> std::io::Result<Option<(std::fs::File, u64)>> {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::File::open(&p) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    };
    let Some(d) = open("")? else { return Ok(None) };
    let (w, j) = (open("-wal")?, open("-journal")?);
    fn src(o: &(std::fs::File, u64)) -> vfs::db::Source<'_> {
        vfs::db::Source {
            bytes: &o.0,
            len: o.1,
        }
    }
    let files = vfs::db::Files {
        db: src(&d),
        wal: w.as_ref().map(src),
        journal: j.as_ref().map(src),
    };
    Ok(vfs::db::open(files)?.map(|t| t.state().clone()))
}

/// Checks one recorded state against the restored database `db`; runs `integrity_check`.
fn check_recorded(
    db: &Path,
    path: &str,
    want: &chunkstore::generation::DbState,
    problems: &mut Vec<String>,
) -> DbCheck {
    let mut check = DbCheck {
        path: path.to_string(),
        page_count: 0,
        checksum: String::new(),
        rolled_back: want.hot_journal,
        ok: false,
    };
    let before = problems.len();
    let compare = |problems: &mut Vec<String>,
                   when: &str,
                   got: std::io::Result<Option<vfs::db::State>>| match got {
        Ok(Some(s)) => {
            let sum = format!("{:016x}", s.checksum);
            if s.page_count != want.page_count || sum != want.checksum {
                problems.push(format!(
                    "{path}: {when}: {} pages, checksum {sum}; the generation records {} \
                     pages, checksum {}",
                    s.page_count, want.page_count, want.checksum
                ));
            }
            (s.page_count, sum)
        }
        Ok(None) => {
            problems.push(format!(
                "{path}: {when}: no SQLite database, the generation records one"
            ));
            (0, String::new())
        }
        Err(e) => {
            problems.push(format!("{path}: {when}: {e}"));
            (0, String::new())
        }
    };
    compare(problems, "as restored", read_state(db));
    match vfs::integrity_check(db) {
        Ok(v) if v.is_empty() => {}
        Ok(v) => problems.push(format!("{path}: integrity_check: {}", v.join("; "))),
        Err(e) => problems.push(format!("{path}: {e}")),
    }
    match vfs::page_count(db) {
        Ok(n) if n == want.page_count => {}
        Ok(n) => problems.push(format!(
            "{path}: PRAGMA page_count is {n}; the generation records {}",
            want.page_count
        )),
        Err(e) => problems.push(format!("{path}: PRAGMA page_count: {e}")),
    }
    // SQLite has recovered it and, closing it, checkpointed its WAL into the database file.
    let (count, sum) = compare(problems, "once SQLite recovered it", read_state(db));
    check.page_count = count;
    check.checksum = sum;
    check.ok = problems.len() == before;
    check
}

/// Drills `rec` in a scratch directory under `scratch` (default: the system's temporary
/// directory), removed afterwards; `progress` counts what is restored. Problems are the
/// verdict's, not errors: a drill that finds damage has done its job. Errs only for a record
/// with no usable root.
pub fn drill(
    repo: &Arc<Repo>,
    rec: &GenRecord,
    scratch: Option<&Path>,
    progress: &Arc<Progress>,
) -> chunkstore::Result<Verdict> {
    let root = repo.root_of(rec)?;
    let t0 = Instant::now();
    let parent = scratch
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!(
        "owfs-drill-{}-{}",
        rec.spec().replace('@', "-"),
        std::process::id()
    ));
    let mut db_dir = dir.clone().into_os_string();
    db_dir.push(".databases");
    let db_dir = PathBuf::from(db_dir);
    let _ = remove_dir_tree(&dir);
    let _ = remove_dir_tree(&db_dir);
    progress
        .total_bytes
        .store(rec.bytes, std::sync::atomic::Ordering::Relaxed);
    let mut problems: Vec<String> = Vec::new();
    let mut databases = Vec::new();
    let mut recorded = Vec::new();
    let restored = restore_tree(
        repo,
        root,
        &dir,
        RestoreOptions {
            keep_going: true,
            progress,
        },
    );
    let report = match restored {
        Ok(r) => {
            problems.extend(r.errors.iter().cloned());
            match collect_databases(&dir, &db_dir) {
                Ok((found, unchecked)) => {
                    databases = found;
                    problems.extend(unchecked);
                }
                Err(e) => problems.push(format!("looking for SQLite databases: {e}")),
            }
            for (p, rel) in &databases {
                let path = rel.trim_start_matches('/');
                if let Some(want) = rec.sqlite.get(path) {
                    recorded.push(check_recorded(p, path, want, &mut problems));
                    continue;
                }
                match vfs::integrity_check(p) {
                    Ok(v) if v.is_empty() => {}
                    Ok(v) => problems.push(format!("{rel}: integrity_check: {}", v.join("; "))),
                    Err(e) => problems.push(format!("{rel}: {e}")),
                }
            }
            for path in rec.sqlite.keys() {
                if !databases
                    .iter()
                    .any(|(_, rel)| rel.trim_start_matches('/') == path)
                {
                    problems.push(format!(
                        "{path}: the generation records a database there; the restore has none"
                    ));
                }
            }
            r
        }
        Err(e) => {
            problems.push(e.to_string());
            Default::default()
        }
    };
    for d in [&dir, &db_dir] {
        if let Err(e) = remove_dir_tree(d) {
            eprintln!(
                "owfs: drill: cannot remove its scratch directory {}: {e}",
                d.display()
            );
        }
    }
    let verdict = Verdict {
        generation: rec.spec(),
        ok: problems.is_empty(),
        files: report.files,
        bytes: report.bytes,
        databases: databases.len(),
        recorded,
        problems,
        seconds: t0.elapsed().as_secs_f64(),
        time_ms: generation::now_ms(),
    };
    // The last drill is visible to `owfs status` and to anyone reading the store.
    let key = format!("ws/{}/drill", rec.workspace);
    let _ = repo.block_on(repo.store.put(
        &key,
        serde_json::to_vec_pretty(&verdict).expect("json").into(),
    ));
    Ok(verdict)
}

/// Databases found (a short path, the path relative to the restore) and problems met.
type Databases = (Vec<(PathBuf, String)>, Vec<String>);

/// The SQLite databases (by header) restored under `dir`, moved with their `-wal` and
/// `-journal` into `db_dir` so that each opens by a short path whatever its depth. A
/// database that cannot be moved is a problem of the drill, said and skipped.
fn collect_databases(dir: &Path, db_dir: &Path) -> std::io::Result<Databases> {
    std::fs::create_dir_all(db_dir)?;
    let to = rustix::fs::open(
        db_dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    chunkstore::snapshot::for_each_file(dir, |at, name, rel| {
        let mut head = [0u8; 16];
        let Ok(f) = rustix::fs::openat(
            at,
            name,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW,
            rustix::fs::Mode::empty(),
        ) else {
            return Ok(());
        };
        if rustix::io::read(&f, &mut head).ok() != Some(16) || !vfs::is_database_header(&head) {
            return Ok(());
        }
        let n = out.len();
        let short = format!("{n}.db");
        if let Err(e) = rustix::fs::renameat(at, name, &to, short.as_str()) {
            problems.push(format!(
                "{rel}: a SQLite database the drill cannot check: {e}"
            ));
            return Ok(());
        }
        for suffix in ["-wal", "-journal"] {
            let mut companion = name.to_vec();
            companion.extend_from_slice(suffix.as_bytes());
            let _ =
                rustix::fs::renameat(at, &companion[..], &to, format!("{short}{suffix}").as_str());
        }
        out.push((db_dir.join(short), rel.to_string()));
        Ok(())
    })?;
    Ok((out, problems))
}
