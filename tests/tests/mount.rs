//! The read-write mount: what a program does through it is what lands in the store, each
//! generation is a prefix of the writes, and a fresh node sees the same workspace.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use owfs_tests::{assert_same_tree, kill_and_detach, noise, run_as, scan, send_signal, Case};
use rand::{Rng, SeedableRng};

fn restore_latest(c: &Case, ws: &str, name: &str) -> PathBuf {
    let out = c.dir(name);
    c.ok(&["restore", ws, out.to_str().unwrap()]);
    out
}

fn restore_gen(c: &Case, ws: &str, n: u64, name: &str) -> PathBuf {
    let out = c.dir(name);
    c.ok(&["restore", &format!("{ws}@{n}"), out.to_str().unwrap()]);
    out
}

#[test]
fn what_a_program_writes_is_what_the_store_holds() {
    for c in Case::all() {
        let m = c.mount_rw("ws", "mnt", &[]);
        let p = |r: &str| m.path(r);
        std::fs::create_dir_all(p("files/deep/er")).unwrap();
        std::fs::write(p("files/a.txt"), b"alpha\n").unwrap();
        std::fs::write(p("files/deep/er/big.bin"), noise(3 << 20, 7)).unwrap();
        std::fs::write(p("empty"), b"").unwrap();
        // Sparse: a hole then data.
        let f = std::fs::File::create(p("sparse")).unwrap();
        f.write_all_at(b"tail", 5 << 20).unwrap();
        drop(f);
        std::os::unix::fs::symlink("files/a.txt", p("link")).unwrap();
        std::fs::hard_link(p("files/a.txt"), p("hard")).unwrap();
        std::fs::set_permissions(p("files/a.txt"), std::fs::Permissions::from_mode(0o4751))
            .unwrap();
        rustix::fs::chown(
            p("empty"),
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(4321)),
        )
        .unwrap();
        rustix::fs::setxattr(
            p("empty"),
            "user.tag",
            b"v1",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        // Rename over an existing file, of a directory, and unlink of an open file.
        std::fs::write(p("new"), b"new content").unwrap();
        std::fs::write(p("old"), b"old content").unwrap();
        std::fs::rename(p("new"), p("old")).unwrap();
        std::fs::rename(p("files/deep"), p("moved")).unwrap();
        let mut open = std::fs::File::create(p("gone")).unwrap();
        std::fs::remove_file(p("gone")).unwrap();
        open.write_all(b"still writable").unwrap();
        open.seek(SeekFrom::Start(0)).unwrap();
        let mut back = String::new();
        std::fs::File::open("/proc/self/fd/".to_string() + &open_fd(&open))
            .unwrap()
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, "still writable");
        drop(open);
        // A database and its node-local shared-memory file.
        std::fs::write(p("app.db-shm"), b"node-local").unwrap();
        let times = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 5,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1_234_567_890,
                tv_nsec: 123_456_789,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            p("files/a.txt"),
            &times,
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();

        let n = m.sync();
        let restored = restore_latest(&c, "ws", "restored");
        assert!(
            !restored.join("app.db-shm").exists(),
            "-shm files stay on the node"
        );
        std::fs::remove_file(p("app.db-shm")).unwrap();
        assert_same_tree(&m.at, &restored);
        assert_eq!(std::fs::read(restored.join("old")).unwrap(), b"new content");
        assert_eq!(
            std::fs::metadata(restored.join("sparse")).unwrap().len(),
            (5 << 20) + 4
        );

        // A second node: empty cache, same workspace, same tree.
        let last = m.umount();
        assert!(last >= n);
        let m2 = c.mount_rw("ws", "mnt2", &["prefetch=0"]);
        assert_same_tree(&m2.at, &restored);
        // Idle: reading everything commits nothing.
        let _ = scan(&m2.at);
        assert_eq!(
            m2.umount(),
            last,
            "[{}] an idle mount made a generation",
            c.name
        );
    }
}

