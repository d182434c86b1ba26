//! Legal but extreme trees round-trip through a generation (issue: "legal but extreme workloads
//! never take the daemon down"): a directory 10,000 levels deep (a path of 20,000 bytes, five
//! times PATH_MAX) and a directory of 100,000 entries. Both run on the test thread's own
//! 2 MiB stack: neither the snapshot nor the restore may recurse per level, use a full path,
//! or hold a descriptor per level (the deep test lowers RLIMIT_NOFILE to 1024 first).
//!
//! The trees are built and compared fd-relatively and iteratively too: std's path-based calls
//! fail with ENAMETOOLONG on them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chunkstore::progress::Progress;
use chunkstore::restore::{restore_tree, RestoreOptions, RestoreReport};
use chunkstore::{Repo, Store};
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags, CWD};

const DEPTH: usize = 10_000;
/// Where the two names of the hard link live (directories at these depths).
const LINK_A: usize = 5_000;
const LINK_B: usize = DEPTH - 1;
const WIDE: usize = 100_000;

fn open_dir(dir: BorrowedFd, name: impl rustix::path::Arg) -> OwnedFd {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

fn open_path(p: &Path) -> OwnedFd {
    rustix::fs::openat(
        CWD,
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

fn create(dir: BorrowedFd, name: &str, data: &[u8], mode: u32) {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .unwrap();
    File::from(fd).write_all(data).unwrap();
    rustix::fs::chmodat(dir, name, Mode::from_raw_mode(mode), AtFlags::empty()).unwrap();
}

fn set_mtime(dir: BorrowedFd, name: &str, sec: i64, nsec: i64) {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// `root/d/d/…/d` with DEPTH directories named `d`; a hard-linked `h` in the directories at
/// depths LINK_A and LINK_B; at the bottom a file with a mode, an mtime and a `user.*` xattr,
/// a symlink, a FIFO; the bottom directory has an xattr and a mode of its own and its parent
/// is read-only.
fn build_deep(root: &Path) {
    std::fs::create_dir(root).unwrap();
    let mut cur = open_path(root);
    let mut link_dir: Option<OwnedFd> = None;
    for depth in 1..=DEPTH {
        rustix::fs::mkdirat(&cur, "d", Mode::from_raw_mode(0o755)).unwrap();
        cur = open_dir(cur.as_fd(), "d");
        if depth == LINK_A {
            create(cur.as_fd(), "h", b"linked\n", 0o644);
            link_dir = Some(open_dir(cur.as_fd(), "."));
        }
        if depth == LINK_B {
            let a = link_dir.take().unwrap();
            rustix::fs::linkat(&a, "h", &cur, "h", AtFlags::empty()).unwrap();
        }
    }
    // The bottom (depth DEPTH).
    create(cur.as_fd(), "f", b"bottom of the tree\n", 0o640);
    let f = rustix::fs::openat(&cur, "f", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    rustix::fs::fsetxattr(&f, "user.k", b"deep value", XattrFlags::empty()).unwrap();
    drop(f);
    rustix::fs::symlinkat("f", &cur, "s").unwrap();
    rustix::fs::mknodat(&cur, "p", FileType::Fifo, Mode::from_raw_mode(0o604), 0).unwrap();
    rustix::fs::chmodat(&cur, "p", Mode::from_raw_mode(0o604), AtFlags::empty()).unwrap();
    rustix::fs::fsetxattr(&cur, "user.dir", b"bottom", XattrFlags::empty()).unwrap();
    set_mtime(cur.as_fd(), "f", 1_000_000_000, 123_456_789);
    set_mtime(cur.as_fd(), "s", 1_100_000_000, 1);
    set_mtime(cur.as_fd(), "p", 1_200_000_000, 999_999_999);
    rustix::fs::fchmod(&cur, Mode::from_raw_mode(0o751)).unwrap();
    set_mtime(cur.as_fd(), ".", 1_300_000_000, 5);
    // Its parent (depth DEPTH - 1): read-only, an mtime of its own.
    let parent = open_dir(cur.as_fd(), "..");
    rustix::fs::fchmod(&parent, Mode::from_raw_mode(0o555)).unwrap();
    set_mtime(parent.as_fd(), ".", 1_400_000_000, 7);
    drop((cur, parent));
    // The directory below LINK_A denies search to its owner: a restore sets that mode last,
    // since the hard link's second name is reached through it. (Like the end-to-end tests,
    // this test runs as root, which can still walk it.)
    let mut cur = open_path(root);
    for _ in 0..=LINK_A {
        cur = open_dir(cur.as_fd(), "d");
    }
    rustix::fs::fchmod(&cur, Mode::from_raw_mode(0o600)).unwrap();
}

/// What a restore must keep of one entry; a tree is the list of these in sorted depth-first
/// order (which determines it).
#[derive(Debug, PartialEq, Eq)]
struct Rec {
    depth: usize,
    name: Vec<u8>,
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    nlink: u64,
    data: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Hard-link group, numbered by first appearance.
    group: Option<usize>,
}

fn sorted_names(dir: BorrowedFd) -> std::vec::IntoIter<Vec<u8>> {
    let mut d = Dir::read_from(dir).unwrap();
    let mut names = Vec::new();
    while let Some(e) = d.read() {
        let n = e.unwrap().file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    names.sort();
    names.into_iter()
}

fn proc_path(dir: BorrowedFd, name: &[u8]) -> PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(OsStr::from_bytes(&p))
}

fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut list = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut list[..]).unwrap();
    let mut out = Vec::new();
    for name in list[..n]
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let mut v = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut v[..]).unwrap();
        v.truncate(len);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// The tree under `root`, walked with one open directory at a time (up again with `..`).
fn scan(root: &Path) -> Vec<Rec> {
    let mut cur = open_path(root);
    let mut stack = vec![sorted_names(cur.as_fd())];
    let mut groups: HashMap<(u64, u64), usize> = HashMap::new();
    let mut out = Vec::new();
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.next() else {
            stack.pop();
            if !stack.is_empty() {
                cur = open_dir(cur.as_fd(), "..");
            }
            continue;
        };
        let st = rustix::fs::statat(&cur, &name[..], AtFlags::SYMLINK_NOFOLLOW).unwrap();
        let ft = FileType::from_raw_mode(st.st_mode);
        let mut data = Vec::new();
        let kind = match ft {
            FileType::Directory => "dir",
            FileType::RegularFile if st.st_size == 0 => "file",
            FileType::RegularFile => {
                let f = rustix::fs::openat(
                    &cur,
                    &name[..],
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .unwrap();
                File::from(f).read_to_end(&mut data).unwrap();
                "file"
            }
            FileType::Symlink => {
                data = rustix::fs::readlinkat(&cur, &name[..], Vec::new())
                    .unwrap()
                    .into_bytes();
                "symlink"
            }
            FileType::Fifo => "fifo",
            other => panic!("unexpected {other:?}"),
        };
        let group = (kind == "file" && st.st_nlink > 1).then(|| {
            let n = groups.len();
            *groups.entry((st.st_dev, st.st_ino)).or_insert(n)
        });
        let rec = Rec {
            depth: stack.len(),
            xattrs: xattrs(&proc_path(cur.as_fd(), &name)),
            name,
            kind,
            mode: if kind == "symlink" {
                0
            } else {
                st.st_mode & 0o7777
            },
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
            nlink: if kind == "dir" { 0 } else { st.st_nlink },
            data,
            group,
        };
        if kind == "dir" {
            cur = open_dir(cur.as_fd(), &rec.name[..]);
            stack.push(sorted_names(cur.as_fd()));
        }
        out.push(rec);
    }
    out
}

fn assert_same(a: &[Rec], b: &[Rec]) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x, y, "entry #{i} (depth {}) differs", x.depth);
    }
    assert_eq!(a.len(), b.len(), "different numbers of entries");
}

