//! The operations in-process, without a kernel mount: a daemon started on a `file://` store
//! (the lease, the fence, the inode table and the committer all real), driven the way the
//! kernel drives it (a lookup of each path component before an operation, and only the
//! operations the kernel's VFS would forward), against a reference model. Every commit is
//! restored from the store and compared with the model as it was at that commit, and at the
//! end a second daemon, started from the last generation, must read the same tree (through
//! the lazy fetch from the store).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Errno, FileType, RenameFlags};
use proptest::prelude::*;

use super::fuse::{Caller, Operations, SetAttr};
use super::ops::OwfsFs;
use super::{Daemon, WsOptions};
use chunkstore::Repo;

const ROOT: u64 = super::inodes::ROOT;

/// Directories operations happen in, and the names they use: few, so that operations collide.
const DIRS: [&str; 3] = ["", "d", "d/e"];
const NAMES: [&str; 3] = ["a", "d", "e"];

#[derive(Clone, Debug)]
enum Step {
    Mkdir(usize, usize),
    Create(usize, usize),
    /// path, offset, length, seed of the bytes.
    Write(usize, usize, u64, usize, u64),
    Truncate(usize, usize, u64),
    Unlink(usize, usize),
    Rmdir(usize, usize),
    Rename(usize, usize, usize, usize),
    Link(usize, usize, usize, usize),
    Symlink(usize, usize, u8),
    Commit,
}

fn step() -> impl Strategy<Value = Step> {
    let d = 0..DIRS.len();
    let n = 0..NAMES.len();
    // Offsets and lengths cross the size under which a file stays in memory (64 KiB).
    let off = prop_oneof![0u64..4096, 60_000u64..140_000];
    let len = prop_oneof![1usize..300, 1usize..70_000];
    prop_oneof![
        2 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Mkdir(d, n)),
        3 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Create(d, n)),
        5 => (d.clone(), n.clone(), off.clone(), len, any::<u64>())
            .prop_map(|(d, n, o, l, s)| Step::Write(d, n, o, l, s)),
        1 => (d.clone(), n.clone(), off).prop_map(|(d, n, o)| Step::Truncate(d, n, o)),
        1 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Unlink(d, n)),
        1 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Rmdir(d, n)),
        2 => (d.clone(), n.clone(), d.clone(), n.clone())
            .prop_map(|(a, b, c, e)| Step::Rename(a, b, c, e)),
        1 => (d.clone(), n.clone(), d.clone(), n.clone())
            .prop_map(|(a, b, c, e)| Step::Link(a, b, c, e)),
        1 => (d, n, any::<u8>()).prop_map(|(d, n, t)| Step::Symlink(d, n, t)),
        1 => Just(Step::Commit),
    ]
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Bytes nothing else writes (a xorshift stream from the seed).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq)]
enum MNode {
    Dir,
    /// A file: its id in `Model::files` (hard links share it).
    File(u64),
    Symlink(Vec<u8>),
}

/// What a local file system would hold: names to nodes, files' bytes by id.
#[derive(Clone, Debug, Default)]
struct Model {
    names: BTreeMap<String, MNode>,
    files: HashMap<u64, Vec<u8>>,
    next: u64,
}

/// What a tree holds, for comparing a model, a restored directory and a daemon's view.
#[derive(Debug, PartialEq)]
enum Seen {
    Dir,
    File { bytes: Vec<u8>, nlink: u64 },
    Symlink(Vec<u8>),
}

impl Model {
    fn get(&self, p: &str) -> Option<&MNode> {
        if p.is_empty() {
            return Some(&MNode::Dir);
        }
        self.names.get(p)
    }

    fn is_dir(&self, p: &str) -> bool {
        self.get(p) == Some(&MNode::Dir)
    }

    fn children(&self, dir: &str) -> Vec<String> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        self.names
            .keys()
            .filter(|k| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
            .cloned()
            .collect()
    }

    fn add_file(&mut self, p: &str) {
        self.next += 1;
        self.files.insert(self.next, Vec::new());
        self.names.insert(p.to_string(), MNode::File(self.next));
    }