fn open_fd(f: &std::fs::File) -> String {
    use std::os::fd::AsRawFd;
    f.as_raw_fd().to_string()
}

type Op = Box<dyn Fn(&Path) -> std::io::Result<()>>;

/// One random operation, applied the same way to the mount and to a plain directory.
fn random_op(rng: &mut rand::rngs::StdRng, roots: [&Path; 2], names: &mut Vec<String>) -> String {
    let pick = |rng: &mut rand::rngs::StdRng, names: &Vec<String>| -> Option<String> {
        (!names.is_empty()).then(|| names[rng.random_range(0..names.len())].clone())
    };
    let dirs = ["", "d1/", "d1/d2/", "d3/"];
    let fresh = |rng: &mut rand::rngs::StdRng| {
        format!(
            "{}f{}",
            dirs[rng.random_range(0..dirs.len())],
            rng.random_range(0..40)
        )
    };
    let op = rng.random_range(0..100);
    let desc;
    let apply: Op = match op {
        0..=29 => {
            let name = pick(rng, names)
                .filter(|_| rng.random_bool(0.7))
                .unwrap_or_else(|| fresh(rng));
            let off = rng.random_range(0..(3u64 << 20));
            let len = rng.random_range(1..300_000usize);
            let data = noise(len, rng.random());
            desc = format!("write {name} at {off} len {len}");
            if !names.contains(&name) {
                names.push(name.clone());
            }
            Box::new(move |r| {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(r.join(&name))?;
                f.write_all_at(&data, off)
            })
        }
        30..=39 => {
            let Some(name) = pick(rng, names) else {
                return "noop".into();
            };
            let len = rng.random_range(0..(4u64 << 20));
            desc = format!("truncate {name} to {len}");
            Box::new(move |r| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(r.join(&name))?
                    .set_len(len)
            })
        }
        40..=49 => {
            let Some(name) = pick(rng, names) else {
                return "noop".into();
            };
            let data = noise(rng.random_range(0..100_000), rng.random());
            desc = format!("append {} to {name}", data.len());
            Box::new(move |r| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(r.join(&name))?
                    .write_all(&data)
            })
        }
        50..=59 => {
            let (Some(a), b) = (pick(rng, names), fresh(rng)) else {
                return "noop".into();
            };
            desc = format!("rename {a} -> {b}");
            names.retain(|n| *n != a);
            if !names.contains(&b) {
                names.push(b.clone());
            }
            Box::new(move |r| std::fs::rename(r.join(&a), r.join(&b)))
        }
        60..=66 => {
            let Some(name) = pick(rng, names) else {
                return "noop".into();
            };
            names.retain(|n| *n != name);
            desc = format!("unlink {name}");
            Box::new(move |r| std::fs::remove_file(r.join(&name)))
        }
        67..=74 => {
            let Some(name) = pick(rng, names) else {
                return "noop".into();
            };
            let mode = [0o600, 0o644, 0o755, 0o4755, 0o640][rng.random_range(0..5)];
            desc = format!("chmod {name} {mode:o}");
            Box::new(move |r| {
                std::fs::set_permissions(r.join(&name), std::fs::Permissions::from_mode(mode))
            })
        }
        75..=79 => {
            let (Some(a), b) = (pick(rng, names), fresh(rng)) else {
                return "noop".into();
            };
            if names.contains(&b) {
                return "noop".into();
            }
            names.push(b.clone());
            desc = format!("link {a} {b}");
            Box::new(move |r| std::fs::hard_link(r.join(&a), r.join(&b)))
        }
        80..=84 => {
            let b = fresh(rng);
            if names.contains(&b) {
                return "noop".into();
            }
            desc = format!("symlink {b}");
            let target = format!("target-{}", rng.random_range(0..9));
            Box::new(move |r| std::os::unix::fs::symlink(&target, r.join(&b)))
        }
        _ => {
            let Some(name) = pick(rng, names) else {
                return "noop".into();
            };
            let secs = rng.random_range(1_000_000_000..1_900_000_000i64);
            desc = format!("utimes {name} {secs}");
            Box::new(move |r| {
                let ts = rustix::fs::Timespec {
                    tv_sec: secs,
                    tv_nsec: 17,
                };
                rustix::fs::utimensat(
                    rustix::fs::CWD,
                    r.join(&name),
                    &rustix::fs::Timestamps {
                        last_access: ts,
                        last_modification: ts,
                    },
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(Into::into)
            })
        }
    };
    let ra = apply(roots[0]).map_err(|e| e.kind());
    let rb = apply(roots[1]).map_err(|e| e.kind());
    assert_eq!(ra, rb, "{desc}: mount and plain directory disagree");
    desc
}

