//! What a cut holds: only bytes some program wrote, whatever happens to a file between the
//! barrier and the moment the committer reads it, and, for a name a rename replaced, the old
//! content or the new one whole (docs/decisions/frozen-bytes-outlive-names.md).

use std::io::Write;
use std::process::{Command, Stdio};

use owfs_tests::Case;

/// The committer reads a frozen file after the barrier. A file that loses its last name in
/// between (replaced by a rename, unlinked: SQLite's rollback journal at every commit) must
/// still be read as it was at the cut: its bytes are dropped only after. Here the committer
/// waits 1.5 s after each barrier (`commit_pause_ms`), and the files go in that pause; before
/// the fix, the generation held them with their size and every byte zero.
#[test]
fn a_file_that_goes_after_the_barrier_is_committed_as_it_was_at_the_cut() {
    for c in Case::all() {
        let m = c.mount_rw_env(
            "gone",
            "mnt",
            &["commit_interval_ms=600000"],
            &[("OWFS_FAULTS", "commit_pause_ms=1500")],
        );
        // Small files live in memory, large ones in the cache directory: both kinds.
        let sizes = [("small", 3000usize), ("large", 300_000)];
        for (name, size) in sizes {
            std::fs::write(m.path(name), vec![b'1'; size]).unwrap();
            std::fs::write(m.path(&format!("{name}.journal")), vec![b'j'; size]).unwrap();
        }
        m.sync();
        for (name, size) in sizes {
            std::fs::write(m.path(name), vec![b'2'; size]).unwrap();
            std::fs::write(m.path(&format!("{name}.journal")), vec![b'J'; size]).unwrap();
        }
        // The sync's cut freezes the files, then pauses before reading them.
        let g = sync_around(&c, &m, || {
            for (name, size) in sizes {
                let tmp = m.path(&format!("{name}.tmp"));
                std::fs::write(&tmp, vec![b'3'; size]).unwrap();
                std::fs::rename(&tmp, m.path(name)).unwrap();
                std::fs::remove_file(m.path(&format!("{name}.journal"))).unwrap();
            }
        });
        for (name, size) in sizes {
            let got = c.cat("gone", g, name).unwrap();
            assert!(
                got == vec![b'2'; size],
                "[{}] {name} in generation {g}: {} bytes, {} of them zero; the cut held {size} \
                 bytes of '2'",
                c.name,
                got.len(),
                got.iter().filter(|b| **b == 0).count()
            );
            let j = format!("{name}.journal");
            let got = c.cat("gone", g, &j).unwrap();
            assert!(
                got == vec![b'J'; size],
                "[{}] {j} in generation {g}: {} bytes, {} of them zero",
                c.name,
                got.len(),
                got.iter().filter(|b| **b == 0).count()
            );
        }
        let g2 = m.sync();
        for (name, size) in sizes {
            assert_eq!(c.cat("gone", g2, name).unwrap(), vec![b'3'; size]);
            assert!(c.cat("gone", g2, &format!("{name}.journal")).is_err());
        }
        m.umount();
    }
}

/// `write(tmp); rename(tmp, name); close(tmp)`: at the RENAME the new bytes can still be
/// dirty pages in the kernel (here every WRITE waits 150 ms before the daemon serves it). A
/// generation holds `name` with its old content or its new content in full, never a size
/// without its bytes. `cut_attempts=1` makes every cut that finds an unflushed rename hold
/// its name back rather than flush first, and the committer waits 60 ms between its flush and
/// its barrier (`barrier_pause_ms`) so that renames land there: both ways are exercised.
#[test]
fn a_rename_over_a_file_commits_the_old_content_or_the_new_whole() {
    for c in Case::all() {
        for attempts in ["1", "4"] {
            let ws = format!("ren{attempts}");
            let faults =
                format!("fuse_write_delay_ms=150,barrier_pause_ms=60,cut_attempts={attempts}");
            let m = c.mount_rw_env(
                &ws,
                "mnt",
                &["commit_interval_ms=40"],
                &[("OWFS_FAULTS", &faults)],
            );
            // Every rename replaces a file: the first version is there before them.
            std::fs::write(m.path("target"), vec![b'a'; 5000]).unwrap();
            let first = m.sync();
            let script = r#"
import os, sys, time
d = sys.argv[1]
for i in range(12):
    f = open(os.path.join(d, "tmp"), "wb")
    f.write(bytes([48 + i % 10]) * 5000)
    f.flush()
    os.rename(os.path.join(d, "tmp"), os.path.join(d, "target"))
    time.sleep(0.03 * (i % 4))
    f.close()
"#;
            let st = Command::new("python3")
                .args(["-c", script])
                .arg(&m.at)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
            let last = m.sync();
            let mut seen = std::collections::BTreeSet::new();
            for g in first..=last {
                let got = c.cat(&ws, g, "target").unwrap();
                let whole = got.len() == 5000 && got.iter().all(|b| *b == got[0] && *b != 0);
                assert!(
                    whole,
                    "[{} attempts={attempts}] target in generation {g}: {} bytes, first {:?}: \
                     not one version whole",
                    c.name,
                    got.len(),
                    got.first()
                );
                seen.insert(got[0]);
            }
            assert_eq!(
                c.cat(&ws, last, "target").unwrap(),
                vec![b'1'; 5000],
                "the last version after the sync"
            );
            let held = m.status()["names_held_back"].as_u64().unwrap();
            eprintln!(
                "[{} attempts={attempts}] {last} generations, versions seen {seen:?}, {held} \
                 names held back",
                c.name
            );
            if attempts == "1" {
                assert!(held > 0, "[{}] no cut held a name back", c.name);
            }
            let _ = std::io::stderr().flush();
            m.umount();
        }
    }
}

