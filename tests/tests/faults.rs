//! Fault injection, races and hostile input, through the library on real stores.

use std::sync::Arc;

use chunkstore::faulty::{FaultConfig, FaultyStore};
use chunkstore::gc::{self, GcOptions};
use chunkstore::generation::{self, GenRecord};
use chunkstore::pack::BlobKind;
use chunkstore::progress::Progress;
use chunkstore::tree::{Content, Entry, Kind, Tree};
use chunkstore::writer::BlobWriter;
use chunkstore::{publish, Error, Hash, Repo, Store};
use owfs_tests::{assert_same_tree, noise, restore, runtime, Case};

fn sample_tree(dir: &std::path::Path, seed: u64) {
    for i in 0..30 {
        let p = dir.join(format!("d{}/f{i}", i % 4));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, noise(1000 + (i * 7919) % 90_000, seed + i as u64)).unwrap();
    }
    std::fs::write(dir.join("big"), noise(2 << 20, seed)).unwrap();
}

/// The case's store as a bare `ObjectStore` (bucket root), to wrap in the fault injector.
fn raw_store(case: &Case) -> (Arc<dyn object_store::ObjectStore>, String) {
    let url = case.store().url().to_string();
    let os: Arc<dyn object_store::ObjectStore> = match url.strip_prefix("file://") {
        Some(p) => Arc::new(object_store::local::LocalFileSystem::new_with_prefix(p).unwrap()),
        None => {
            let bucket = url.trim_start_matches("s3://").split('/').next().unwrap();
            Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_allow_http(true)
                    .build()
                    .unwrap(),
            )
        }
    };
    (os, url)
}

fn faulty_repo(
    case: &Case,
    rt: &tokio::runtime::Runtime,
    spec: &str,
) -> chunkstore::Result<Arc<Repo>> {
    let (os, url) = raw_store(case);
    let store = Store::from_object_store(
        Arc::new(FaultyStore::new(os, FaultConfig::parse(spec))),
        &url,
    );
    Repo::open(store, rt.handle().clone(), true)
}

fn clean_repo(case: &Case, rt: &tokio::runtime::Runtime) -> Arc<Repo> {
    let (os, url) = raw_store(case);
    Repo::open(
        Store::from_object_store(os, &url),
        rt.handle().clone(),
        true,
    )
    .unwrap()
}

fn latest(repo: &Arc<Repo>, ws: &str) -> Option<u64> {
    repo.block_on(generation::latest_number(&repo.store, ws))
        .unwrap()
}

/// Snapshots under failing, slow and ambiguous writes either publish a complete generation or
/// publish nothing; a failed commit never becomes the latest.
#[test]
fn failed_commits_never_become_the_latest() {
    for case in Case::all() {
        let rt = runtime();
        let src = case.dir("src");
        let mut outcomes = (0, 0);
        for seed in 0..8u64 {
            std::fs::remove_dir_all(&src).ok();
            std::fs::create_dir_all(&src).unwrap();
            sample_tree(&src, seed * 100);
            let clean = clean_repo(&case, &rt);
            let before = latest(&clean, "ws");
            let spec = format!("seed={seed},put_fail=0.35,put_lost_ack=0.3,delay_ms=1");
            let repo = faulty_repo(&case, &rt, &spec).unwrap();
            match publish::snapshot(&repo, &src, "ws", &Progress::default()) {
                Ok(done) => {
                    outcomes.0 += 1;
                    assert_eq!(latest(&clean, "ws"), Some(done.generation.number));
                    let out = case.dir(&format!("ok{seed}"));
                    let root = done.generation.root_hash().unwrap();
                    restore(&clean, root, &out).unwrap();
                    assert_same_tree(&src, &out);
                }
                Err(e) => {
                    outcomes.1 += 1;
                    assert!(
                        e.is_transient() || matches!(e, Error::Conflict(_)),
                        "[{}] unexpected: {e}",
                        case.name
                    );
                    assert_eq!(
                        latest(&clean, "ws"),
                        before,
                        "[{}] a failed commit was published",
                        case.name
                    );
                }
            }
            // Whatever happened, the latest generation restores intact.
            if let Some(n) = latest(&clean, "ws") {
                let rec = clean
                    .block_on(generation::get_generation(&clean.store, "ws", n))
                    .unwrap();
                let out = case.dir(&format!("latest{seed}"));
                restore(&clean, rec.root_hash().unwrap(), &out).unwrap();
            }
        }
        assert!(
            outcomes.0 > 0,
            "[{}] no commit got through: {outcomes:?}",
            case.name
        );
    }
}