struct Env {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    _rt: tokio::runtime::Runtime,
    repo: Arc<Repo>,
}

/// A scratch directory for the test's trees and store: in `/dev/shm` with `in_memory` when
/// that is a writable directory (100,000 file creations cost minutes of a busy disk's
/// journal, and the point is the walk, not the disk), else the usual temporary directory.
fn env(in_memory: bool) -> Env {
    let shm = Path::new("/dev/shm");
    let tmp = match in_memory && rustix::fs::access(shm, rustix::fs::Access::WRITE_OK).is_ok() {
        true => tempfile::tempdir_in(shm).unwrap(),
        false => tempfile::tempdir().unwrap(),
    };
    let base = tmp.path().to_path_buf();
    std::fs::create_dir(base.join("store")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Store::open(&format!("file://{}", base.join("store").display())).unwrap();
    let repo = Repo::open(store, rt.handle().clone(), true).unwrap();
    Env {
        _tmp: tmp,
        base,
        _rt: rt,
        repo,
    }
}

fn restore(repo: &Arc<Repo>, root: chunkstore::Hash, out: &Path) -> RestoreReport {
    let progress = Progress::default();
    restore_tree(
        repo,
        root,
        out,
        RestoreOptions {
            keep_going: false,
            progress: &progress,
        },
    )
    .unwrap()
}

#[test]
fn ten_thousand_levels_round_trip() {
    // Bounded descriptors: a walk holding one per level would run out here.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let soft = lim.maximum.map_or(1024, |m| m.min(1024));
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(soft),
            maximum: lim.maximum,
        },
    )
    .unwrap();

    let e = env(false);
    let src = e.base.join("src");
    let t = Instant::now();
    build_deep(&src);
    let before = scan(&src);
    eprintln!("built and scanned {DEPTH} levels in {:?}", t.elapsed());

    let t = Instant::now();
    let done = chunkstore::publish::snapshot(&e.repo, &src, "deep", &Progress::default()).unwrap();
    eprintln!("snapshot in {:?}", t.elapsed());
    assert_eq!(done.tree.dirs, DEPTH as u64 + 1);
    assert_eq!(done.tree.files, 3, "f and both names of h");
    assert_eq!(done.tree.symlinks, 1);
    assert_eq!(done.tree.others, 1);

    let out = e.base.join("out");
    let t = Instant::now();
    let report = restore(&e.repo, done.generation.root_hash().unwrap(), &out);
    eprintln!("restore in {:?}", t.elapsed());
    assert_eq!(report.dirs, DEPTH as u64 + 1);
    assert_eq!(report.files, 2, "f and h (its second name is a link)");
    assert!(report.errors.is_empty());

    let t = Instant::now();
    let after = scan(&out);
    eprintln!("scanned the restore in {:?}", t.elapsed());
    assert_same(&before, &after);

    // What the comparison covered, spelled out.
    let dirs = after.iter().filter(|r| r.kind == "dir").count();
    assert_eq!(dirs, DEPTH);
    assert_eq!(after.iter().map(|r| r.depth).max(), Some(DEPTH + 1));
    let at = |depth: usize, name: &[u8]| {
        after
            .iter()
            .find(|r| r.depth == depth && r.name == name)
            .unwrap_or_else(|| panic!("no {:?} at depth {depth}", OsStr::from_bytes(name)))
    };
    let f = at(DEPTH + 1, b"f");
    assert_eq!(f.data, b"bottom of the tree\n");
    assert_eq!(f.mode, 0o640);
    assert_eq!(f.mtime_ns, 1_000_000_000_123_456_789);
    assert_eq!(f.xattrs, vec![(b"user.k".to_vec(), b"deep value".to_vec())]);
    let s = at(DEPTH + 1, b"s");
    assert_eq!((s.kind, &s.data[..]), ("symlink", &b"f"[..]));
    assert_eq!(s.mtime_ns, 1_100_000_000_000_000_001);
    let p = at(DEPTH + 1, b"p");
    assert_eq!(
        (p.kind, p.mode, p.mtime_ns),
        ("fifo", 0o604, 1_200_000_000_999_999_999)
    );
    let bottom = at(DEPTH, b"d");
    assert_eq!(
        (bottom.mode, bottom.mtime_ns),
        (0o751, 1_300_000_000_000_000_005)
    );
    assert_eq!(
        bottom.xattrs,
        vec![(b"user.dir".to_vec(), b"bottom".to_vec())]
    );
    let ro = at(DEPTH - 1, b"d");
    assert_eq!((ro.mode, ro.mtime_ns), (0o555, 1_400_000_000_000_000_007));
    let (ha, hb) = (at(LINK_A + 1, b"h"), at(LINK_B + 1, b"h"));
    assert_eq!((ha.nlink, hb.nlink), (2, 2));
    assert!(ha.group.is_some() && ha.group == hb.group, "one inode");
    assert_eq!(ha.data, b"linked\n");
    assert_eq!(at(LINK_A + 1, b"d").mode, 0o600);

    // Restoring over it (as `restore --force` does) a generation where `d` is a file removes
    // the whole 10,000-level directory first.
    let flat = e.base.join("flat");
    std::fs::create_dir(&flat).unwrap();
    create(open_path(&flat).as_fd(), "d", b"flat\n", 0o644);
    let done = chunkstore::publish::snapshot(&e.repo, &flat, "flat", &Progress::default()).unwrap();
    let t = Instant::now();
    let report = restore(&e.repo, done.generation.root_hash().unwrap(), &out);
    eprintln!("restore over the deep tree in {:?}", t.elapsed());
    assert_eq!((report.files, report.dirs), (1, 1));
    let replaced = scan(&out);
    assert_eq!(replaced.len(), 1);
    assert_eq!(
        (replaced[0].kind, &replaced[0].data[..]),
        ("file", &b"flat\n"[..])
    );
}

