//! The storage commands end to end, through the `owfs` binary, on file:// and on S3 (moto).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use owfs_tests::{assert_same_tree, noise, runtime, Case};

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Everything restore must keep: odd names, empty files and dirs, holes, links, modes,
/// xattrs, a FIFO, a SQLite database, deep nesting.
fn tricky_tree(root: &Path) {
    write(&root.join("files/a.txt"), b"hello\n");
    write(&root.join("files/empty"), b"");
    std::fs::create_dir_all(root.join("files/empty-dir")).unwrap();
    write(&root.join("files/big.bin"), &noise(3 << 20, 1));
    let name = OsStr::from_bytes(b"odd \xff\xfe name\twith\nnewline");
    write(&root.join("files").join(name), b"odd");
    write(&root.join("files/ünïcødé ✓.txt"), "ünï".as_bytes());
    let mut deep = root.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("d{i}"));
    }
    write(&deep.join("leaf"), b"leaf");
    let sparse = std::fs::File::create(root.join("files/sparse")).unwrap();
    sparse.set_len(20 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 10 << 20).unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("files/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/abs", root.join("files/dangling")).unwrap();
    std::fs::hard_link(root.join("files/a.txt"), root.join("files/hard")).unwrap();
    std::fs::set_permissions(
        root.join("files/big.bin"),
        std::fs::Permissions::from_mode(0o4751),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("files/empty-dir"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        root.join("files/a.txt"),
        "user.owner",
        b"agent-7",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("files/fifo"),
        rustix::fs::FileType::Fifo,
        0o640.into(),
        0,
    )
    .unwrap();
    rustix::fs::chownat(
        rustix::fs::CWD,
        root.join("files/empty"),
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(4321)),
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    let db = rusqlite::Connection::open(root.join("app.db")).unwrap();
    db.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t(v) SELECT hex(randomblob(100)) FROM generate_series(1, 2000);")
        .unwrap_or_else(|_| {
            db.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<2000) INSERT INTO t(v) SELECT hex(randomblob(100)) FROM c;").unwrap()
        });
    drop(db);
    // A read-only directory: restore must still fill it.
    write(&root.join("ro/inside"), b"x");
    std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
}

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn snapshot_restore_is_bit_exact() {
    for c in Case::all() {
        let src = c.dir("src");
        tricky_tree(&src);
        let v = c.json(&["snapshot", src.to_str().unwrap(), "ws1"]);
        assert_eq!(v["generation"]["number"], 1, "[{}]", c.name);
        let out = c.dir("out");
        c.ok(&["restore", "ws1", out.to_str().unwrap()]);
        assert_same_tree(&src, &out);
        // cat and ls see the same bytes and names.
        assert_eq!(c.ok(&["cat", "ws1", "files/a.txt"]), "hello\n");
        let ls = c.ok(&["ls", "ws1@1", "/files"]);
        assert!(ls.contains("empty-dir/") && ls.contains("link"), "{ls}");
        let db = rusqlite::Connection::open(out.join("app.db")).unwrap();
        let n: i64 = db
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2000);
        let drill = c.ok(&["drill", "ws1"]);
        assert!(
            drill.contains("OK") && drill.contains("1 SQLite"),
            "[{}] {drill}",
            c.name
        );
    }
}

#[test]
fn second_snapshot_uploads_only_the_change() {
    for c in Case::all() {
        let src = c.dir("src");
        write(&src.join("big"), &noise(32 << 20, 3));
        for i in 0..200 {
            write(
                &src.join(format!("small/{i}.txt")),
                format!("file {i}\n").repeat(50).as_bytes(),
            );
        }
        let first = c.json(&["snapshot", src.to_str().unwrap(), "ws"]);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("big"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &noise(1 << 20, 4), 16 << 20).unwrap();
        drop(f);
        let second = c.json(&["snapshot", src.to_str().unwrap(), "ws"]);
        let new = second["write"]["stored_bytes_new"].as_u64().unwrap();
        let read = second["tree"]["bytes_read"].as_u64().unwrap();
        assert!(
            new < 2 << 20,
            "[{}] a 1 MiB change uploaded {new} bytes",
            c.name
        );
        assert!(
            new > 1 << 20,
            "[{}] the change itself must be stored ({new})",
            c.name
        );
        assert_eq!(
            read,
            32 << 20,
            "[{}] only the changed file is read again",
            c.name
        );
        assert!(first["write"]["stored_bytes_new"].as_u64().unwrap() > 32 << 20);
        let out = c.dir("out");
        c.ok(&["restore", "ws@2", out.to_str().unwrap()]);
        assert_same_tree(&src, &out);
        // And the first generation still has the old bytes.
        let old = c.dir("old");
        c.ok(&["restore", "ws@1", old.to_str().unwrap()]);
        assert_eq!(std::fs::read(old.join("big")).unwrap(), noise(32 << 20, 3));
    }
}