/// Content, size, mode, type and listings (times differ by construction: each side stamps
/// its own clock; the round-trip test checks that times are kept).
fn assert_same_files(a: &Path, b: &Path, step: &str) {
    let (sa, la) = scan(a);
    let (sb, lb) = scan(b);
    let names = |s: &std::collections::BTreeMap<Vec<u8>, owfs_tests::Seen>| {
        s.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&sa), names(&sb), "after {step}: listings differ");
    for (k, va) in &sa {
        let vb = &sb[k];
        let name = String::from_utf8_lossy(k);
        assert_eq!(va.kind, vb.kind, "after {step}: type of {name}");
        assert_eq!(va.mode, vb.mode, "after {step}: mode of {name}");
        assert!(
            va.content == vb.content,
            "after {step}: content of {name} differs ({} vs {} bytes)",
            va.content.len(),
            vb.content.len()
        );
    }
    assert_eq!(la, lb, "after {step}: hard-link groups differ");
}

#[test]
fn differential_random_operations_against_a_plain_directory() {
    let steps: usize = std::env::var("OWFS_DIFF_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    for (i, c) in Case::all().into_iter().enumerate() {
        let seed = 0x5eed + i as u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Commits run often, so writes race with uploads (the copy-on-write path).
        let m = c.mount_rw("diff", "mnt", &["commit_interval_ms=30"]);
        let plain = c.dir("plain");
        for d in ["d1/d2", "d3"] {
            std::fs::create_dir_all(m.path(d)).unwrap();
            std::fs::create_dir_all(plain.join(d)).unwrap();
        }
        let mut names = Vec::new();
        let mut log = Vec::new();
        for step in 0..steps {
            let desc = random_op(&mut rng, [&m.at, &plain], &mut names);
            log.push(desc.clone());
            assert_same_files(&m.at, &plain, &format!("step {step} ({desc}), seed {seed}"));
            if step % 50 == 49 {
                // The generation `sync` names holds exactly the state at that moment.
                let n = m.sync();
                let out = restore_gen(&c, "diff", n, &format!("gen-{step}"));
                assert_same_files(
                    &out,
                    &plain,
                    &format!("generation {n} at step {step}, seed {seed}"),
                );
            }
        }
        m.umount();
        let m2 = c.mount_rw("diff", "mnt2", &[]);
        assert_same_files(&m2.at, &plain, &format!("remount, seed {seed}"));
        eprintln!(
            "[{}] {} steps, seed {seed}: mount == plain directory",
            c.name,
            log.len()
        );
    }
}