    fn nlink(&self, id: u64) -> u64 {
        self.names
            .values()
            .filter(|n| **n == MNode::File(id))
            .count() as u64
    }

    /// Moves `from` (and everything under it) to `to`.
    fn rename(&mut self, from: &str, to: &str) {
        let moved: Vec<(String, MNode)> = self
            .names
            .iter()
            .filter(|(k, _)| *k == from || k.starts_with(&format!("{from}/")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, _) in &moved {
            self.names.remove(k);
        }
        for (k, v) in moved {
            self.names.insert(format!("{to}{}", &k[from.len()..]), v);
        }
    }

    fn seen(&self) -> BTreeMap<String, Seen> {
        self.names
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    MNode::Dir => Seen::Dir,
                    MNode::File(id) => Seen::File {
                        bytes: self.files[id].clone(),
                        nlink: self.nlink(*id),
                    },
                    MNode::Symlink(t) => Seen::Symlink(t.clone()),
                };
                (k.clone(), s)
            })
            .collect()
    }
}

/// A directory restored from the store, as `Seen` entries.
fn seen_on_disk(root: &Path) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let md = std::fs::symlink_metadata(&p).unwrap();
            let key = r.to_str().unwrap().to_string();
            let s = if md.is_dir() {
                stack.push(r);
                Seen::Dir
            } else if md.file_type().is_symlink() {
                Seen::Symlink(
                    std::fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else {
                Seen::File {
                    bytes: std::fs::read(&p).unwrap(),
                    nlink: md.nlink(),
                }
            };
            out.insert(key, s);
        }
    }
    out
}

/// A daemon started in-process, with the operations and a way to commit.
struct InProcess {
    daemon: Daemon,
    fs: OwfsFs,
    caller: Caller,
}

impl InProcess {
    fn start(repo: &Arc<Repo>, ws: &str, dir: &Path) -> InProcess {
        let mountpoint = dir.join("never-mounted");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let mut opts = WsOptions {
            prefetch: false,
            ..WsOptions::default()
        };
        // No renewer runs in-process: a lease that outlives any test (a loaded machine
        // must not turn a slow case into EIO).
        opts.lease.ttl = std::time::Duration::from_secs(3600);
        opts.lease.renew_every = std::time::Duration::from_secs(1200);
        let daemon = Daemon::start(repo.clone(), ws, &mountpoint, Some(dir.join("cache")), opts)
            .expect("the daemon starts on a file:// store");
        let fs = OwfsFs::new(daemon.shared().clone());
        InProcess {
            daemon,
            fs,
            caller: Caller {
                uid: 0,
                gid: 0,
                pid: std::process::id(),
            },
        }
    }

