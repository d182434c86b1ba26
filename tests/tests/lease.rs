//! One writer per workspace: two nodes on one machine (two daemons, two cache directories,
//! two mount points) against one store. A held workspace is refused or waited for; a zombie
//! and a partitioned node stop before another node takes over and nothing they do afterwards
//! reaches the history; a planned handoff loses nothing.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use owfs_tests::{is_mounted, kill_and_detach, send_signal, Case, Watchdog};

/// A lease short enough for tests: 3 s, renewed every 500 ms, writes stop 1 s before expiry.
const FAST: &[&str] = &[
    "lease_ttl_ms=3000",
    "lease_renew_ms=500",
    "lease_margin_ms=1000",
    "lease_skew_ms=200",
];

fn opts(extra: &[&'static str]) -> Vec<&'static str> {
    FAST.iter().chain(extra.iter()).copied().collect()
}

/// A daemon run in the foreground as our child, so that its exit status can be checked.
struct Daemon {
    child: Child,
    at: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(
        c: &Case,
        ws: &str,
        name: &str,
        o: &[&str],
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let flags: Vec<&str> = flags.iter().copied().chain(["-f"]).collect();
        let at = c.dir(name);
        let log = c.dir(&format!("{name}.log"));
        let child = c
            .mount_cmd(ws, name, o, &flags, env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon { child, at, log };
        let t0 = Instant::now();
        while !is_mounted(&d.at) {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("[{}] daemon exited ({st}):\n{}", c.name, d.log_text());
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "mount not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon stops by itself with status 13 (lease lost).
    fn expect_lease_lost_exit(&mut self, case: &str) {
        let code = self.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(13), "[{case}] exit status:\n{}", self.log_text());
    }

    /// Waits for the daemon to exit by itself; returns its status code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(
                t0.elapsed() < within,
                "the daemon did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            send_signal(self.pid(), 18);
            kill_and_detach(self.pid(), &self.at);
            let _ = self.child.wait();
        }
        if is_mounted(&self.at) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.at)
                .status();
        }
    }
}

/// Every generation of `ws`: (number, epoch, kind), oldest first.
/// Epochs never go down along the history.
fn assert_epochs_monotonic(h: &[(u64, u64, String)]) {
    for w in h.windows(2) {
        assert!(
            w[1].1 >= w[0].1,
            "epoch went down from generation {} to {}: {h:?}",
            w[0].0,
            w[1].0
        );
    }
}

fn write_fails(path: &Path) -> Option<i32> {
    match std::fs::write(path, b"written after the loss") {
        Ok(()) => None,
        Err(e) => Some(e.raw_os_error().unwrap_or(-1)),
    }
}