/// Restores under failing and truncated reads succeed exactly or fail cleanly.
#[test]
fn restore_under_read_faults_is_exact_or_fails_cleanly() {
    for case in Case::all() {
        let rt = runtime();
        let src = case.dir("src");
        std::fs::create_dir_all(&src).unwrap();
        sample_tree(&src, 7);
        let clean = clean_repo(&case, &rt);
        let done = publish::snapshot(&clean, &src, "ws", &Progress::default()).unwrap();
        let root = done.generation.root_hash().unwrap();
        let mut ok = 0;
        for seed in 0..8u64 {
            let out = case.dir(&format!("out{seed}"));
            let res = faulty_repo(
                &case,
                &rt,
                &format!("seed={seed},get_fail=0.3,get_truncate=0.1"),
            )
            .and_then(|repo| restore(&repo, root, &out));
            match res {
                Ok(_) => {
                    assert_same_tree(&src, &out);
                    ok += 1;
                }
                Err(e) => assert!(
                    matches!(e, Error::Corrupt { .. }) || e.is_transient(),
                    "[{}] unexpected error kind: {e}",
                    case.name
                ),
            }
        }
        assert!(ok > 0, "[{}] every restore failed", case.name);
    }
}

fn record(ws: &str, number: u64, root: Hash) -> GenRecord {
    publish::record(publish::NewGen {
        ws,
        parent: None,
        kind: "test",
        origin: None,
        root,
        tree: Default::default(),
        write: Default::default(),
        epoch: 0,
    })
    .tap(number)
}

trait Tap {
    fn tap(self, n: u64) -> Self;
}

impl Tap for GenRecord {
    fn tap(mut self, n: u64) -> Self {
        self.number = n;
        self.parent = if n > 1 { Some(n - 1) } else { None };
        self
    }
}

/// Two committers race for the same generation number: exactly one wins, every time.
#[test]
fn racing_publishers_exactly_one_wins() {
    for case in Case::all() {
        let rt = runtime();
        let repo = clean_repo(&case, &rt);
        let root = Hash::of(b"root");
        for n in 1..=20u64 {
            let (a, b) = (record("race", n, root), record("race", n, root));
            let (ra, rb) = std::thread::scope(|s| {
                let ha = s.spawn(|| repo.block_on(generation::publish(&repo.store, &a)));
                let hb = s.spawn(|| repo.block_on(generation::publish(&repo.store, &b)));
                (ha.join().unwrap(), hb.join().unwrap())
            });
            assert!(
                ra.is_ok() != rb.is_ok(),
                "[{}] gen {n}: {ra:?} / {rb:?}",
                case.name
            );
            let loser = if ra.is_ok() { rb } else { ra };
            assert!(
                matches!(loser, Err(Error::Conflict(_))),
                "[{}] {loser:?}",
                case.name
            );
            let there = repo
                .block_on(generation::get_generation(&repo.store, "race", n))
                .unwrap();
            assert!(there.nonce == a.nonce || there.nonce == b.nonce);
        }
        assert_eq!(latest(&repo, "race"), Some(20));
    }
}

/// A lost acknowledgement on the publish itself: the re-read finds our own record.
#[test]
fn an_ambiguous_publish_is_resolved_by_re_reading() {
    let case = Case::file();
    let rt = runtime();
    let repo = faulty_repo(&case, &rt, "seed=1,put_lost_ack=1.0,only=gens").unwrap();
    let rec = record("amb", 1, Hash::of(b"r"));
    repo.block_on(generation::publish(&repo.store, &rec))
        .unwrap();
    let clean = clean_repo(&case, &rt);
    let there = clean
        .block_on(generation::get_generation(&clean.store, "amb", 1))
        .unwrap();
    assert_eq!(there.nonce, rec.nonce);
}

