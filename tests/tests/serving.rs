//! The daemon as a server: requests through io_uring's per-CPU queues, a daemon stopped and
//! continued, a queue that stops, what the kernel caches (negative entries, readahead), and the
//! daemon's own resources (its callers' descriptors, more files than it may open).

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use owfs_tests::{kill_and_detach, noise, send_signal, Case};

/// Where the kernel has FUSE over io_uring, requests go through its queues, not /dev/fuse:
/// the transport in `owfs status`, and the answers are the mount's, byte for byte.
#[test]
fn requests_go_through_io_uring_where_the_kernel_has_it() {
    let param = "/sys/module/fuse/parameters/enable_uring";
    let off = std::env::var("OWFS_TEST_URING").is_ok_and(|v| v == "off");
    if !Path::new(param).exists() || off {
        eprintln!("skipped: no {param} here, or OWFS_TEST_URING=off");
        return;
    }
    let c = Case::file();
    let m = c.mount_rw("ur", "mnt", &[]);
    std::fs::create_dir(m.path("d")).unwrap();
    std::fs::write(m.path("d/f"), vec![7u8; 3 << 20]).unwrap();
    std::fs::rename(m.path("d/f"), m.path("d/g")).unwrap();
    assert_eq!(std::fs::read(m.path("d/g")).unwrap(), vec![7u8; 3 << 20]);
    let names: Vec<_> = std::fs::read_dir(m.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["g"]);
    let st = m.status();
    let transport = st["fuse_transport"].as_str().unwrap().to_string();
    assert!(
        transport.starts_with("io_uring"),
        "transport {transport}, status {st}"
    );
    assert_eq!(std::fs::read_to_string(param).unwrap().trim(), "Y");
    let g = m.umount();
    assert_eq!(c.cat("ur", g, "d/g").unwrap(), vec![7u8; 3 << 20]);
}

