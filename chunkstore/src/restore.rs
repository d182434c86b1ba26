//! Restoring a tree into a directory, bit-exact: contents (holes kept sparse), modes, owners
//! (when permitted), mtimes, symlinks, hard links, FIFOs and devices, `user.*` xattrs and any
//! name Linux allows. Names are checked before use and nothing is created through a symlink.
//! Data is fetched pack by pack in coalesced ranges, a bounded batch at a time.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

use crate::error::{Error, Result};
use crate::fetch::{fetch_blobs, FetchPlan};
use crate::hash::Hash;
use crate::pack::PackEntry;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::tree::{Entry, Kind};

/// A batch is fetched when it holds this much raw data or this many files.
const BATCH_BYTES: u64 = 64 << 20;
const BATCH_FILES: usize = 256;
/// Blobs of one pack less than 1 MiB apart are fetched with one request; at most
/// 8 MiB x 4 of fetched data is buffered.
const FETCH_PLAN: FetchPlan = FetchPlan {
    coalesce_gap: 1 << 20,
    max_range: 8 << 20,
    in_flight: 4,
};
const MAX_REPORTED_ERRORS: usize = 1000;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// With `keep_going`: every problem met, by path.
    pub errors: Vec<String>,
}

pub struct RestoreOptions<'a> {
    /// Record damage and go on (drills) instead of stopping at the first problem.
    pub keep_going: bool,
    pub progress: &'a Progress,
}

struct PendingFile {
    file: Arc<File>,
    path: PathBuf,
    rel: String,
    entry: Entry,
}

struct Job {
    pack: Hash,
    entry: PackEntry,
    file: usize,
    offset: u64,
}

struct Restorer<'a> {
    repo: &'a Arc<Repo>,
    opts: RestoreOptions<'a>,
    report: RestoreReport,
    files: Vec<PendingFile>,
    jobs: Vec<Job>,
    batch_bytes: u64,
    dirs: Vec<(PathBuf, Entry)>,
    links: HashMap<u64, PathBuf>,
    is_root: bool,
}

pub fn restore_tree(
    repo: &Arc<Repo>,
    root: Hash,
    target: &Path,
    opts: RestoreOptions,
) -> Result<RestoreReport> {
    std::fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
    repo.ensure_index()?;
    let mut r = Restorer {
        repo,
        opts,
        // The target itself is the root directory (counted as snapshot counts it).
        report: RestoreReport {
            dirs: 1,
            ..Default::default()
        },
        files: Vec::new(),
        jobs: Vec::new(),
        batch_bytes: 0,
        dirs: Vec::new(),
        links: HashMap::new(),
        is_root: rustix::process::geteuid().is_root(),
    };
    r.walk(root, target, "")?;
    r.flush()?;
    for (path, entry) in std::mem::take(&mut r.dirs) {
        let rel = path.display().to_string();
        r.check(
            set_meta(&path, &entry, r.is_root).map_err(|e| Error::io(&path, e)),
            &rel,
        )?;
    }
    Ok(r.report)
}