    /// The inode at `path`, looked up component by component as the kernel does.
    fn resolve(&self, path: &str) -> Option<u64> {
        let mut ino = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let a = self.fs.lookup(ino, part.as_bytes()).ok()?;
            if a.ino.0 == 0 {
                return None;
            }
            ino = a.ino.0;
        }
        Some(ino)
    }

    /// Everything the daemon shows, read through its operations.
    fn seen(&self) -> BTreeMap<String, Seen> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((dir, ino)) = stack.pop() {
            let fh = self.fs.opendir(ino).expect("opendir").fh;
            let mut entries = Vec::new();
            self.fs
                .readdir(ino, fh, 0, &mut |child, _, kind, name| {
                    entries.push((child, kind, name.to_vec()));
                    false
                })
                .expect("readdir");
            self.fs.releasedir(ino, fh).unwrap();
            for (child, kind, name) in entries {
                if name == b"." || name == b".." {
                    continue;
                }
                let path = join(&dir, std::str::from_utf8(&name).unwrap());
                let s = match kind {
                    FileType::Directory => {
                        stack.push((path.clone(), child));
                        Seen::Dir
                    }
                    FileType::Symlink => Seen::Symlink(self.fs.readlink(child).unwrap()),
                    _ => {
                        let a = self.fs.getattr(child).unwrap();
                        let mut b = Vec::new();
                        while (b.len() as u64) < a.size {
                            let chunk = self
                                .fs
                                .read(child, 0, b.len() as u64, 128 << 10)
                                .expect("read");
                            assert!(!chunk.is_empty(), "{path}: short read at {}", b.len());
                            b.extend_from_slice(&chunk);
                        }
                        b.truncate(a.size as usize);
                        Seen::File {
                            bytes: b,
                            nlink: a.nlink as u64,
                        }
                    }
                };
                out.insert(path, s);
            }
        }
        out
    }

    /// Applies one step to the daemon and the model, the way the kernel would: steps the
    /// VFS refuses before asking the file system (an existing name for a new node, a type
    /// mismatch in a rename, a directory moved under itself) are not sent.
    fn apply(&self, m: &mut Model, s: &Step, repo: &Arc<Repo>, tmp: &Path, at: usize) {
        let c = &self.caller;
        let parent_of = |d: usize| self.resolve(DIRS[d]).filter(|_| m.is_dir(DIRS[d]));
        match *s {
            Step::Mkdir(d, n) | Step::Create(d, n) | Step::Symlink(d, n, _) => {
                let p = join(DIRS[d], NAMES[n]);
                let Some(parent) = parent_of(d) else { return };
                if m.get(&p).is_some() {
                    return;
                }
                let name = NAMES[n].as_bytes();
                match *s {
                    Step::Mkdir(..) => {
                        self.fs.mkdir(c, parent, name, 0o755).unwrap();
                        m.names.insert(p, MNode::Dir);
                    }
                    Step::Create(..) => {
                        self.fs
                            .mknod(c, parent, name, libc::S_IFREG | 0o644, 0)
                            .unwrap();
                        m.add_file(&p);
                    }
                    Step::Symlink(_, _, t) => {
                        let target = format!("target-{t}").into_bytes();
                        self.fs.symlink(c, parent, name, &target).unwrap();
                        m.names.insert(p, MNode::Symlink(target));
                    }
                    _ => unreachable!(),
                }
            }
            Step::Write(d, n, off, len, seed) => {
                let p = join(DIRS[d], NAMES[n]);
                let Some(MNode::File(id)) = m.get(&p).cloned() else {
                    return;
                };
                let ino = self.resolve(&p).unwrap();
                let data = bytes(seed, len);
                let wrote = self.fs.write(c, ino, off, &data, false).unwrap();
                assert_eq!(wrote as usize, len);
                let f = m.files.get_mut(&id).unwrap();
                let end = off as usize + len;
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[off as usize..end].copy_from_slice(&data);
            }
            Step::Truncate(d, n, size) => {
                let p = join(DIRS[d], NAMES[n]);
                let Some(MNode::File(id)) = m.get(&p).cloned() else {
                    return;
                };
                let ino = self.resolve(&p).unwrap();
                let a = SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                self.fs.setattr(c, ino, a).unwrap();
                m.files.get_mut(&id).unwrap().resize(size as usize, 0);
            }
            Step::Unlink(d, n) => {
                let p = join(DIRS[d], NAMES[n]);
                match m.get(&p) {
                    Some(MNode::File(_)) | Some(MNode::Symlink(_)) => {}
                    _ => return,
                }
                let parent = parent_of(d).unwrap();
                self.fs.unlink(parent, NAMES[n].as_bytes()).unwrap();
                m.names.remove(&p);
            }
            Step::Rmdir(d, n) => {
                let p = join(DIRS[d], NAMES[n]);
                if !m.is_dir(&p) {
                    return;
                }
                let parent = parent_of(d).unwrap();
                let r = self.fs.rmdir(parent, NAMES[n].as_bytes());
                if m.children(&p).is_empty() {
                    r.unwrap();
                    m.names.remove(&p);
                } else {
                    assert_eq!(r, Err(Errno::ENOTEMPTY), "rmdir {p}");
                }
            }
            Step::Rename(d, n, d2, n2) => {
                let from = join(DIRS[d], NAMES[n]);
                let to = join(DIRS[d2], NAMES[n2]);
                let (Some(src), Some(np)) = (m.get(&from).cloned(), parent_of(d2)) else {
                    return;
                };
                let src_dir = src == MNode::Dir;
                if from == to || (src_dir && to.starts_with(&format!("{from}/"))) {
                    return;
                }
                if let Some(dst) = m.get(&to) {
                    if (*dst == MNode::Dir) != src_dir {
                        return;
                    }
                    if matches!((dst, &src), (MNode::File(a), MNode::File(b)) if a == b) {
                        // Two names of one file: rename(2) does nothing.
                        return;
                    }
                }
                let op = parent_of(d).unwrap();
                let r = self.fs.rename(
                    op,
                    NAMES[n].as_bytes(),
                    np,
                    NAMES[n2].as_bytes(),
                    RenameFlags::empty(),
                );
                if m.is_dir(&to) && !m.children(&to).is_empty() {
                    assert_eq!(r, Err(Errno::ENOTEMPTY), "rename {from} {to}");
                    return;
                }
                r.unwrap_or_else(|e| panic!("rename {from} {to}: {e:?}"));
                if m.get(&to).is_some() {
                    m.names.remove(&to);
                }
                m.rename(&from, &to);
            }
            Step::Link(d, n, d2, n2) => {
                let from = join(DIRS[d], NAMES[n]);
                let to = join(DIRS[d2], NAMES[n2]);
                let Some(MNode::File(id)) = m.get(&from).cloned() else {
                    return;
                };
                let Some(np) = parent_of(d2) else { return };
                if m.get(&to).is_some() {
                    return;
                }
                let ino = self.resolve(&from).unwrap();
                self.fs.link(ino, np, NAMES[n2].as_bytes()).unwrap();
                m.names.insert(to, MNode::File(id));
            }
            Step::Commit => {
                let Some(rec) = self.commit() else { return };
                let out = tmp.join(format!("restored-{at}"));
                chunkstore::restore::restore_tree(
                    repo,
                    rec.root_hash().unwrap(),
                    &out,
                    chunkstore::restore::RestoreOptions {
                        keep_going: false,
                        progress: &Default::default(),
                    },
                )
                .unwrap();
                assert_eq!(
                    seen_on_disk(&out),
                    m.seen(),
                    "generation {} restored (step {at})",
                    rec.number
                );
                chunkstore::restore::remove_dir_tree(&out).unwrap();
            }
        }
    }

    /// One commit, as the committer makes it (there is no kernel to flush).
    fn commit(&self) -> Option<chunkstore::generation::GenRecord> {
        self.daemon.commit_now().expect("commit")
    }
}

