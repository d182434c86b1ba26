//! Permissions as on a local disk: setuid and setgid bits drop on write and chown, and an
//! unprivileged caller creates files and directories with its own ids.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use owfs_tests::{run_as, Case};

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
    let out = c.restore(&format!("{}@{}", "suid", n), "restored");
    for (name, ..) in cases {
        let a = std::fs::metadata(out.join(name)).unwrap().mode() & 0o7777;
        let b = std::fs::metadata(plain.join(name)).unwrap().mode() & 0o7777;
        assert_eq!(a, b, "{name}: restored {a:o}, local disk {b:o}");
    }
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

/// Every file under `dir` with its mode.
fn modes_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), m.mode() & 0o7777));
        }
    }
    out
}

/// A file only its owner may read on the mount is not readable next door either: the cache
/// directory (the working copy in the clear) and a `file://` store are the owner's alone,
/// whatever the umask, and a cache directory found looser is tightened
/// (docs/decisions/local-files-private.md).
#[test]
fn the_cache_and_a_file_store_are_the_owners_alone() {
    let c = Case::file();
    // A cache directory someone made world-readable beforehand.
    let cache = c.dir("priv.cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = c.mount_rw("priv", "priv", &[]);
    let secret = "secret-8c1f";
    let f = m.path("mine.txt");
    std::fs::write(&f, secret).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    m.sync();
    let store = std::path::PathBuf::from(c.url.strip_prefix("file://").unwrap());
    // The bytes are there in the clear for the owner (the check below could fail)...
    let out = std::process::Command::new("grep")
        .args(["-r", "-l", secret])
        .arg(&store)
        .arg(&cache)
        .output()
        .unwrap();
    assert!(
        !out.stdout.is_empty(),
        "the secret is in the store and the cache"
    );
    // ... and for nobody else.
    let cmd = format!(
        "grep -r -l {secret} {} {}",
        store.display(),
        cache.display()
    );
    let out = run_as("nobody", &cmd);
    assert!(
        out.stdout.is_empty(),
        "another user found the secret in: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for dir in [&store, &cache] {
        let mode = std::fs::metadata(dir).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{dir:?} is {mode:o}");
        for (p, mode) in modes_under(dir) {
            assert_eq!(mode & 0o077, 0, "{p:?} is {mode:o}");
        }
    }
    m.umount();
    // A clean unmount leaves no plaintext behind in the cache (the daemon deletes it just
    // after answering the unmount).
    let t0 = std::time::Instant::now();
    while cache.join("data").exists() && t0.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !cache.join("data").exists(),
        "the working copy outlived the unmount"
    );
}