#[test]
fn a_hundred_thousand_entries_in_one_directory_round_trip() {
    let e = env(true);
    eprintln!("in {}", e.base.display());
    let src = e.base.join("src");
    std::fs::create_dir(&src).unwrap();
    let t = Instant::now();
    {
        let dir = open_path(&src);
        for i in 0..WIDE {
            let fd = rustix::fs::openat(
                &dir,
                format!("f{i:06}"),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            )
            .unwrap();
            drop(fd);
        }
    }
    eprintln!("created {WIDE} files in {:?}", t.elapsed());

    let t = Instant::now();
    let done = chunkstore::publish::snapshot(&e.repo, &src, "wide", &Progress::default()).unwrap();
    eprintln!("snapshot in {:?}", t.elapsed());
    assert_eq!(done.tree.files, WIDE as u64);
    assert_eq!(done.tree.dirs, 1);

    let out = e.base.join("out");
    let t = Instant::now();
    let report = restore(&e.repo, done.generation.root_hash().unwrap(), &out);
    eprintln!("restore in {:?}", t.elapsed());
    assert_eq!(
        (report.files, report.dirs, report.bytes),
        (WIDE as u64, 1, 0)
    );

    let t = Instant::now();
    let (a, b) = (scan(&src), scan(&out));
    eprintln!("scanned both in {:?}", t.elapsed());
    assert_eq!(b.len(), WIDE);
    assert_same(&a, &b);
    let dir = open_path(&out);
    for i in (0..WIDE).step_by(9_973).chain([WIDE - 1]) {
        let st = rustix::fs::statat(&dir, format!("f{i:06}"), AtFlags::SYMLINK_NOFOLLOW).unwrap();
        assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::RegularFile);
        assert_eq!((st.st_size, st.st_mode & 0o7777), (0, 0o644));
    }
}
