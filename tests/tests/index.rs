//! The mount's index objects: merged instead of one more object per commit for every later
//! reader, and safe against a gc with a short grace.

use owfs_tests::{noise, Case};

/// A mount merges the index objects of its commits (one each) instead of leaving the store one
/// more object per commit for every later reader to fetch; every generation stays readable.
#[test]
fn the_mount_merges_its_index_objects() {
    let rt = owfs_tests::runtime();
    for c in Case::all() {
        let store = c.store();
        let index_objects = || rt.block_on(store.list("index")).unwrap().len();
        let m = c.mount_rw("ix", "mnt", &["commit_interval_ms=600000"]);
        let mut gens = Vec::new();
        for i in 0..40 {
            std::fs::write(m.path(&format!("f{i}")), format!("file {i}\n")).unwrap();
            gens.push(m.sync());
        }
        // The committer merges after answering a sync: one more commit waits for the last.
        std::fs::write(m.path("last"), b"last").unwrap();
        m.sync();
        let st = m.status();
        let n = index_objects();
        // At most 15 unmerged, the merged one, and a merge of the last commit in flight.
        assert!(
            n <= 20,
            "[{}] 41 commits left {n} index objects; status {}",
            c.name,
            st["index_compactions"]
        );
        // Small commits leave their index object to every 16th (decisions/
        // one-pack-a-commit.md): 41 commits wrote 2.
        assert!(
            st["deferred_index_writes"].as_u64().unwrap() >= 2,
            "[{}] {st}",
            c.name
        );
        m.umount();
        // The unmount merged what was left: one object names every pack of the mount.
        let n = index_objects();
        assert_eq!(n, 1, "[{}] after the unmount {n} index objects", c.name);
        // A fresh node, and an old generation, read what the merged objects name.
        let m2 = c.mount_rw("ix", "mnt2", &[]);
        for i in 0..40 {
            assert_eq!(
                std::fs::read_to_string(m2.path(&format!("f{i}"))).unwrap(),
                format!("file {i}\n")
            );
        }
        drop(m2);
        assert_eq!(c.cat("ix", gens[4], "f4").unwrap(), b"file 4\n");
        assert!(c.cat("ix", gens[4], "f5").is_err());
    }
}

/// gc with a short grace while a workspace is mounted: the CLI refuses it (the mount merges
/// index objects whose packs are up to 10 minutes old, and writes those of its small commits
/// late). And when a gc that short runs anyway (here through the library, which has no such
/// check) and deletes a pack the mount had not named in an index object yet, the mount's
/// index object does not name it: data another workspace deduplicates against the index
/// afterwards still restores.
#[test]
fn gc_with_a_short_grace_and_the_mounts_index_merges() {
    use chunkstore::gc::{self, GcOptions};
    let rt = owfs_tests::runtime();
    for c in Case::all() {
        let m = c.mount_rw("gcix", "mnt", &["commit_interval_ms=600000"]);
        let old = noise(300_000, 7);
        std::fs::write(m.path("x"), &old).unwrap();
        m.sync();
        std::fs::write(m.path("x"), noise(300_000, 8)).unwrap();
        m.sync();
        let out = c.owfs(&["gc", "--keep-last", "1", "--grace", "0s"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(10), "[{}] {err}", c.name);
        assert!(
            err.contains("gcix") && err.contains("mounted"),
            "[{}] {err}",
            c.name
        );
        c.ok(&["gc", "--keep-last", "1", "--grace", "0s", "--dry-run"]);
        // Condemn the first x's pack, then delete it. A pack written in the same second as
        // its marker counts as written again (the store's timestamps have whole seconds).
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let opts = GcOptions {
            dry_run: false,
            keep_last: Some(1),
            keep_within: None,
            grace: std::time::Duration::ZERO,
        };
        let r = gc::gc(&c.repo(&rt), &opts).unwrap();
        assert!(r.packs_condemned >= 1, "[{}] {r:?}", c.name);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let r = gc::gc(&c.repo(&rt), &opts).unwrap();
        assert!(r.packs_deleted >= 1, "[{}] {r:?}", c.name);
        // Enough commits for the mount to write the index object its commits deferred
        // (decisions/one-pack-a-commit.md), which must not name the deleted pack.
        let writes = m.status()["deferred_index_writes"].as_u64().unwrap();
        for i in 0..18 {
            std::fs::write(m.path(&format!("f{i}")), format!("{i}")).unwrap();
            m.sync();
        }
        let st = m.status();
        assert!(
            st["deferred_index_writes"].as_u64().unwrap() > writes,
            "[{}] no index object written: {st}",
            c.name
        );
        // Another workspace snapshots the deleted content: it must upload it again.
        let src = c.dir("gcix-src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("old"), &old).unwrap();
        c.ok(&["snapshot", src.to_str().unwrap(), "victim"]);
        let back = c.dir("gcix-back");
        c.ok(&["restore", "victim", back.to_str().unwrap()]);
        assert!(
            std::fs::read(back.join("old")).unwrap() == old,
            "[{}]",
            c.name
        );
        m.umount();
        assert_eq!(
            c.owfs(&["drill", "gcix"]).status.code(),
            Some(0),
            "[{}]",
            c.name
        );
    }
}