/// A daemon stopped and continued (SIGSTOP/SIGCONT, as a debugger or a job control shell do)
/// serves on: every CPU's queue still answers afterwards. A caller pinned
/// to each CPU in turn stats, writes, fsyncs and reads a file; a queue that stopped serving
/// would leave its caller waiting forever (the test then kills the daemon to release it).
#[test]
fn a_stopped_and_continued_daemon_serves_every_cpu() {
    let c = Case::file();
    let m = c.mount_rw("sc", "mnt", &[]);
    std::fs::write(m.path("before"), b"before").unwrap();
    let pid = m.daemon_pid();
    for _ in 0..3 {
        send_signal(pid, 19); // SIGSTOP
        std::thread::sleep(std::time::Duration::from_millis(300));
        send_signal(pid, 18); // SIGCONT
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let script = r#"
import os, sys
d, i = sys.argv[1], sys.argv[2]
os.stat(os.path.join(d, "before"))
p = os.path.join(d, "cpu" + i)
with open(p, "wb") as f:
    f.write(("written on cpu " + i).encode())
    f.flush()
    os.fsync(f.fileno())
assert open(p, "rb").read() == ("written on cpu " + i).encode()
"#;
    for cpu in 0..cpus {
        let mut k = std::process::Command::new("taskset")
            .args(["-c", &cpu.to_string(), "python3", "-c", script])
            .arg(&m.at)
            .arg(cpu.to_string())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        loop {
            if let Some(st) = k.try_wait().unwrap() {
                assert!(st.success(), "the caller on cpu {cpu} failed");
                break;
            }
            if t0.elapsed() > std::time::Duration::from_secs(30) {
                kill_and_detach(pid, &m.at);
                let _ = k.wait();
                panic!(
                    "after SIGSTOP/SIGCONT the daemon did not answer a caller on cpu {cpu} in 30 s"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let g = m.umount();
    for cpu in 0..cpus {
        let got = c.cat("sc", g, &format!("cpu{cpu}")).unwrap();
        assert_eq!(got, format!("written on cpu {cpu}").into_bytes());
    }
}

/// An io_uring queue thread that stops after it registered (here `uring_stop_after` of
/// OWFS_FAULTS: each thread stops at its 300th request and leaves it unanswered) would leave
/// the callers on its CPU waiting forever. The daemon stops instead: it commits what it
/// received, releases the lease and exits with status 14, so the kernel aborts the connection.
/// The writer gets an error and returns, every file it fsynced before is in the last
/// generation, and a new mount takes the workspace at once (no --takeover, no lease wait).
#[test]
fn a_mount_whose_queue_stops_commits_and_exits_instead_of_hanging() {
    let param = "/sys/module/fuse/parameters/enable_uring";
    if !Path::new(param).exists() || std::env::var("OWFS_TEST_URING").is_ok_and(|v| v == "off") {
        eprintln!("skipped: no {param} here, or OWFS_TEST_URING=off");
        return;
    }
    for c in Case::all() {
        let mut daemon = c
            .mount_cmd(
                "qs",
                "mnt",
                &[],
                &["-f"],
                &[("OWFS_FAULTS", "uring_stop_after=300")],
            )
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let at = c.dir("mnt");
        let t0 = std::time::Instant::now();
        while !owfs_tests::is_mounted(&at) {
            assert!(daemon.try_wait().unwrap().is_none(), "the mount failed");
            assert!(t0.elapsed().as_secs() < 60, "not mounted in 60 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let script = r#"
import os, sys
for i in range(5000):
    try:
        with open(os.path.join(sys.argv[1], "f%d" % i), "wb") as f:
            f.write(b"file %d\n" % i * 100)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        print("error", e.errno, flush=True)
        sys.exit(0)
    print("fsynced", i, flush=True)
"#;
        let mut w = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&at)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        let code = loop {
            if let Some(st) = daemon.try_wait().unwrap() {
                break st.code();
            }
            if t0.elapsed().as_secs() > 90 {
                kill_and_detach(daemon.id() as i32, &at);
                let _ = w.kill();
                panic!("the daemon neither served nor stopped in 90 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut log = String::new();
        daemon
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        assert_eq!(code, Some(14), "daemon log:\n{log}");
        assert!(log.contains("STOPPING: io_uring queue"), "{log}");
        assert!(log.contains("lease released"), "{log}");
        // The writer's unanswered request ended with the connection.
        let out = w.wait_with_output().unwrap();
        let out = String::from_utf8(out.stdout).unwrap();
        let last = out.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error "),
            "the writer did not end on an error: {last:?}"
        );
        let fsynced = out.lines().filter(|l| l.starts_with("fsynced ")).count();
        assert!(fsynced > 0 && fsynced < 5000, "{fsynced} files fsynced");
        let _ = std::process::Command::new("umount").arg(&at).status();
        // No lease to wait for: this mount would fail with status 11 if it were still held.
        let m = c.mount_rw("qs", "mnt2", &[]);
        for i in 0..fsynced {
            let want = format!("file {i}\n").repeat(100);
            let got = std::fs::read_to_string(m.path(&format!("f{i}"))).unwrap_or_default();
            assert!(
                got == want,
                "f{i}, fsynced before the stop, is not in the last generation"
            );
        }
        m.umount();
    }
}

/// A name that does not exist is asked for once: the daemon answers a negative entry the
/// kernel keeps, so probing the same missing path again (as interpreters and `git` do) costs
/// no request. Every way a name comes into being or goes through this kernel, which updates
/// the cached dentry: the names read back as on a local disk and the generation holds them.
#[test]
fn a_missing_name_is_asked_for_once() {
    let c = Case::file();
    let m = c.mount_rw("neg", "mnt", &[]);
    std::fs::create_dir(m.path("d")).unwrap();
    let lookups = |m: &owfs_tests::RwMount| m.status()["fuse_requests"]["lookup"].as_u64().unwrap();
    let probe = |name: &str| std::fs::symlink_metadata(m.path(name)).map(|_| ());
    let before = lookups(&m);
    for _ in 0..100 {
        for name in ["d/a", "d/b", "d/c", "d/e", "d/s"] {
            assert_eq!(
                probe(name).unwrap_err().kind(),
                std::io::ErrorKind::NotFound
            );
        }
    }
    let asked = lookups(&m) - before;
    assert!(
        asked <= 5,
        "500 probes of 5 missing names sent {asked} LOOKUPs"
    );
    // Each cached negative name comes into being in another way.
    std::fs::write(m.path("d/a"), b"file").unwrap();
    std::fs::create_dir(m.path("d/b")).unwrap();
    std::os::unix::fs::symlink("a", m.path("d/s")).unwrap();
    std::fs::hard_link(m.path("d/a"), m.path("d/e")).unwrap();
    std::fs::rename(m.path("d/e"), m.path("d/c")).unwrap();
    assert_eq!(std::fs::read(m.path("d/a")).unwrap(), b"file");
    assert!(m.path("d/b").is_dir());
    assert_eq!(std::fs::read(m.path("d/s")).unwrap(), b"file");
    assert_eq!(std::fs::read(m.path("d/c")).unwrap(), b"file");
    assert_eq!(
        probe("d/e").unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    // And goes again.
    std::fs::remove_file(m.path("d/a")).unwrap();
    assert_eq!(
        probe("d/a").unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path("d/a"))
        .is_ok());
    let mut names: Vec<_> = std::fs::read_dir(m.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c", "s"]);
    let g = m.umount();
    assert_eq!(c.cat("neg", g, "d/c").unwrap(), b"file");
    assert_eq!(c.cat("neg", g, "d/a").unwrap(), b"");
    assert!(c.cat("neg", g, "d/e").is_err());
}

/// The kernel's readahead on the mount is `-o read_ahead_kb=` (default 4 MiB, not the kernel's
/// 128 KiB): sequential reads of files not yet local fetch ahead in large requests. A mount
/// right after `owfs umount` on the same cache directory waits for the old daemon's cleanup
/// instead of failing; a second mount of a cache directory in use fails at once.
#[test]
fn the_mount_reads_ahead_as_configured() {
    let bdi_ra = |m: &owfs_tests::RwMount| {
        let dev = std::fs::metadata(&m.at).unwrap().dev();
        let (maj, min) = (rustix::fs::major(dev), rustix::fs::minor(dev));
        std::fs::read_to_string(format!("/sys/class/bdi/{maj}:{min}/read_ahead_kb"))
            .unwrap()
            .trim()
            .to_string()
    };
    let c = Case::file();
    let m = c.mount_rw("ra", "mnt", &[]);
    assert_eq!(bdi_ra(&m), "4096");
    std::fs::write(m.path("f"), noise(3 << 20, 9)).unwrap();
    let lock = m.cache.join("lock");
    let note = std::fs::read_to_string(&lock).unwrap();
    assert!(note.ends_with(" serving\n"), "{note:?}");

    let mut other = c.owfs_cmd(
        &[
            "mount",
            "ra2",
            c.dir("mnt2").to_str().unwrap(),
            "--cache-dir",
            m.cache.to_str().unwrap(),
        ],
        &[],
    );
    std::fs::create_dir_all(c.dir("mnt2")).unwrap();
    let out = other.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{err}");
    assert!(err.contains("is in use by another owfs mount"), "{err}");

    m.umount();
    let m = c.mount_rw("ra", "mnt", &["read_ahead_kb=512"]);
    assert_eq!(bdi_ra(&m), "512");
    assert_eq!(std::fs::read(m.path("f")).unwrap(), noise(3 << 20, 9));
}

/// `owfs mount` returns once the mount serves, and so does a caller that reads its output to
/// the end: the daemon keeps no descriptor of its caller's open (here fd 9, a second copy of
/// the pipe the caller reads, left open across exec as shells and supervisors do).
#[test]
fn the_daemon_keeps_none_of_its_callers_descriptors() {
    let c = Case::file();
    let owfs = c.mount_cmd("fd", "mnt", &[], &[], &[]);
    let mut sh = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#""$@" 9>&1"#)
        .arg("bash")
        .arg(owfs.get_program())
        .args(owfs.get_args())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = sh.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(60));
    let m = c.rw_handle("fd", "mnt");
    let status = sh.wait().unwrap();
    let printed = got
        .expect("the caller's pipe stayed open after `owfs mount` returned: the daemon holds it");
    assert!(status.success(), "owfs mount failed: {printed}");
    assert!(printed.contains("mounted fd on"), "{printed}");
    std::fs::write(m.path("f"), b"x").unwrap();
    m.umount();
}

/// Small files live in the daemon's memory, larger ones in cache files, of which the daemon
/// keeps a bounded number open: a workspace may hold many more files than the daemon may
/// open (here 256 descriptors for 700 files of each kind), and every byte still reads back,
/// reaches the store and survives a fresh mount.
#[test]
fn more_files_than_the_daemon_may_open() {
    use std::os::unix::process::CommandExt;
    for c in Case::all() {
        let mut cmd = c.mount_cmd("ws", "mnt", &["commit_interval_ms=200"], &[], &[]);
        // SAFETY: setrlimit between fork and exec touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                let lim = rustix::process::Rlimit {
                    current: Some(256),
                    maximum: Some(256),
                };
                rustix::process::setrlimit(rustix::process::Resource::Nofile, lim)?;
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}: mount: {}",
            c.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let m = c.rw_handle("ws", "mnt");
        let body = |i: usize| {
            // Small (in memory) and large (past 64 KiB: a cache file) in turn.
            let len = if i.is_multiple_of(2) {
                100 + i
            } else {
                (64 << 10) + i
            };
            noise(len, i as u64)
        };
        const N: usize = 1400;
        for i in 0..N {
            std::fs::write(m.path(&format!("f{i}")), body(i)).unwrap();
        }
        // Rewrite the start of every file: every cache file is opened again.
        for i in 0..N {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(m.path(&format!("f{i}")))
                .unwrap();
            f.write_all_at(b"rewritten", 0).unwrap();
        }
        let expect = |i: usize| {
            let mut b = body(i);
            b[..9].copy_from_slice(b"rewritten");
            b
        };
        rustix::fs::sync();
        std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
        for i in 0..N {
            let got = std::fs::read(m.path(&format!("f{i}"))).unwrap();
            assert!(got == expect(i), "{}: f{i} reads back wrong", c.name);
        }
        let fds = std::fs::read_dir(format!("/proc/{}/fd", m.daemon_pid()))
            .unwrap()
            .count();
        assert!(fds < 256, "{}: the daemon holds {fds} descriptors", c.name);
        let n = m.sync();
        let out = c.restore(&format!("{}@{}", "ws", n), "restored");
        for i in (0..N).step_by(7) {
            let got = std::fs::read(out.join(format!("f{i}"))).unwrap();
            assert!(got == expect(i), "{}: restored f{i} differs", c.name);
        }
        m.umount();
        let m = c.mount_rw("ws", "again", &[]);
        for i in (0..N).step_by(5) {
            let got = std::fs::read(m.path(&format!("f{i}"))).unwrap();
            assert!(
                got == expect(i),
                "{}: f{i} on a fresh mount differs",
                c.name
            );
        }
        m.umount();
    }
}
