//! When writes are durable: `owfs sync` and fsync of the root hold every write made before
//! them (also those the kernel is still writing back), concurrent root fsyncs all return, a
//! full cache directory is reported, backpressure slows writers without deadlock, and
//! parallel writeback never shrinks a file.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use owfs_tests::{noise, Case};

/// Several processes on one CPU fsync the root directory at once, each with dirty pages: each
/// waits for a commit, whose flush of the kernel's dirty pages needs a free request thread on
/// some CPU's queue (the kernel lets one root fsync wait at a time, and a queue has two
/// threads). Every fsync returns, and the commit holds every file.
#[test]
fn concurrent_root_fsyncs_on_one_cpu_all_return() {
    let c = Case::file();
    let m = c.mount_rw("rf", "mnt", &["commit_interval_ms=600000"]);
    let script = r#"
import os, sys
d, i = sys.argv[1], sys.argv[2]
with open(os.path.join(d, "f" + i), "wb") as f:
    f.write(bytes([int(i)]) * (3 << 20))
fd = os.open(d, os.O_RDONLY)
os.fsync(fd)
"#;
    let kids: Vec<_> = (0..6)
        .map(|i| {
            std::process::Command::new("taskset")
                .args(["-c", "0", "python3", "-c", script])
                .arg(&m.at)
                .arg(i.to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    let t0 = std::time::Instant::now();
    for mut k in kids {
        loop {
            if let Some(st) = k.try_wait().unwrap() {
                assert!(st.success());
                break;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(60),
                "a root fsync has not returned in 60 s: {}",
                m.status()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let g = m.status()["generation"].as_u64().unwrap();
    for i in 0..6u8 {
        let got = c.cat("rf", g, &format!("f{i}")).unwrap();
        assert_eq!(got, vec![i; 3 << 20], "f{i} in generation {g}");
    }
}

/// `owfs sync` holds every write made before it, also one still in the kernel's page cache:
/// the daemon's syncfs starts its writeback but does not wait for it on a FUSE mount (the
/// daemon here holds each WRITE for 500 ms, `fuse_write_delay_ms` of OWFS_FAULTS, so a cut
/// that did not wait would miss it), so the cut also waits on the writeback of every file
/// the kernel holds. The writer is its own process and keeps its
/// file open: any close of it (an exec in a child of the writer's, too) would flush and wait.
#[test]
fn sync_holds_writes_the_kernel_is_still_writing_back() {
    for c in Case::all() {
        let m = c.mount_rw_env(
            "wb",
            "mnt",
            &["commit_interval_ms=600000"],
            &[("OWFS_FAULTS", "fuse_write_delay_ms=500")],
        );
        let script = r#"
import sys
f = open(sys.argv[1], "wb")
f.write(bytes([int(sys.argv[2])]) * 5000)
f.flush()
print("written", flush=True)
sys.stdin.read()
"#;
        for round in 0..3u8 {
            let name = format!("r{round}");
            let mut w = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(m.path(&name))
                .arg(round.to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(w.stdout.as_mut().unwrap()),
                &mut line,
            )
            .unwrap();
            assert_eq!(line, "written\n");
            let g = m.sync();
            let got = c.cat("wb", g, &name).unwrap();
            assert!(
                got == vec![round; 5000],
                "{}: {name} in generation {g}: {} bytes, not the 5000 written before `owfs sync`",
                c.name,
                got.len()
            );
            drop(w.stdin.take());
            assert!(w.wait().unwrap().success());
        }
        m.umount();
    }
}

#[test]
fn fsync_of_the_root_directory_is_sync() {
    for c in Case::all() {
        let m = c.mount_rw("fs", "mnt", &["commit_interval_ms=600000"]);
        std::fs::write(m.path("x"), b"durable").unwrap();
        let before = m.status()["generation"].as_u64().unwrap();
        std::fs::File::open(&m.at).unwrap().sync_all().unwrap();
        let after = m.status()["generation"].as_u64().unwrap();
        assert_eq!(
            after,
            before + 1,
            "[{}] fsync of the root committed one generation",
            c.name
        );
        assert_eq!(c.cat("fs", after, "x").unwrap(), b"durable");
        // The mount's metadata: sizes and modes as written.
        assert_eq!(std::fs::metadata(m.path("x")).unwrap().size(), 7);
    }
}

/// A cache directory that fills up: under the writeback cache `write()` cannot fail at once,
/// so the WRITEs the daemon cannot store lose their bytes. That is never hidden: fsync fails
/// with ENOSPC, the next `owfs sync` fails naming the file (once), status counts the bytes,
/// and once space is freed the mount goes on and commits as before.
#[test]
fn a_full_cache_directory_is_reported_not_hidden() {
    struct Tmpfs(PathBuf);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            // The daemon may still be deleting its working copy after it answered the
            // unmount: retry a while, then detach it rather than leave a mount behind.
            for _ in 0..50 {
                let ok = std::process::Command::new("umount")
                    .arg(&self.0)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let c = Case::file();
    let cache = c.dir("full.cache");
    std::fs::create_dir_all(&cache).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs on {}", cache.display());
    let _tmpfs = Tmpfs(cache.clone());
    // Every publish takes 400 ms more, so that two syncs below overlap.
    let faults = [("OWFS_FAULTS", "delay_ms=400,only=/gens/")];
    let m = c.mount_rw_env("full", "full", &[], &faults);
    std::fs::create_dir(m.path("d")).unwrap();
    let mut f = std::fs::File::create(m.path("d/big")).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..64 {
        f.write_all(&chunk).unwrap();
    }
    let e = f.sync_all().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "fsync: {e}");
    drop(f);
    let out = c.owfs(&["sync", m.at.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sync succeeded: {err}");
    assert!(
        err.contains("could not be stored in the cache directory") && err.contains("d/big"),
        "sync said: {err}"
    );
    let lost = &m.status()["lost_writes"];
    assert!(lost["bytes"].as_u64().unwrap() >= 1 << 20, "status: {lost}");
    // Reported once; space freed, the mount goes on.
    std::fs::remove_file(m.path("d/big")).unwrap();
    m.sync();
    std::fs::write(m.path("d/after"), b"after").unwrap();
    let g = m.sync();
    assert_eq!(c.cat("full", g, "d/after").unwrap(), b"after");
    assert!(c.cat("full", g, "d/big").is_err());
    // Like writeback errors for fsync: every sync begun before a loss was reported fails,
    // two concurrent ones included, and a later one succeeds.
    let mut f = std::fs::File::create(m.path("d/big3")).unwrap();
    for _ in 0..64 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let sync = || {
        c.owfs_cmd(&["sync", m.at.to_str().unwrap()], &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = sync();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let second = sync();
    for (which, child) in [("first", first), ("second", second)] {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("d/big3"),
            "{which} concurrent sync: {err}"
        );
    }
    std::fs::remove_file(m.path("d/big3")).unwrap();
    m.sync();
    // A loss no sync reported yet is said by the unmount (which still succeeds).
    let mut f = std::fs::File::create(m.path("d/big2")).unwrap();
    for _ in 0..64 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let out = c.owfs(&["umount", m.at.to_str().unwrap()]);
    std::mem::forget(m);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "umount: {err}");
    assert!(
        err.contains("warning") && err.contains("d/big2"),
        "umount said: {err}"
    );
}

/// Writers are slowed down, never stopped, when the upload backlog passes its bound; the
/// kernel's flush still gets through (a throttled request thread must not block it).
#[test]
fn backpressure_slows_writers_without_deadlock() {
    let c = Case::file();
    let m = c.mount_rw(
        "bp",
        "mnt",
        &["max_backlog_mb=2", "commit_interval_ms=100", "threads=2"],
    );
    let data = noise(48 << 20, 5);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = m.path("big");
    let d2 = data.clone();
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in d2.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(240))
        .expect("a writer under backpressure must finish (deadlock?)");
    let st = m.status();
    assert!(
        st["throttled_writes"].as_u64().unwrap() > 0,
        "backpressure never engaged: {st}"
    );
    let n = m.sync();
    assert!(c.cat("bp", n, "big").unwrap() == data);
}

/// The kernel writes back the dirty pages of one file in parallel requests. A size computed by
/// one write and applied after a later one moved the size backwards: once the kernel dropped
/// its inode, the file read back short (seen in about 1 of 15 runs of this workload before the
/// fix: a 64 MiB file written in 4 KiB writes while the committer's syncfs runs, then
/// `sync` and drop_caches). Size and bytes must be whole after the kernel forgot the inode.
#[test]
fn parallel_writeback_never_shrinks_a_file() {
    let c = Case::file();
    let m = c.mount_rw("ws", "mnt", &["commit_interval_ms=50"]);
    const SIZE: usize = 32 << 20;
    const ROUNDS: u64 = 4;
    for round in 0..ROUNDS {
        let path = m.path(&format!("f{round}"));
        let expect = noise(SIZE, round);
        let mut f = std::fs::File::create(&path).unwrap();
        for block in expect.chunks(4096) {
            f.write_all(block).unwrap();
        }
        drop(f);
        rustix::fs::sync();
        std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), SIZE, "round {round}: size after drop_caches");
        assert!(got == expect, "round {round}: bytes differ");
    }
    let n = m.sync();
    let out = c.restore(&format!("{}@{}", "ws", n), "restored");
    for round in 0..ROUNDS {
        let got = std::fs::read(out.join(format!("f{round}"))).unwrap();
        assert!(got == noise(SIZE, round), "restored f{round} differs");
    }
    m.umount();
}