#[test]
fn ten_thousand_small_files_cost_a_handful_of_puts() {
    let c = Case::s3();
    let src = c.dir("src");
    for i in 0..10_000 {
        write(
            &src.join(format!("d{}/f{i}", i % 100)),
            format!("small file number {i}").as_bytes(),
        );
    }
    let v = c.json(&["snapshot", src.to_str().unwrap(), "many"]);
    let puts = v["requests"]["puts"].as_u64().unwrap();
    assert!(puts <= 10, "10,000 small files took {puts} PUTs");
    let out = c.dir("out");
    c.ok(&["restore", "many", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

#[test]
fn log_fork_rollback_keep_history() {
    for c in Case::all() {
        let src = c.dir("src");
        write(&src.join("f"), b"v1");
        c.ok(&["snapshot", src.to_str().unwrap(), "main"]);
        write(&src.join("f"), b"v2 longer");
        c.ok(&["snapshot", src.to_str().unwrap(), "main"]);
        let fork = c.json(&["fork", "main@1", "side"]);
        assert_eq!(fork["number"], 1);
        assert_eq!(fork["origin"], "main@1");
        assert_eq!(c.ok(&["cat", "side", "f"]), "v1");
        // A fork of an existing name is refused.
        assert_eq!(code(&c.owfs(&["fork", "main", "side"])), 10);
        let rb = c.json(&["rollback", "main", "1"]);
        assert_eq!(rb["number"], 3);
        assert_eq!(c.ok(&["cat", "main", "f"]), "v1");
        assert_eq!(c.ok(&["cat", "main@2", "f"]), "v2 longer");
        let log: serde_json::Value = c.json(&["log", "main"]);
        let ns: Vec<u64> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["number"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, vec![3, 2, 1]);
        let ws = c.json(&["workspaces"]);
        assert_eq!(ws, serde_json::json!(["main", "side"]));
    }
}

#[test]
fn bad_input_gets_one_clear_line_and_a_distinct_status() {
    let c = Case::file();
    let src = c.dir("src");
    write(&src.join("f"), b"data");
    c.ok(&["snapshot", src.to_str().unwrap(), "ws"]);
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["log", "nope"], 3, "does not exist"),
        (vec!["cat", "ws@9", "f"], 3, "ws@9 does not exist"),
        (vec!["cat", "ws", "missing"], 3, "no such path"),
        (vec!["cat", "ws", "../etc/passwd"], 2, "no . or .."),
        (vec!["log", "bad/name"], 2, "workspace name"),
        (vec!["--store", "ftp://x", "log", "ws"], 2, "unknown scheme"),
        (
            vec!["--store", "file://relative", "log", "ws"],
            2,
            "absolute path",
        ),
    ];
    for (args, want, msg) in cases {
        let out = c.owfs(&args);
        let err = stderr(&out);
        assert_eq!(code(&out), want, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(err.contains("hint:"), "{args:?}: {err}");
    }
    // Non-empty target without --force.
    let out = c.owfs(&["restore", "ws", src.to_str().unwrap()]);
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    c.ok(&["restore", "--force", "ws", src.to_str().unwrap()]);
}

#[test]
fn unreachable_store_is_reported_after_bounded_retries() {
    let c = Case::s3();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t0 = std::time::Instant::now();
    let out = c.owfs_env(
        &["log", "ws"],
        &[("AWS_ENDPOINT_URL", &format!("http://127.0.0.1:{port}"))],
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("unreachable"), "{}", stderr(&out));
    assert!(t0.elapsed().as_secs() < 60, "retries are bounded");
    // A bucket that does not exist.
    let out = c.owfs(&["--store", "s3://no-such-bucket-owfs/x", "log", "ws"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bucket does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn wrong_credentials_are_refused_with_their_own_status() {
    // A server that checks credentials (moto enforces IAM auth from the first request).
    let m = owfs_tests::Moto::spawn(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let c = Case::file();
    let out = c.owfs_env(
        &["--store", "s3://any-bucket/p", "log", "ws"],
        &[
            ("AWS_ENDPOINT_URL", &m.endpoint),
            ("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1"),
            ("AWS_SECRET_ACCESS_KEY", "wrong"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    let err = stderr(&out);
    assert_eq!(code(&out), 5, "{err}");
    assert!(
        err.contains("refused access") && err.contains("hint: check AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "one error line and one hint: {err}");
}

/// Flips one byte of every pack; restore and drill name the damaged path.
#[test]
fn corruption_is_reported_by_path() {
    for c in Case::all() {
        let src = c.dir("src");
        write(&src.join("docs/report.txt"), &noise(200_000, 9));
        c.ok(&["snapshot", src.to_str().unwrap(), "ws"]);
        let rt = runtime();
        let store = c.store();
        let packs = rt.block_on(store.list("packs")).unwrap();
        for p in &packs {
            let mut bytes = rt.block_on(store.get(&p.key)).unwrap().to_vec();
            // The data pack is the big one: damage its middle.
            if bytes.len() > 100_000 {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x01;
                rt.block_on(store.put(&p.key, bytes.into())).unwrap();
            }
        }
        let out = c.owfs(&["restore", "ws", c.dir("out").to_str().unwrap()]);
        assert_eq!(code(&out), 7, "[{}] {}", c.name, stderr(&out));
        assert!(
            stderr(&out).contains("docs/report.txt"),
            "[{}] {}",
            c.name,
            stderr(&out)
        );
        let out = c.owfs(&["drill", "ws"]);
        assert_eq!(code(&out), 12, "[{}] {}", c.name, stderr(&out));
        let so = String::from_utf8_lossy(&out.stdout);
        assert!(
            so.contains("FAILED") && so.contains("docs/report.txt"),
            "[{}] {so}",
            c.name
        );
        // The verdict is recorded in the store.
        let verdict = rt.block_on(store.get("ws/ws/drill")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&verdict).unwrap();
        assert_eq!(v["ok"], false);
        // A missing pack is its own kind of failure.
        for p in &packs {
            rt.block_on(store.delete(&p.key)).unwrap();
        }
        let out = c.owfs(&["cat", "ws", "docs/report.txt"]);
        assert_eq!(code(&out), 6, "[{}] {}", c.name, stderr(&out));
    }
}

#[test]
fn damaged_or_future_generation_records_are_refused() {
    let c = Case::file();
    let src = c.dir("src");
    write(&src.join("f"), b"data");
    c.ok(&["snapshot", src.to_str().unwrap(), "ws"]);
    let rt = runtime();
    let store = c.store();
    let key = "ws/ws/gens/00000000000000000001";
    let rec = rt.block_on(store.get(key)).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&rec).unwrap();
    v["format"] = serde_json::json!(99);
    rt.block_on(store.put(key, serde_json::to_vec(&v).unwrap().into()))
        .unwrap();
    let out = c.owfs(&["ls", "ws"]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(stderr(&out).contains("format 99"), "{}", stderr(&out));
    rt.block_on(store.put(key, rec.slice(..rec.len() / 2)))
        .unwrap();
    let out = c.owfs(&["ls", "ws"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("truncated or damaged"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn gc_deletes_only_what_nothing_references() {
    for c in Case::all() {
        let src = c.dir("src");
        write(&src.join("keep"), &noise(300_000, 11));
        write(&src.join("gone"), &noise(300_000, 22));
        c.ok(&["snapshot", src.to_str().unwrap(), "ws"]);
        std::fs::remove_file(src.join("gone")).unwrap();
        write(&src.join("new"), &noise(300_000, 33));
        c.ok(&["snapshot", src.to_str().unwrap(), "ws"]);
        // Nothing is unreferenced while both generations are kept.
        let r = c.json(&["gc", "--grace", "0s"]);
        assert_eq!(r["packs_condemned"], 0, "[{}] {r}", c.name);
        // Keep only the latest: gen 1 goes; its packs are condemned, then deleted by a later run.
        let r = c.json(&["gc", "--keep-last", "1", "--grace", "0s", "--dry-run"]);
        assert_eq!(r["generations_deleted"], serde_json::json!(["ws@1"]));
        assert!(!c.ok(&["cat", "ws@1", "keep"]).is_empty());
        let r = c.json(&["gc", "--keep-last", "1", "--grace", "0s"]);
        assert_eq!(
            r["generations_deleted"],
            serde_json::json!(["ws@1"]),
            "[{}] {r}",
            c.name
        );
        assert_eq!(r["packs_deleted"], 0);
        let r2 = c.json(&["gc", "--grace", "0s"]);
        let out = c.dir("out");
        c.ok(&["restore", "ws", out.to_str().unwrap()]);
        assert_same_tree(&src, &out);
        c.ok(&["drill", "ws"]);
        // gen 1's own pack held `gone` and `keep` together: it stays (live), so the dead
        // bytes are reported rather than deleted.
        let dead = r2["bytes_dead_in_live_packs"].as_u64().unwrap()
            + r2["bytes_deleted"].as_u64().unwrap();
        assert!(
            dead >= 300_000,
            "[{}] gone's bytes are accounted for: {r2}",
            c.name
        );
        assert_eq!(code(&c.owfs(&["cat", "ws@1", "keep"])), 3);
    }
}