fn hostile_entry(name: &[u8], kind: Kind) -> Entry {
    Entry {
        name: name.to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        size: 5,
        link: 0,
        ino: 0,
        ctime_ns: 0,
        rdev: 0,
        xattrs: vec![],
        target: b"/etc".to_vec(),
        subtree: None,
        content: Content::Empty,
    }
}

/// A manifest naming `..`, an absolute path or NUL is refused, and nothing is written outside
/// the target.
#[test]
fn hostile_manifests_cannot_escape_the_target() {
    let case = Case::file();
    let rt = runtime();
    let repo = clean_repo(&case, &rt);
    for (i, bad) in [
        &b".."[..],
        b"/tmp/owfs-escape",
        b"a/../../x",
        b"nul\0name",
        b".",
    ]
    .iter()
    .enumerate()
    {
        let mut w = BlobWriter::new(repo.clone()).unwrap();
        let tree = Tree {
            entries: vec![hostile_entry(bad, Kind::Symlink)],
        };
        let bytes = tree.encode();
        let root = Hash::of(&bytes);
        w.add(root, BlobKind::Tree, bytes).unwrap();
        w.finish().unwrap();
        let ws = format!("evil{i}");
        repo.block_on(generation::publish(&repo.store, &record(&ws, 1, root)))
            .unwrap();
        let target = case.dir(&format!("t{i}"));
        let out = case.owfs(&["restore", &ws, target.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(9),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("unsafe manifest"));
        assert!(!std::path::Path::new("/tmp/owfs-escape").exists());
        assert!(std::fs::read_dir(&target)
            .map(|d| d.count() == 0)
            .unwrap_or(true));
    }
}

/// gc condemns an unreferenced pack; a commit that loaded the index earlier and reuses a blob
/// of it refuses to publish; a later gc deletes the pack; nothing published loses data.
#[test]
fn gc_and_a_concurrent_commit_never_lose_data() {
    for case in Case::all() {
        let rt = runtime();
        let src = case.dir("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("x"), noise(500_000, 5)).unwrap();
        // An orphan: the blobs of `x` stored, but no generation refers to them.
        let orphan_maker = clean_repo(&case, &rt);
        let mut w = BlobWriter::new(orphan_maker.clone()).unwrap();
        chunkstore::chunker::chunk_reader::<_, Error>(
            std::fs::File::open(src.join("x")).unwrap(),
            orphan_maker.chunk_params(),
            |c| w.add(Hash::of(c), BlobKind::Data, c.to_vec()),
        )
        .unwrap();
        w.finish().unwrap();
        // A committer loads the index now (it sees the orphan's blobs)...
        let committer = clean_repo(&case, &rt);
        committer.ensure_index().unwrap();
        // ...gc condemns the orphan pack...
        let gc_repo = clean_repo(&case, &rt);
        let opts = GcOptions {
            dry_run: false,
            keep_last: None,
            keep_within: None,
            grace: std::time::Duration::ZERO,
        };
        let r = gc::gc(&gc_repo, &opts).unwrap();
        assert!(r.packs_condemned >= 1, "[{}] {r:?}", case.name);
        let condemned = r.packs_condemned;
        // ...and the committer, reusing those blobs, refuses to publish.
        let err = publish::snapshot(&committer, &src, "ws", &Progress::default()).unwrap_err();
        assert!(matches!(err, Error::Conflict(_)), "[{}] {err}", case.name);
        assert_eq!(latest(&committer, "ws"), None);
        // A fresh attempt uploads the data again and publishes.
        let fresh = clean_repo(&case, &rt);
        let done = publish::snapshot(&fresh, &src, "ws", &Progress::default()).unwrap();
        // The next gc deletes the condemned pack; the published generation stays whole.
        let r = gc::gc(&clean_repo(&case, &rt), &opts).unwrap();
        // A condemned pack that the fresh commit wrote again (same content, same name) is
        // live again; every other one is deleted.
        assert_eq!(
            r.packs_deleted + r.packs_resurrected,
            condemned,
            "[{}] {r:?}",
            case.name
        );
        let out = case.dir("out");
        let check = clean_repo(&case, &rt);
        restore(&check, done.generation.root_hash().unwrap(), &out).unwrap();
        assert_same_tree(&src, &out);
    }
}