/// Every committed generation is a prefix of the writes: a file written block by block (each
/// block stamped with its step, each step fsynced) shows, in every generation, exactly the
/// state after some step k.
#[test]
fn every_generation_is_a_prefix_of_the_writes() {
    const BLOCK: usize = 4096;
    const BLOCKS: u64 = 512;
    for c in Case::all() {
        let m = c.mount_rw("prefix", "mnt", &["commit_interval_ms=20"]);
        let first = m.sync();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(m.path("log.bin"))
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        let mut order: Vec<u64> = Vec::new(); // step -> block
        let t0 = std::time::Instant::now();
        let mut step: u64 = 0;
        while t0.elapsed() < std::time::Duration::from_secs(3) {
            step += 1;
            let b = rng.random_range(0..BLOCKS);
            let mut buf = vec![0u8; BLOCK];
            for chunk in buf.chunks_mut(8) {
                chunk.copy_from_slice(&step.to_le_bytes());
            }
            f.write_all_at(&buf, b * BLOCK as u64).unwrap();
            f.sync_data().unwrap();
            order.push(b);
        }
        let last = m.sync();
        drop(f);
        assert!(
            last > first + 3,
            "[{}] too few generations ({first}..{last}) to test",
            c.name
        );
        let mut checked = 0;
        // Up to 8 generations spread over the run: each `cat` is a process and a fetch.
        let stride = ((last - first) / 8).max(1);
        for n in ((first + 1)..=last).step_by(stride as usize) {
            let Ok(bytes) = read_gen_file(&c, "prefix", n, "log.bin") else {
                continue;
            };
            // The newest step present decides k; the file must equal the state after k.
            let stamps: Vec<u64> = (0..BLOCKS as usize)
                .map(|i| {
                    let o = i * BLOCK;
                    if o + 8 <= bytes.len() {
                        u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap())
                    } else {
                        0
                    }
                })
                .collect();
            let k = *stamps.iter().max().unwrap();
            let mut expect = vec![0u64; BLOCKS as usize];
            for (s, b) in order.iter().enumerate().take(k as usize) {
                expect[*b as usize] = s as u64 + 1;
            }
            let max_block = order[..k as usize].iter().max().map(|b| b + 1).unwrap_or(0);
            assert_eq!(
                bytes.len() as u64,
                max_block * BLOCK as u64,
                "[{}] generation {n}: size",
                c.name
            );
            assert_eq!(
                stamps, expect,
                "[{}] generation {n} is not the state after step {k}",
                c.name
            );
            for (i, blk) in bytes.chunks(BLOCK).enumerate() {
                let s = stamps[i].to_le_bytes();
                assert!(
                    blk.chunks(8).all(|w| w == s),
                    "[{}] generation {n}: block {i} torn",
                    c.name
                );
            }
            checked += 1;
        }
        let st = m.status();
        eprintln!(
            "[{}] {step} fsynced writes, {checked} generations checked, barrier p99 {} us",
            c.name, st["barrier_us"]["p99"]
        );
        assert!(checked >= 3);
    }
}

fn read_gen_file(c: &Case, ws: &str, n: u64, path: &str) -> Result<Vec<u8>, String> {
    c.cat(ws, n, path)
}

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
    assert_eq!(
        read_gen_file(&c, "ur", g, "d/g").unwrap(),
        vec![7u8; 3 << 20]
    );
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
        let got = read_gen_file(&c, "sc", g, &format!("cpu{cpu}")).unwrap();
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
        let got = read_gen_file(&c, "rf", g, &format!("f{i}")).unwrap();
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
            let got = read_gen_file(&c, "wb", g, &name).unwrap();
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
        assert_eq!(read_gen_file(&c, "fs", after, "x").unwrap(), b"durable");
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
            let _ = std::process::Command::new("umount").arg(&self.0).status();
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
    assert_eq!(read_gen_file(&c, "full", g, "d/after").unwrap(), b"after");
    assert!(read_gen_file(&c, "full", g, "d/big").is_err());
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
    assert_eq!(read_gen_file(&c, "neg", g, "d/c").unwrap(), b"file");
    assert_eq!(read_gen_file(&c, "neg", g, "d/a").unwrap(), b"");
    assert!(read_gen_file(&c, "neg", g, "d/e").is_err());
}

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
        assert!(st["index_compactions"]["count"].as_u64().unwrap() >= 2);
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
        assert_eq!(read_gen_file(&c, "ix", gens[4], "f4").unwrap(), b"file 4\n");
        assert!(read_gen_file(&c, "ix", gens[4], "f5").is_err());
    }
}