/// `owfs sync` in the background; `during` runs 250 ms after it started, inside the pause a
/// fault gives its commit (`barrier_pause_ms`, `commit_pause_ms`). The sync's generation.
fn sync_around(c: &Case, m: &owfs_tests::RwMount, during: impl FnOnce()) -> u64 {
    let at = m.at.clone();
    let bin = owfs_tests::owfs_bin();
    let url = c.url.clone();
    let sync = std::thread::spawn(move || {
        let out = Command::new(bin)
            .args(["--store", &url, "--json", "sync", at.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["generation"].as_u64().unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(250));
    during();
    sync.join().unwrap()
}

/// A cut that holds a replaced name back (its rename's source not flushed yet) holds the state
/// before the rename whole: the replaced file at its name and the source at its old name. A
/// file moved over another is never missing from a generation (it once was: the held-back
/// cut showed the old target and no source, and a crash then lost a committed file).
#[test]
fn a_held_back_rename_keeps_its_source_where_it_was() {
    for c in Case::all() {
        let m = c.mount_rw_env(
            "held",
            "mnt",
            &["commit_interval_ms=600000"],
            &[("OWFS_FAULTS", "barrier_pause_ms=600,cut_attempts=1")],
        );
        std::fs::write(m.path("a"), b"AAAA").unwrap();
        std::fs::write(m.path("b"), b"BBBB").unwrap();
        std::fs::create_dir(m.path("sub")).unwrap();
        let g0 = m.sync();
        // A committed file moved over another, and a new one from another directory.
        std::fs::write(m.path("sub/tmp"), b"TTTT").unwrap();
        let g = sync_around(&c, &m, || {
            std::fs::rename(m.path("a"), m.path("b")).unwrap();
            std::fs::write(m.path("c"), b"CCCC").unwrap();
            std::fs::rename(m.path("sub/tmp"), m.path("c")).unwrap();
        });
        assert!(g > g0);
        let held = m.status()["names_held_back"].as_u64().unwrap();
        assert!(held > 0, "[{}] the cut held nothing back", c.name);
        let ls = |path: &str| c.cat("held", g, path);
        assert_eq!(
            ls("b").unwrap(),
            b"BBBB",
            "[{}] b before the rename",
            c.name
        );
        assert_eq!(ls("a").unwrap(), b"AAAA", "[{}] a where it was", c.name);
        assert_eq!(
            ls("sub/tmp").unwrap(),
            b"TTTT",
            "[{}] the new source",
            c.name
        );
        let g2 = m.sync();
        assert_eq!(c.cat("held", g2, "b").unwrap(), b"AAAA");
        assert_eq!(c.cat("held", g2, "c").unwrap(), b"TTTT");
        assert!(
            c.cat("held", g2, "a").is_err(),
            "a is gone after the rename"
        );
        assert!(c.cat("held", g2, "sub/tmp").is_err());
        m.umount();
    }
}

/// A directory whose attributes change before it was ever loaded from the store (a fresh
/// node, no prefetch) keeps its content: the generation once held it empty.
#[test]
fn a_directory_changed_before_it_was_loaded_keeps_its_content() {
    use std::os::unix::fs::PermissionsExt;
    for c in Case::all() {
        let m = c.mount_rw("lazy", "mnt", &[]);
        std::fs::create_dir_all(m.path("d/e")).unwrap();
        std::fs::write(m.path("d/f"), b"inside").unwrap();
        std::fs::write(m.path("d/e/g"), b"deeper").unwrap();
        m.umount();
        let m = c.mount_rw("lazy", "mnt2", &["prefetch=0"]);
        std::fs::set_permissions(m.path("d"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::rename(m.path("d"), m.path("renamed")).unwrap();
        let g = m.sync();
        assert_eq!(
            c.cat("lazy", g, "renamed/f").unwrap(),
            b"inside",
            "[{}] the changed directory's content",
            c.name
        );
        assert_eq!(c.cat("lazy", g, "renamed/e/g").unwrap(), b"deeper");
        m.umount();
    }
}