#[test]
fn a_held_workspace_is_refused_waited_for_and_taken_after_expiry() {
    for c in Case::all() {
        let a = c.mount_rw("w", "a", &opts(&[]));
        std::fs::write(a.path("a.txt"), b"from A").unwrap();
        let pid_a = a.daemon_pid();

        // Refused at once, naming the holder and the expiry.
        let out = c
            .mount_cmd("w", "b", &opts(&[]), &[], &[])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(11), "[{}] {err}", c.name);
        assert!(
            err.contains(&format!("pid {pid_a}")) && err.contains("expires in"),
            "[{}] the refusal names the holder and its expiry: {err}",
            c.name
        );
        assert!(!is_mounted(&c.dir("b")));
        let st = c.json(&["status", "w"]);
        assert_eq!(st["lease"]["holder"]["pid"].as_i64(), Some(pid_a as i64));
        let epoch_a = st["lease"]["epoch"].as_u64().unwrap();

        // --wait: proceeds as soon as A hands off, and sees A's last write.
        let waiter = {
            let mut cmd = c.mount_cmd("w", "b", &opts(&[]), &["--wait=60s"], &[]);
            std::thread::spawn(move || cmd.output().unwrap())
        };
        std::thread::sleep(Duration::from_millis(500));
        let t_release = Instant::now();
        a.umount();
        let out = waiter.join().unwrap();
        assert!(
            out.status.success(),
            "[{}] --wait: {}",
            c.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let pause = t_release.elapsed();
        assert!(pause < Duration::from_secs(5), "handoff pause {pause:?}");
        let b = c.rw_handle("w", "b");
        assert_eq!(std::fs::read(b.path("a.txt")).unwrap(), b"from A");
        let st = b.status();
        assert_eq!(st["lease"]["epoch"].as_u64(), Some(epoch_a + 1));
        // A released its lease: B needed no fence.
        assert!(c.history("w").iter().all(|g| g.2 != "fence"));
        std::fs::write(b.path("b.txt"), b"from B").unwrap();
        b.sync();

        // B dies without releasing: C waits for the expiry, then fences B out.
        let pid_b = b.daemon_pid();
        kill_and_detach(pid_b, &b.at);
        drop(b);
        let t0 = Instant::now();
        let m = c.mount_rw_with("w", "c", &opts(&[]), &["--wait=60s"]);
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(1500),
            "took over a live lease after {waited:?}"
        );
        assert_eq!(std::fs::read(m.path("b.txt")).unwrap(), b"from B");
        let h = c.history("w");
        let last = h.last().unwrap();
        assert_eq!(last.2, "fence", "[{}] {h:?}", c.name);
        assert_eq!(last.1, epoch_a + 2);
        assert_epochs_monotonic(&h);
        m.umount();
        eprintln!(
            "[{}] refused while held; --wait after handoff: {pause:?}; takeover after expiry: {waited:?}",
            c.name
        );
    }
}