/// gc with a short grace while a workspace is mounted: the CLI refuses it (the mount merges
/// index objects whose packs are up to 10 minutes old). And when a gc that short runs anyway
/// (here through the library, which has no such check) and deletes a pack the mount's index
/// objects named, the mount's next merge does not name it again: data another workspace
/// deduplicates against the index afterwards still restores.
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
        // Enough commits for the mount to merge what it remembers.
        let merges = m.status()["index_compactions"]["count"].as_u64().unwrap();
        for i in 0..18 {
            std::fs::write(m.path(&format!("f{i}")), format!("{i}")).unwrap();
            m.sync();
        }
        let st = m.status();
        assert!(
            st["index_compactions"]["count"].as_u64().unwrap() > merges,
            "[{}] no merge: {}",
            c.name,
            st["index_compactions"]
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

/// `-o fork=SRC@N` starts a new workspace from a generation, and the same command run again
/// continues it (any other existing workspace is refused); `-o rollback=N` serves generation
/// N's content, published under the mount's own lease; `owfs rollback` of a mounted workspace
/// is refused instead of stopping the mount.
#[test]
fn a_mount_forks_or_rolls_back_as_it_starts() {
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for c in Case::all() {
        let m = c.mount_rw("tmpl", "tmpl", &[]);
        std::fs::write(m.path("a"), b"one").unwrap();
        let g1 = m.sync();
        std::fs::write(m.path("a"), b"two").unwrap();
        let g2 = m.sync();
        let out = c.owfs(&["rollback", "tmpl", &g1.to_string()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(11),
            "[{}] rollback while mounted: {err}",
            c.name
        );
        assert!(err.contains("rollback="), "[{}] {err}", c.name);
        std::fs::write(m.path("b"), b"b").unwrap();
        assert!(m.sync() > g2, "[{}] the mount stopped", c.name);
        m.umount();

        let fork = format!("fork=tmpl@{g1}");
        let j = c.mount_rw("job", "job", &[&fork]);
        assert_eq!(read(j.path("a")), b"one", "[{}]", c.name);
        assert!(!j.path("b").exists(), "[{}]", c.name);
        std::fs::write(j.path("c"), b"c").unwrap();
        j.umount();
        let j = c.mount_rw("job", "job", &[&fork]);
        assert_eq!(
            read(j.path("c")),
            b"c",
            "[{}] the fork did not continue",
            c.name
        );
        j.umount();
        for (ws, opts) in [("job", format!("fork=tmpl@{g2}")), ("tmpl", fork.clone())] {
            let args = c.mount_args(ws, "job", &[&opts], &[]);
            let out = c.owfs(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(10),
                "[{}] {ws} -o {opts}: {err}",
                c.name
            );
        }
        assert_eq!(c.history("job")[0].2, "fork", "[{}]", c.name);

        let r = c.mount_rw("tmpl", "tmpl", &[&format!("rollback={g1}")]);
        assert_eq!(read(r.path("a")), b"one", "[{}]", c.name);
        assert!(!r.path("b").exists(), "[{}]", c.name);
        std::fs::write(r.path("d"), b"d").unwrap();
        let after = r.sync();
        r.umount();
        let h = c.history("tmpl");
        let back = h
            .iter()
            .find(|g| g.2 == "rollback")
            .expect("a rollback generation");
        let lease_epoch = h.last().unwrap().1;
        assert_eq!(back.1, lease_epoch, "[{}] {h:?}", c.name);
        assert!(back.0 < after, "[{}] {h:?}", c.name);
        assert_eq!(read_gen_file(&c, "tmpl", after, "d").unwrap(), b"d");
        assert!(read_gen_file(&c, "tmpl", after, "b").is_err());
    }
}

#[test]
fn a_fresh_node_reads_a_large_workspace_on_demand() {
    let c = Case::s3();
    let m = c.mount_rw("lazy", "mnt", &[]);
    let big = noise(24 << 20, 3);
    std::fs::write(m.path("big"), &big).unwrap();
    m.umount();
    // Without prefetch, only what is read is fetched.
    let m2 = c.mount_rw("lazy", "mnt2", &["prefetch=0"]);
    let before = m2.status()["requests"]["bytes_got"].as_u64().unwrap();
    let f = std::fs::File::open(m2.path("big")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 20 << 20).unwrap();
    assert_eq!(buf, big[20 << 20..(20 << 20) + 4096]);
    let got = m2.status()["requests"]["bytes_got"].as_u64().unwrap() - before;
    assert!(got < 4 << 20, "reading 4 KiB fetched {got} bytes");
    // A write into the not-yet-fetched middle, then a full read: both right.
    f.sync_all().unwrap();
    drop(f);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m2.path("big"))
        .unwrap();
    f.write_all_at(b"MIDDLE", 10 << 20).unwrap();
    drop(f);
    let mut expect = big.clone();
    expect[10 << 20..(10 << 20) + 6].copy_from_slice(b"MIDDLE");
    assert!(std::fs::read(m2.path("big")).unwrap() == expect);
    let n = m2.sync();
    assert!(read_gen_file(&c, "lazy", n, "big").unwrap() == expect);
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
    assert!(read_gen_file(&c, "bp", n, "big").unwrap() == data);
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
    let out = restore_gen(&c, "ws", n, "restored");
    for round in 0..ROUNDS {
        let got = std::fs::read(out.join(format!("f{round}"))).unwrap();
        assert!(got == noise(SIZE, round), "restored f{round} differs");
    }
    m.umount();
}

/// The daemon clears setuid/setgid itself (FUSE_HANDLE_KILLPRIV_V2, which spares a
/// security.capability round trip per write): the modes after writes, truncations and chowns
/// by root and by another user must be what ext4 gives, and visible at once (a stale cached
/// setuid bit would be honoured by exec).
#[test]
fn setuid_bits_drop_as_on_local_disk() {
    let c = Case::file();
    let m = c.mount_rw("suid", "mnt", &[]);
    let plain = c.dir("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let sh = |user: &str, cmd: &str| {
        let out = run_as(user, cmd);
        assert!(
            out.status.success(),
            "{user}: {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let cases: &[(&str, u32, &str, &str)] = &[
        ("append-other", 0o6777, "nobody", "echo x >> {}"),
        ("append-root", 0o6777, "root", "echo x >> {}"),
        ("append-other-sgid-no-gx", 0o2767, "nobody", "echo x >> {}"),
        ("truncate-other", 0o6777, "nobody", "truncate -s 1 {}"),
        ("otrunc-other", 0o4777, "nobody", "echo y > {}"),
        ("chown-root", 0o6755, "root", "chown daemon {}"),
        ("chgrp-root", 0o6750, "root", "chgrp daemon {}"),
        ("chown-root-sgid-no-gx", 0o6745, "root", "chown daemon {}"),
    ];
    for (name, mode, user, cmd) in cases {
        let mut got = Vec::new();
        for dir in [&plain, &m.at] {
            let p = dir.join(name);
            std::fs::write(&p, b"data\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
            sh(user, &cmd.replace("{}", p.to_str().unwrap()));
            got.push(std::fs::metadata(&p).unwrap().mode() & 0o7777);
        }
        assert_eq!(
            got[1], got[0],
            "{name}: mount gives {:o}, local disk {:o}",
            got[1], got[0]
        );
    }
    // And the store holds the same modes.
    let n = m.sync();
    let out = restore_gen(&c, "suid", n, "restored");
    for (name, ..) in cases {
        let a = std::fs::metadata(out.join(name)).unwrap().mode() & 0o7777;
        let b = std::fs::metadata(plain.join(name)).unwrap().mode() & 0o7777;
        assert_eq!(a, b, "{name}: restored {a:o}, local disk {b:o}");
    }
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
        let out = restore_gen(&c, "ws", n, "restored");
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

/// Creating files as an unprivileged user behaves as on local disk, on the mount and in a
/// plain directory side by side: a file created read-only (0444, as git writes its objects)
/// is writable through the descriptor that created it, a second open for writing is refused,
/// O_EXCL on an existing name fails with EEXIST, O_CREAT on an existing name opens it, and
/// the umask applies. (The daemon refuses CREATE, so the kernel creates with MKNOD.)
#[test]
fn unprivileged_creates_behave_as_on_local_disk() {
    let c = Case::file();
    let m = c.mount_rw("cr", "mnt", &[]);
    let plain = c.dir("plain");
    let script = r#"
import os, sys
d = sys.argv[1]
os.umask(0o022)
out = []
fd = os.open(os.path.join(d, "ro"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
out.append(os.write(fd, b"hello"))
os.close(fd)
out.append(oct(os.stat(os.path.join(d, "ro")).st_mode))
out.append(open(os.path.join(d, "ro")).read())
for flags in (os.O_WRONLY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.O_RDONLY | os.O_CREAT):
    try:
        os.close(os.open(os.path.join(d, "ro"), flags, 0o644))
        out.append("opened")
    except OSError as e:
        out.append(e.errno)
fd = os.open(os.path.join(d, "masked"), os.O_RDWR | os.O_CREAT, 0o777)
os.close(fd)
out.append(oct(os.stat(os.path.join(d, "masked")).st_mode))
print(out)
"#;
    let mut got = Vec::new();
    for dir in [&plain, &m.path("pub")] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let out = run_as(
            "nobody",
            &format!("python3 -c '{}' {}", script, dir.display()),
        );
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        got.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    assert_eq!(got[1], got[0], "mount, then local disk");
    assert!(got[0].contains("'0o100444', 'hello'"), "{}", got[0]);
    m.umount();
}

/// `mount -t owfs` and `/etc/fstab`: mount(8) runs the owfs binary as `/sbin/mount.owfs`; the
/// store comes from an environment file (a boot-time mount has no login environment), plain
/// `umount` commits the final generation, and failures answer in mount(8)'s statuses.
#[test]
fn mount_t_owfs_and_fstab() {
    // mount(8) looks for helpers in /sbin only (merged /usr on Debian 12: /usr/sbin).
    let helper = Path::new("/sbin/mount.owfs");
    let bin = std::fs::canonicalize(owfs_tests::owfs_bin()).unwrap();
    let _ = std::fs::remove_file(helper);
    std::os::unix::fs::symlink(&bin, helper).unwrap();
    let uring = std::env::var("OWFS_TEST_URING")
        .map(|u| format!(",uring={u}"))
        .unwrap_or_default();
    for c in Case::all() {
        let at = c.dir("mnt");
        let ro = c.dir("ro");
        let other = c.dir("other");
        for d in [&at, &ro, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        // What a boot-time mount knows: the environment file names the store and credentials.
        let env_file = c.dir("owfs.env");
        let mut env = format!("# the store of this node\nOWFS_STORE={}\n", c.url);
        for k in [
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
        ] {
            if let Ok(v) = std::env::var(k) {
                env.push_str(&format!("export {k}=\"{v}\"\n"));
            }
        }
        std::fs::write(&env_file, env).unwrap();
        let fstab = c.dir("fstab");
        std::fs::write(
            &fstab,
            format!(
                "# owfs workspaces\nfst  {}  owfs  env_file={},cache_dir={},commit_interval_ms=200,nosuid,noauto,_netdev,x-systemd.requires=network-online.target{uring}  0 0\n",
                at.display(),
                env_file.display(),
                c.dir("mnt.cache").display()
            ),
        )
        .unwrap();
        let mount8 = |args: &[&str], env: &[(&str, &str)]| {
            let out = std::process::Command::new("mount")
                .args(args)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .envs(env.iter().copied())
                .output()
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        // `mount -t owfs SPEC DIR -o OPTS` (an empty `env_file` leaves it to the default).
        let mount_t =
            |spec: &str, dir: &Path, env_file: &Path, opts: &str, env: &[(&str, &str)]| {
                let mut o = vec![opts.to_string()];
                if !env_file.as_os_str().is_empty() {
                    o.push(format!("env_file={}", env_file.display()));
                }
                mount8(
                    &[
                        "-t",
                        "owfs",
                        spec,
                        dir.to_str().unwrap(),
                        "-o",
                        &o.join(","),
                    ],
                    env,
                )
            };
        let (code, err) = mount8(&["-T", fstab.to_str().unwrap(), at.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{}: mount -T fstab: {err}", c.name);
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(at.to_str().unwrap()))
            .expect("the mount is in the kernel's table");
        assert!(line.contains("nosuid"), "{line}");
        assert!(line.contains("owfs:fst"), "{line}");
        std::fs::write(at.join("notes.txt"), b"from fstab").unwrap();

        // A second mount of the held workspace fails with mount(8)'s status 32, saying why.
        let other_cache = format!("cache_dir={}", c.dir("other.cache").display());
        let (code, err) = mount_t("fst", &other, &env_file, &other_cache, &[]);
        assert_eq!(code, 32, "{}: second mount: {err}", c.name);
        assert!(err.contains("held"), "{}: {err}", c.name);
        assert!(!owfs_tests::is_mounted(&other));

        // An unknown option is a usage error (1) that names it, and nothing is mounted.
        let (code, err) = mount_t("fst2", &other, &env_file, "comit_interval_ms=5", &[]);
        assert_eq!(code, 1, "{}: {err}", c.name);
        assert!(err.contains("comit_interval_ms"), "{err}");
        assert!(!owfs_tests::is_mounted(&other));

        // Plain umount: the daemon then commits a final generation (umount(8) does not wait
        // for it; `owfs umount` does) and releases the lease.
        let st = std::process::Command::new("umount")
            .arg(&at)
            .status()
            .unwrap();
        assert!(st.success());
        assert!(!owfs_tests::is_mounted(&at));
        let t0 = std::time::Instant::now();
        while c.json(&["status", "fst"])["lease"]["released"].as_bool() != Some(true) {
            assert!(
                t0.elapsed().as_secs() < 60,
                "the daemon never released the lease"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let g = c.history("fst").iter().map(|(n, _, _)| *n).max().unwrap();
        assert_eq!(
            c.ok(&["cat", &format!("fst@{g}"), "notes.txt"]),
            "from fstab"
        );

        // A variable already in the environment wins over the file's.
        let spec = format!("fst@{g}");
        let elsewhere = format!("file://{}", c.dir("no-store").display());
        let (code, err) = mount_t(&spec, &ro, &env_file, "ro", &[("OWFS_STORE", &elsewhere)]);
        assert_eq!(code, 32, "{}: {err}", c.name);
        assert!(
            err.contains("no-store"),
            "{}: the environment's store was not used: {err}",
            c.name
        );
        assert!(!owfs_tests::is_mounted(&ro));

        // Time travel through mount -t owfs: that generation, read-only, with the store read
        // from the default /etc/owfs/env (when this machine has none of its own).
        let default_env = Path::new("/etc/owfs/env");
        let use_default = !default_env.exists();
        if use_default {
            std::fs::create_dir_all("/etc/owfs").unwrap();
            std::fs::copy(&env_file, default_env).unwrap();
        }
        let named = if use_default {
            Path::new("")
        } else {
            env_file.as_path()
        };
        let (code, err) = mount_t(&spec, &ro, named, "ro", &[]);
        if use_default {
            std::fs::remove_file(default_env).unwrap();
            let _ = std::fs::remove_dir("/etc/owfs");
        }
        assert_eq!(code, 0, "{}: ro mount: {err}", c.name);
        assert_eq!(std::fs::read(ro.join("notes.txt")).unwrap(), b"from fstab");
        assert!(std::fs::write(ro.join("new"), b"x").is_err());
        c.ok(&["umount", ro.to_str().unwrap()]);
    }
    let _ = std::fs::remove_file(helper);
}
