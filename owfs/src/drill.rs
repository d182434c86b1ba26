//! Restore drills: a generation restored into a scratch directory with every byte verified,
//! each SQLite database in it checked, the verdict stored beside the workspace (`ws/WS/drill`)
//! for `owfs status` and anyone reading the store. `owfs drill` prints it.

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
    /// Everything that failed, one line each (empty when `ok`).
    pub problems: Vec<String>,
    pub seconds: f64,
    /// When the drill ended (ms since the epoch).
    pub time_ms: u64,
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
    let root = rec.root_hash()?;
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
                match vfs::integrity_check(p) {
                    Ok(v) if v.is_empty() => {}
                    Ok(v) => problems.push(format!("{rel}: integrity_check: {}", v.join("; "))),
                    Err(e) => problems.push(format!("{rel}: {e}")),
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