#[test]
fn a_zombie_is_fenced_and_stops() {
    // Hung once in CI (uring=off, all 14 minutes): the watchdog says where.
    let dog = Watchdog::new("a_zombie_is_fenced_and_stops", Duration::from_secs(120));
    for c in Case::all() {
        dog.step(format!("[{}] start A", c.name));
        let marker = c.dir("hook-ran");
        let hook = format!(
            "on_lease_loss=echo $OWFS_REASON > {}; sleep 2",
            marker.display()
        );
        let mut o = opts(&[]);
        let hook_static: &'static str = Box::leak(hook.into_boxed_str());
        o.push(hook_static);
        let mut a = Daemon::start(&c, "z", "a", &o, &[], &[]);
        dog.attach(&a.log);
        dog.step(format!("[{}] A: write and sync", c.name));
        std::fs::write(a.at.join("before"), b"A, before the stop").unwrap();
        c.ok(&["sync", a.at.to_str().unwrap()]);
        // A keeps writing: a workload appending to a file (its requests block while A is
        // stopped and fail once A resumes). It runs in its own process, not in a thread of
        // this one: a file this process holds open on A's mount would be inherited by the
        // `owfs mount` spawned for B below, whose exec closes it, and that close waits on a
        // FLUSH that stopped A never answers: B never starts and the test hangs (it did, in
        // CI, until the workload moved out).
        let writer = std::process::Command::new("sh")
            .args([
                "-c",
                "n=0; while echo $n >> \"$1\"; do n=$((n+1)); sleep 0.005; done; echo $n",
                "sh",
            ])
            .arg(a.at.join("stream"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));

        send_signal(a.pid(), 19); // SIGSTOP: A is a zombie from now on
        dog.step(format!("[{}] B: mount with --wait", c.name));
        let b = c.mount_rw_with("z", "b", &opts(&[]), &["--wait=60s"]);
        assert_eq!(
            std::fs::read(b.path("before")).unwrap(),
            b"A, before the stop"
        );
        dog.step(format!("[{}] B: write, status, sync", c.name));
        std::fs::write(b.path("b.txt"), b"from B").unwrap();
        let fence_epoch = b.status()["lease"]["epoch"].as_u64().unwrap();
        b.sync();

        dog.step(format!("[{}] A continued: a write fails", c.name));
        send_signal(a.pid(), 18); // SIGCONT
        std::thread::sleep(Duration::from_millis(300));
        // The hook is still sleeping: the daemon is alive and answers EIO.
        let errno = write_fails(&a.at.join("after"));
        assert_eq!(
            errno,
            Some(libc_eio()),
            "[{}] A's write after the takeover (A mounted: {}); A's log:\n{}",
            c.name,
            is_mounted(&a.at),
            a.log_text()
        );
        dog.step(format!("[{}] A exits", c.name));
        a.expect_lease_lost_exit(c.name);
        dog.step(format!("[{}] the workload's process ends", c.name));
        let out = writer.wait_with_output().unwrap();
        let wrote: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert!(
            wrote > 0 && !out.stderr.is_empty(),
            "[{}] the workload's writes failed after {wrote}: {}",
            c.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let reason = std::fs::read_to_string(&marker).unwrap_or_default();
        assert!(!reason.trim().is_empty(), "the hook ran with OWFS_REASON");

        // Nothing from A after B's fence; epochs never go down.
        dog.step(format!("[{}] history", c.name));
        let h = c.history("z");
        assert_epochs_monotonic(&h);
        let fence = h.iter().find(|g| g.2 == "fence").expect("a fence");
        assert_eq!(fence.1, fence_epoch);
        assert!(h
            .iter()
            .filter(|g| g.0 > fence.0)
            .all(|g| g.1 >= fence_epoch));
        assert!(!b.path("after").exists());
        dog.step(format!("[{}] B: umount", c.name));
        b.umount();
        eprintln!("[{}] zombie fenced; history {h:?}", c.name);
    }
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn a_partitioned_node_stops_before_its_lease_can_expire() {
    for c in Case::all() {
        let cut = c.dir("partition");
        let faults = format!("down_file={}", cut.display());
        let mut a = Daemon::start(&c, "p", "a", &opts(&[]), &[], &[("OWFS_FAULTS", &faults)]);
        std::fs::write(a.at.join("x"), b"before the partition").unwrap();
        c.ok(&["sync", a.at.to_str().unwrap()]);

        // Cut A off from the store. Its last successful renewal is before now, so its lease
        // expires at most ttl (3 s) from now: A must stop serving before that.
        std::fs::write(&cut, b"").unwrap();
        let t0 = Instant::now();
        let stopped = loop {
            if write_fails(&a.at.join("y")).is_some() {
                break t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "A kept serving");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            stopped < Duration::from_millis(3000),
            "[{}] A stopped {stopped:?} after the partition, after its lease could have expired",
            c.name
        );
        a.expect_lease_lost_exit(c.name);

        // B takes over cleanly once A's lease expired.
        let b = c.mount_rw_with("p", "b", &opts(&[]), &["--wait=60s"]);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(2500),
            "B took over after {took:?}"
        );
        assert_eq!(std::fs::read(b.path("x")).unwrap(), b"before the partition");
        std::fs::write(b.path("z"), b"B").unwrap();
        b.sync();
        assert_epochs_monotonic(&c.history("p"));
        b.umount();
        eprintln!(
            "[{}] partitioned A stopped after {stopped:?}; B took over after {took:?}",
            c.name
        );
    }
}

const WORKLOAD: &str = r#"
import os, sys
path = os.path.join(sys.argv[1], "files", "log")
i = 0
while True:
    i += 1
    try:
        with open(path, "a") as f:
            f.write(f"{i}\n")
    except OSError:
        break
    print(i, flush=True)
"#;

#[test]
fn a_planned_handoff_under_a_running_workload_loses_nothing() {
    // The default lease (30 s): a handoff releases it, so nothing here waits for an expiry,
    // and the 3 s test lease stopped node A once when a renewal on this loaded
    // machine's file:// store took longer than the 1.5 s it leaves.
    for c in Case::all() {
        let a = c.mount_rw("h", "a", &[]);
        std::fs::create_dir(a.path("files")).unwrap();
        let mut w = std::process::Command::new("python3")
            .arg("-c")
            .arg(WORKLOAD)
            .arg(&a.at)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = w.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut last = 0u64;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                last = line.trim().parse().unwrap_or(last);
            }
            last
        });
        std::thread::sleep(Duration::from_millis(1500));
        let waiter = {
            let mut cmd = c.mount_cmd("h", "b", &[], &["--wait=60s"], &[]);
            std::thread::spawn(move || cmd.output().unwrap())
        };
        let t0 = Instant::now();
        let v = c.json(&["handoff", a.at.to_str().unwrap()]);
        let handoff = t0.elapsed();
        std::mem::forget(a); // unmounted by the handoff
        let out = waiter.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pause = t0.elapsed();
        let _ = w.wait();
        let last = reader.join().unwrap();
        assert!(last > 0, "the workload ran");
        let b = c.rw_handle("h", "b");
        let log = std::fs::read_to_string(b.path("files/log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(
            lines.last().copied(),
            Some(last.to_string().as_str()),
            "[{}] the workload's last write before the handoff is on B",
            c.name
        );
        assert_eq!(lines.len() as u64, last, "every write is there once");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(b.path("files/log"))
            .unwrap();
        f.write_all(b"B\n").unwrap();
        drop(f);
        b.umount();
        eprintln!(
            "[{}] handoff of {last} writes: `owfs handoff` {handoff:?}, until B mounted {pause:?}; {v}",
            c.name
        );
    }
}