/// A new `file://` store under `dir`, and the runtime its requests run on.
fn file_store(dir: &Path) -> (tokio::runtime::Runtime, Arc<Repo>) {
    chunkstore::testdata::file_repo(&dir.join("store"))
}

fn run_case(steps: &[Step]) {
    let tmp = tempfile::tempdir().unwrap();
    let (_rt, repo) = file_store(tmp.path());
    let mut model = Model::default();
    let d = InProcess::start(&repo, "ws", &tmp.path().join("one"));
    for (i, s) in steps.iter().enumerate() {
        d.apply(&mut model, s, &repo, tmp.path(), i);
        assert_eq!(d.seen(), model.seen(), "after step {i}: {s:?}");
    }
    d.apply(&mut model, &Step::Commit, &repo, tmp.path(), steps.len());
    d.daemon.finish().expect("a clean stop");
    // A fresh daemon reads the workspace back from the store, lazily.
    let again = InProcess::start(&repo, "ws", &tmp.path().join("two"));
    assert_eq!(
        again.seen(),
        model.seen(),
        "a fresh daemon on the last generation"
    );
    again.daemon.finish().expect("a clean stop");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    #[test]
    fn random_operations_match_a_reference_model(steps in proptest::collection::vec(step(), 1..60)) {
        run_case(&steps);
    }
}