/// Removes whatever is at `path` unless it is a directory (which is reused); never follows
/// a symlink.
fn clear(path: &Path, keep_dir: bool) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && keep_dir => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn ts(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

/// Owner, mode, xattrs, then times (last, since the others change ctime only).
fn set_meta(path: &Path, e: &Entry, is_root: bool) -> std::io::Result<()> {
    let symlink = e.kind == Kind::Symlink;
    let owner = rustix::fs::chownat(
        CWD,
        path,
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    );
    if let Err(err) = owner {
        if is_root {
            return Err(err.into());
        }
    }
    if !symlink {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(e.mode))?;
    }
    for (name, value) in &e.xattrs {
        rustix::fs::lsetxattr(
            path,
            OsStr::from_bytes(name),
            value,
            rustix::fs::XattrFlags::empty(),
        )?;
    }
    let t = ts(e.mtime_ns);
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

impl Restorer<'_> {
    fn check(&mut self, res: Result<()>, rel: &str) -> Result<()> {
        match res {
            Ok(()) => Ok(()),
            Err(e) if self.opts.keep_going => {
                if self.report.errors.len() < MAX_REPORTED_ERRORS {
                    self.report.errors.push(format!("{rel}: {e}"));
                }
                Ok(())
            }
            Err(e) => Err(e.at_path(rel)),
        }
    }

    fn walk(&mut self, tree: Hash, dir: &Path, rel: &str) -> Result<()> {
        let shown = if rel.is_empty() { "/" } else { rel };
        let tree = match self.repo.read_tree(&tree, shown) {
            Ok(t) => t,
            Err(e) => return self.check(Err(e), shown),
        };
        for e in tree.entries {
            let path = dir.join(OsStr::from_bytes(&e.name));
            let rel_child = format!("{rel}/{}", e.name_lossy());
            let res = self.entry(e, &path, &rel_child);
            self.check(res, &rel_child)?;
        }
        Ok(())
    }

    fn entry(&mut self, e: Entry, path: &Path, rel: &str) -> Result<()> {
        let io = |r: std::io::Result<()>| r.map_err(|err| Error::io(path, err));
        match e.kind {
            Kind::Dir => {
                io(clear(path, true))?;
                if let Err(err) = std::fs::create_dir(path) {
                    if err.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(Error::io(path, err));
                    }
                }
                io(std::fs::set_permissions(
                    path,
                    std::fs::Permissions::from_mode(0o700),
                ))?;
                let sub = e.subtree.expect("validated: a directory has a subtree");
                self.walk(sub, path, rel)?;
                self.report.dirs += 1;
                self.dirs.push((path.to_path_buf(), e));
            }
            Kind::File => self.file(e, path, rel)?,
            Kind::Symlink => {
                io(clear(path, false))?;
                io(std::os::unix::fs::symlink(
                    OsStr::from_bytes(&e.target),
                    path,
                ))?;
                io(set_meta(path, &e, self.is_root))?;
            }
            Kind::Fifo | Kind::CharDev | Kind::BlockDev => {
                io(clear(path, false))?;
                let ft = match e.kind {
                    Kind::Fifo => rustix::fs::FileType::Fifo,
                    Kind::CharDev => rustix::fs::FileType::CharacterDevice,
                    _ => rustix::fs::FileType::BlockDevice,
                };
                rustix::fs::mknodat(
                    CWD,
                    path,
                    ft,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    e.rdev,
                )
                .map_err(|err| Error::io(path, err.into()))?;
                io(set_meta(path, &e, self.is_root))?;
            }
        }
        Ok(())
    }

    fn file(&mut self, e: Entry, path: &Path, rel: &str) -> Result<()> {
        let io = |r: std::io::Result<()>| r.map_err(|err| Error::io(path, err));
        io(clear(path, false))?;
        if e.link != 0 {
            if let Some(first) = self.links.get(&e.link) {
                io(std::fs::hard_link(first, path))?;
                return Ok(());
            }
            self.links.insert(e.link, path.to_path_buf());
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_nofollow())
            .open(path)
            .map_err(|err| Error::io(path, err))?;
        // Regions never written stay holes.
        io(file.set_len(e.size))?;
        let chunks = self.repo.chunk_list(&e.content, rel)?;
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        if total != e.size {
            return Err(Error::corrupt(format!(
                "{rel:?}: chunks hold {total} bytes, the entry says {}",
                e.size
            )));
        }
        let idx = self.files.len();
        let mut offset = 0u64;
        for c in &chunks {
            let (pack, entry) = self.repo.locate(&c.hash, &format!("content of {rel:?}"))?;
            self.jobs.push(Job {
                pack,
                entry,
                file: idx,
                offset,
            });
            offset += c.len as u64;
        }
        self.batch_bytes += e.size;
        self.report.files += 1;
        self.report.bytes += e.size;
        self.files.push(PendingFile {
            file: Arc::new(file),
            path: path.to_path_buf(),
            rel: rel.to_string(),
            entry: e,
        });
        if self.batch_bytes >= BATCH_BYTES || self.files.len() >= BATCH_FILES {
            self.flush()?;
        }
        Ok(())
    }

    /// Fetches every job of the batch (coalesced ranges per pack, a bounded number in flight),
    /// verifies each blob, writes it, then sets the files' metadata.
    fn flush(&mut self) -> Result<()> {
        let jobs = std::mem::take(&mut self.jobs);
        let locs: Vec<(Hash, PackEntry)> = jobs.iter().map(|j| (j.pack, j.entry)).collect();
        let repo = self.repo.clone();
        fetch_blobs(&repo, &locs, FETCH_PLAN, |i, raw| {
            let j = &jobs[i];
            let pf = &self.files[j.file];
            let res = raw.and_then(|raw| {
                self.opts.progress.add(0, raw.len() as u64);
                if raw.iter().all(|b| *b == 0) {
                    return Ok(());
                }
                pf.file
                    .write_all_at(&raw, j.offset)
                    .map_err(|e| Error::io(&pf.path, e))
            });
            let rel = pf.rel.clone();
            self.check(res, &rel)
        })?;
        for pf in std::mem::take(&mut self.files) {
            let res =
                set_meta(&pf.path, &pf.entry, self.is_root).map_err(|e| Error::io(&pf.path, e));
            self.opts.progress.add(1, 0);
            drop(pf.file);
            self.check(res, &pf.rel)?;
        }
        self.batch_bytes = 0;
        Ok(())
    }
}

fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}
