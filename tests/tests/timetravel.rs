//! Time travel: a generation mounted read-only shows exactly what was committed, served
//! from the store, verified, and refuses writes.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use owfs_tests::{assert_same_tree, noise, runtime, Case};

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

#[test]
fn a_mounted_generation_is_exactly_what_was_committed() {
    for c in Case::all() {
        let src = c.dir("src");
        write(&src.join("files/a.txt"), b"first\n");
        write(&src.join("files/big.bin"), &noise(5 << 20, 1));
        write(&src.join("empty"), b"");
        std::fs::create_dir_all(src.join("dir/empty-dir")).unwrap();
        std::os::unix::fs::symlink("files/a.txt", src.join("link")).unwrap();
        std::fs::hard_link(src.join("files/a.txt"), src.join("hard")).unwrap();
        std::fs::set_permissions(
            src.join("files/big.bin"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        rustix::fs::lsetxattr(
            src.join("empty"),
            "user.tag",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        c.ok(&["snapshot", src.to_str().unwrap(), "tt"]);
        let gen1 = c.dir("gen1");
        c.ok(&["restore", "tt@1", gen1.to_str().unwrap()]);
        // Change everything for generation 2.
        write(&src.join("files/a.txt"), b"second, longer\n");
        std::fs::remove_file(src.join("empty")).unwrap();
        c.ok(&["snapshot", src.to_str().unwrap(), "tt"]);

        let m1 = c.mount_ro("tt@1", "m1");
        let m2 = c.mount_ro("tt", "m2");
        assert_same_tree(&gen1, &m1.at);
        assert_same_tree(&src, &m2.at);
        // Random reads across chunk boundaries return the committed bytes.
        let f = std::fs::File::open(m1.at.join("files/big.bin")).unwrap();
        let want = noise(5 << 20, 1);
        for (off, len) in [
            (0usize, 10usize),
            (65_000, 200_000),
            ((5 << 20) - 7, 7),
            (1 << 20, 1 << 20),
        ] {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off as u64).unwrap();
            assert_eq!(buf, want[off..off + len], "[{}] read at {off}", c.name);
        }
        // Read-only: writes are refused by the kernel.
        let err = std::fs::write(m2.at.join("new"), b"x").unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(30),
            "[{}] EROFS expected: {err}",
            c.name
        );
        drop(f);
        c.ok(&["umount", m1.at.to_str().unwrap()]);
        assert!(!owfs_tests::is_mounted(&m1.at));
        drop(m2);
        assert!(!owfs_tests::is_mounted(&c.dir("m2")));
    }
}

#[test]
fn damaged_data_reads_as_an_error_never_as_wrong_bytes() {
    let c = Case::file();
    let src = c.dir("src");
    write(&src.join("data.bin"), &noise(400_000, 3));
    c.ok(&["snapshot", src.to_str().unwrap(), "dmg"]);
    let rt = runtime();
    let store = c.store();
    for p in rt.block_on(store.list("packs")).unwrap() {
        let mut bytes = rt.block_on(store.get(&p.key)).unwrap().to_vec();
        if bytes.len() > 300_000 {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x20;
            rt.block_on(store.put(&p.key, bytes.into())).unwrap();
        }
    }
    let m = c.mount_ro("dmg", "m");
    let err = std::fs::read(m.at.join("data.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO expected: {err}");
}

#[test]
fn mount_refuses_what_it_cannot_do() {
    let c = Case::file();
    let src = c.dir("src");
    write(&src.join("f"), b"x");
    c.ok(&["snapshot", src.to_str().unwrap(), "w"]);
    let at = c.dir("m");
    std::fs::create_dir_all(&at).unwrap();
    // A read-write mount serves the latest generation only.
    let out = c.owfs(&["mount", "w@1", at.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-o ro"));
    let out = c.owfs(&["mount", "w", at.to_str().unwrap(), "-o", "bogus=1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown mount option"));
    let out = c.owfs(&["mount", "nope", at.to_str().unwrap(), "-o", "ro"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!owfs_tests::is_mounted(&at));
}

#[test]
fn a_generation_shows_the_link_count_the_mount_recorded() {
    use std::os::unix::fs::MetadataExt;
    let c = Case::file();
    let m = c.mount_rw("links", "rw", &[]);
    std::fs::create_dir_all(m.path("d")).unwrap();
    std::fs::write(m.path("a"), b"linked").unwrap();
    std::fs::hard_link(m.path("a"), m.path("b")).unwrap();
    // The third name is in a directory of its own, which a reader may not have listed.
    std::fs::hard_link(m.path("a"), m.path("d/c")).unwrap();
    std::fs::write(m.path("single"), b"one").unwrap();
    m.umount();
    let ro = c.mount_ro("links", "ro");
    for name in ["d/c", "a", "b"] {
        let md = std::fs::metadata(ro.at.join(name)).unwrap();
        assert_eq!(md.nlink(), 3, "{name}");
        assert_eq!(
            std::fs::read(ro.at.join(name)).unwrap(),
            b"linked",
            "{name}"
        );
    }
    assert_eq!(std::fs::metadata(ro.at.join("single")).unwrap().nlink(), 1);
}

#[test]
fn holes_of_a_sparse_file_read_as_zeros() {
    let c = Case::file();
    let m = c.mount_rw("sparse", "rw", &[]);
    let f = std::fs::File::create(m.path("sparse")).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", 5 << 20).unwrap();
    drop(f);
    m.umount();
    let ro = c.mount_ro("sparse", "ro");
    let got = std::fs::read(ro.at.join("sparse")).unwrap();
    let mut want = vec![0u8; (5 << 20) + 4];
    want[..4].copy_from_slice(b"head");
    want[5 << 20..].copy_from_slice(b"tail");
    assert!(got == want, "the file reads back as written");
    let f = std::fs::File::open(ro.at.join("sparse")).unwrap();
    let mut buf = vec![1u8; 1 << 20];
    f.read_exact_at(&mut buf, 2 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
}

/// `count(*)` of table t in the database at `db`, read by the real `sqlite3` CLI (default
/// mode and -readonly) and by python3's sqlite3 (default and `mode=ro`); all four must agree.
fn counts_by_other_programs(db: &Path) -> Result<i64, String> {
    let mut seen = Vec::new();
    for args in [vec![], vec!["-readonly"]] {
        let out = std::process::Command::new("sqlite3")
            .args(&args)
            .arg(db)
            .arg("SELECT count(*) FROM t")
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "sqlite3 {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        seen.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let py = r#"
import sqlite3, sys
p = sys.argv[1]
a = sqlite3.connect(p).execute("SELECT count(*) FROM t").fetchone()[0]
b = sqlite3.connect("file:" + p + "?mode=ro", uri=True).execute("SELECT count(*) FROM t").fetchone()[0]
try:
    sqlite3.connect(p).execute("INSERT INTO t VALUES (0)")
    w = "written"
except sqlite3.OperationalError as e:
    w = str(e)
print(a, b, w)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", py])
        .arg(db)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!("python3: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (counts, refused) = line.split_at(line.find(' ').unwrap());
    let rest: Vec<&str> = refused.trim().splitn(2, ' ').collect();
    seen.push(counts.to_string());
    seen.push(rest[0].to_string());
    assert_eq!(
        rest.get(1).copied(),
        Some("attempt to write a readonly database"),
        "a write through python3: {line}"
    );
    let first = seen[0].clone();
    assert!(
        seen.iter().all(|s| *s == first),
        "programs disagree: {seen:?}"
    );
    first.parse().map_err(|e| format!("{first:?}: {e}"))
}

/// Every SQLite database of a mounted generation opens from unmodified programs in every
/// mode, WAL included (a WAL-mode database needs a `-shm` beside it, which generations never
/// hold: the read-only view shows empty read-only companions), and holds what SQLite would
/// recover from that generation (docs/decisions/read-only-databases.md).
#[test]
fn databases_of_a_mounted_generation_open_in_every_mode() {
    let c = Case::file();
    let m = c.mount_rw("ttdb", "rw", &[]);
    std::fs::create_dir_all(m.path("sub")).unwrap();
    let wal = rusqlite::Connection::open(m.path("app.db")).unwrap();
    wal.pragma_update(None, "journal_mode", "wal").unwrap();
    let journal = rusqlite::Connection::open(m.path("sub/r.db")).unwrap();
    for db in [&wal, &journal] {
        db.execute_batch("CREATE TABLE t(x)").unwrap();
    }
    let mut gens = Vec::new();
    for round in 1..=3i64 {
        for db in [&wal, &journal] {
            for i in 0..10 {
                db.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
            }
        }
        // The first rounds leave the transactions in the WAL (the connection is open); the
        // last one closes it, which checkpoints and removes the WAL.
        if round == 3 {
            drop(wal);
            drop(journal);
            gens.push((m.sync(), 30));
            break;
        }
        gens.push((m.sync(), round * 10));
    }
    m.umount();
    for (g, rows) in gens {
        let ro = c.mount_ro(&format!("ttdb@{g}"), &format!("ro{g}"));
        for db in ["app.db", "sub/r.db"] {
            let got = counts_by_other_programs(&ro.at.join(db))
                .unwrap_or_else(|e| panic!("ttdb@{g} {db}: {e}"));
            assert_eq!(got, rows, "ttdb@{g} {db}");
        }
        drop(ro);
    }
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// `WS@TIME` and `WS@-AGE` name the newest generation at or before that instant, wherever a
/// generation is read; generations retention deleted are stepped over; a time before the
/// first is an error that names the first (docs/decisions/generations-by-time.md).
#[test]
fn generations_are_found_by_time() {
    let c = Case::file();
    let m = c.mount_rw("clock", "m", &[]);
    for i in 0..4 {
        std::fs::write(m.path("v"), format!("{i}")).unwrap();
        m.sync();
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    m.umount();
    // (number, created_ms), oldest first, of the generations holding v.
    let log = c.json(&["log", "clock"]);
    let mut gens: Vec<(u64, u64)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["number"].as_u64().unwrap(),
                g["created_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    gens.sort();
    let with_v: Vec<(u64, u64)> = gens[gens.len() - 4..].to_vec();
    let cat_at = |when: &str| c.owfs(&["cat", &format!("clock@{when}"), "v"]);
    for (i, (_, t)) in with_v.iter().enumerate() {
        for at in [*t, t + 10] {
            let out = cat_at(&rfc3339_ms(at));
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                out.stdout,
                format!("{i}").as_bytes(),
                "at {}",
                rfc3339_ms(at)
            );
        }
    }
    // A moment ago is the latest; an hour ago is before the first generation.
    assert_eq!(cat_at("-0s").stdout, b"3");
    let out = cat_at("-1h");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("no generation at or before") && err.contains("clock@1"),
        "{err}"
    );
    // The same names work for ls, restore and a read-only mount.
    let t1 = rfc3339_ms(with_v[1].1 + 5);
    c.ok(&["ls", &format!("clock@{t1}")]);
    let back = c.dir("back");
    c.ok(&["restore", &format!("clock@{t1}"), back.to_str().unwrap()]);
    assert_eq!(std::fs::read(back.join("v")).unwrap(), b"1");
    let ro = c.mount_ro(&format!("clock@{t1}"), "ro");
    assert_eq!(std::fs::read(ro.at.join("v")).unwrap(), b"1");
    drop(ro);
    // Retention deleted the generations of v=1 and v=2: a time in between finds v=0's.
    let rt = runtime();
    let store = c.store();
    for (n, _) in &with_v[1..3] {
        rt.block_on(chunkstore::generation::delete_generation(
            &store, "clock", *n,
        ))
        .unwrap();
    }
    assert_eq!(cat_at(&rfc3339_ms(with_v[2].1 + 5)).stdout, b"0");
    assert_eq!(cat_at(&rfc3339_ms(with_v[3].1)).stdout, b"3");
}

/// Finding a generation by time costs about 2·log2(n) requests, not a listing of all of
/// them: 300 generations, every lookup counted by the store.
#[test]
fn finding_a_generation_by_time_costs_log_n_requests() {
    use chunkstore::generation::{self, Selector};
    let rt = runtime();
    for c in Case::all() {
        let store = c.store();
        let root = chunkstore::Hash::of(b"a root");
        let t0 = 1_700_000_000_000u64;
        for i in 1..=300u64 {
            let rec: chunkstore::generation::GenRecord =
                serde_json::from_value(serde_json::json!({
                    "format": 2, "workspace": "many", "number": i,
                    "parent": if i > 1 { Some(i - 1) } else { None },
                    "origin": null, "kind": "snapshot", "epoch": 0, "created_ms": t0 + i * 1000,
                    "root": root.to_hex(), "files": 0, "dirs": 0, "bytes": 0, "bytes_new": 0,
                    "blobs_new": 0, "nonce": format!("{i}")
                }))
                .unwrap();
            rt.block_on(generation::publish(&store, &rec)).unwrap();
        }
        for (want, at) in [(1u64, t0 + 1000), (150, t0 + 150_500), (299, t0 + 299_999)] {
            let before = store.counters();
            let n = rt
                .block_on(generation::number_at_or_before(&store, "many", at))
                .unwrap();
            let after = store.counters();
            let requests = (after.gets - before.gets) + (after.lists - before.lists);
            assert_eq!(n, want, "[{}]", c.name);
            // The hint and the latest, then two requests a step (log2 300 < 9).
            assert!(requests <= 4 + 2 * 9, "[{}] {requests} requests", c.name);
        }
        let (_, sel) = generation::parse_selector("many@-5m").unwrap();
        assert!(matches!(sel, Selector::AtOrBefore(_)));
    }
}