/// One sequence written out: a file written past the size kept in memory, hard-linked, a
/// file renamed over one of its names, a non-empty directory removed, commits in between.
#[test]
fn a_known_sequence_matches_the_model() {
    run_case(&[
        Step::Mkdir(0, 1),
        Step::Mkdir(1, 2),
        Step::Create(2, 0),
        Step::Write(2, 0, 60_000, 20_000, 7),
        Step::Commit,
        Step::Create(0, 0),
        Step::Write(0, 0, 0, 100, 9),
        Step::Link(2, 0, 0, 2),
        Step::Rename(0, 0, 0, 2),
        Step::Truncate(2, 0, 70_000),
        Step::Commit,
        Step::Rmdir(1, 2),
        Step::Unlink(2, 0),
        Step::Rmdir(1, 2),
        Step::Symlink(1, 0, 3),
    ]);
}

/// A per-file check that refuses a file fails the commit before anything is published, and
/// the file is committed by the next cut once the check passes (committer/checks.rs).
#[test]
fn a_failing_file_check_fails_the_commit_and_the_next_cut_retries() {
    use super::committer::checks::{FileCheck, Frozen};
    use std::sync::atomic::{AtomicBool, Ordering};

    struct RefuseThirteen(Arc<AtomicBool>);
    impl FileCheck for RefuseThirteen {
        fn check(&self, f: &Frozen<'_>) -> Result<(), String> {
            let mut buf = vec![0u8; f.size as usize];
            f.bytes
                .read_exact_at(&mut buf, 0)
                .map_err(|e| e.to_string())?;
            if self.0.load(Ordering::SeqCst) && buf == b"thirteen byte" {
                return Err(format!("{}: refused", f.path.display()));
            }
            Ok(())
        }
    }

    let tmp = tempfile::tempdir().unwrap();
    let (_rt, repo) = file_store(tmp.path());
    let d = InProcess::start(&repo, "ws", &tmp.path().join("one"));
    let refuse = Arc::new(AtomicBool::new(true));
    d.daemon
        .shared()
        .checks
        .write()
        .push(Box::new(RefuseThirteen(refuse.clone())));
    let latest = || {
        repo.block_on(chunkstore::generation::latest(&repo.store, "ws"))
            .unwrap()
            .unwrap()
            .number
    };
    let before = latest();
    let a =
        d.fs.mknod(&d.caller, ROOT, b"f", libc::S_IFREG | 0o644, 0)
            .unwrap();
    d.fs.write(&d.caller, a.ino.0, 0, b"thirteen byte", false)
        .unwrap();
    let err = d
        .daemon
        .commit_now()
        .expect_err("the check refuses the file");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(latest(), before, "a refused commit publishes nothing");
    refuse.store(false, Ordering::SeqCst);
    let rec = d.commit().expect("the next cut commits the file");
    assert_eq!(rec.number, before + 1);
    let mut model = Model::default();
    model.add_file("f");
    *model.files.get_mut(&1).unwrap() = b"thirteen byte".to_vec();
    assert_eq!(d.seen(), model.seen());
    d.daemon.finish().unwrap();
}

/// A lost lease ends the committer, whatever it was doing: `serve` joins it before it says
/// how the daemon stopped, so a committer that went on would keep the process forever.
#[test]
fn a_lost_lease_ends_the_committer() {
    let tmp = tempfile::tempdir().unwrap();
    let (_rt, repo) = file_store(tmp.path());
    let d = InProcess::start(&repo, "ws", &tmp.path().join("one"));
    let s = d.daemon.shared().clone();
    let committer = std::thread::spawn(move || s.committer());
    d.fs.mknod(&d.caller, ROOT, b"f", libc::S_IFREG | 0o644, 0)
        .unwrap();
    d.daemon.shared().lease_lost("taken over in a test");
    let t0 = std::time::Instant::now();
    while !committer.is_finished() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "the committer still runs after the lease was lost"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    committer.join().unwrap();
    assert!(
        d.daemon.shared().sync_now().is_err(),
        "a sync after the loss fails"
    );
}