#[test]
fn a_takeover_before_expiry_fences_the_holder_out() {
    for c in Case::all() {
        let mut a = Daemon::start(&c, "t", "a", &opts(&[]), &[], &[]);
        std::fs::write(a.at.join("a1"), b"A").unwrap();
        c.ok(&["sync", a.at.to_str().unwrap()]);
        let t0 = Instant::now();
        let b = c.mount_rw_with("t", "b", &opts(&[]), &["--takeover"]);
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "--takeover does not wait"
        );
        assert_eq!(std::fs::read(b.path("a1")).unwrap(), b"A");
        // What A writes now is never committed: its next renewal or commit finds the lease
        // taken, and it stops.
        let late = std::fs::write(a.at.join("a2"), b"late");
        a.expect_lease_lost_exit(c.name);
        let h = c.history("t");
        assert_epochs_monotonic(&h);
        let fence = h.iter().find(|g| g.2 == "fence").expect("a fence").clone();
        assert!(
            h.iter().filter(|g| g.0 > fence.0).all(|g| g.1 == fence.1),
            "{h:?}"
        );
        std::fs::write(b.path("b1"), b"B").unwrap();
        b.sync();
        assert!(
            !b.path("a2").exists(),
            "[{}] A's late write ({late:?}) reached the store",
            c.name
        );
        b.umount();
    }
}

#[test]
fn a_pre_pulled_node_reads_the_workspace_locally_after_the_handoff() {
    for c in Case::all() {
        let a = c.mount_rw("pp", "a", &[]);
        let big = owfs_tests::noise(24 << 20, 11);
        std::fs::write(a.path("big"), &big).unwrap();
        a.sync();
        // B pre-pulls while A still serves (no lease taken: A goes on).
        let cache_b = c.dir("b.cache");
        let v = c.json(&[
            "mount",
            "--prefetch-only",
            "pp",
            "--cache-dir",
            cache_b.to_str().unwrap(),
        ]);
        assert!(v["bytes_fetched"].as_u64().unwrap() >= 24 << 20, "{v}");
        assert_eq!(a.status()["failed"], serde_json::json!(false));
        // The delta after the pre-pull.
        std::fs::write(a.path("delta"), b"written after the pre-pull").unwrap();
        a.umount();

        let b = c.mount_rw("pp", "b", &["prefetch=0"]);
        let before = b.status()["requests"]["bytes_got"].as_u64().unwrap();
        assert!(std::fs::read(b.path("big")).unwrap() == big);
        assert_eq!(
            std::fs::read(b.path("delta")).unwrap(),
            b"written after the pre-pull"
        );
        let got = b.status()["requests"]["bytes_got"].as_u64().unwrap() - before;
        assert!(
            got < 1 << 20,
            "[{}] B fetched {got} bytes from the store for a pre-pulled 24 MiB file",
            c.name
        );
        b.umount();
        // Dropped after the answer to umount (so as not to lengthen the handoff).
        let t0 = Instant::now();
        while cache_b.join("blobs").exists() && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !cache_b.join("blobs").exists(),
            "the pre-pull is dropped after use"
        );
    }
}
