//! The read-write mount and the store: what a program does through it is what lands in the
//! store, each generation is a prefix of the writes, a fresh node sees the same workspace, and
//! the mount starts as a fork or a rollback, by `owfs mount` or mount(8).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use owfs_tests::{assert_same_tree, noise, scan, Case};
use rand::{Rng, SeedableRng};

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
        let restored = c.restore("ws", "restored");
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
                let out = c.restore(&format!("{}@{}", "diff", n), &format!("gen-{step}"));
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
            let Ok(bytes) = c.cat("prefix", n, "log.bin") else {
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
        assert_eq!(c.cat("tmpl", after, "d").unwrap(), b"d");
        assert!(c.cat("tmpl", after, "b").is_err());
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
    assert!(c.cat("lazy", n, "big").unwrap() == expect);
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
