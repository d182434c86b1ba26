//! What a commit costs in requests, counted by the store: on S3 from the server's own request
//! log, on `file://` from the objects that appear or change in the store directory. The
//! workload is the common one: a SQLite database in WAL mode, one small transaction and one
//! `owfs sync` per commit. (docs/PERFORMANCE.md has the figures; docs/decisions/
//! one-pack-a-commit.md and one-request-a-commit.md why a commit costs what it does.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use owfs_tests::{kill_and_detach, noise, runtime, Case};

/// Commits measured.
const N: u64 = 24;

/// Every file under `root` with its modification time and size.
fn files(root: &Path) -> BTreeMap<PathBuf, (SystemTime, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), (m.modified().unwrap(), m.len()));
            }
        }
    }
    out
}

#[derive(Debug, Default)]
struct Cost {
    puts: u64,
    gets: u64,
    lists: u64,
    deletes: u64,
    /// Requests by method and kind of key (for a failure's message).
    by_kind: BTreeMap<String, u64>,
}

/// "packs", "index", "gens", "head", ... from a key under the store's prefix.
fn kind_of(key: &str) -> String {
    let key = key.split('?').next().unwrap();
    if let Some((_, rest)) = key.split_once("/ws/") {
        // ws/<workspace>/<kind>/...
        return rest.split('/').nth(1).unwrap_or(rest).to_string();
    }
    for k in ["packs", "index", "gc"] {
        if key.contains(&format!("/{k}/")) {
            return k.to_string();
        }
    }
    key.rsplit('/').next().unwrap_or(key).to_string()
}

/// Classifies S3 request lines ("METHOD /bucket/key?query"), leaving out the lease's own
/// renewals (a node's cost per second, not per commit).
fn s3_cost(lines: &[String]) -> Cost {
    let mut c = Cost::default();
    for l in lines {
        let (method, path) = l.split_once(' ').unwrap();
        if path.split('?').next().unwrap().ends_with("/lease") {
            continue;
        }
        *c.by_kind
            .entry(format!("{method} {}", kind_of(path)))
            .or_default() += 1;
        match method {
            // A multi-object delete is a POST.
            "DELETE" => c.deletes += 1,
            "POST" if path.contains("delete") => c.deletes += 1,
            "PUT" | "POST" => c.puts += 1,
            "GET" if path.contains("list-type") || path.contains("?prefix") => c.lists += 1,
            "GET" | "HEAD" => c.gets += 1,
            _ => {}
        }
    }
    c
}

#[test]
fn a_small_commit_costs_a_few_requests() {
    for c in Case::all() {
        let m = c.mount_rw("req", "m", &[]);
        let db = rusqlite::Connection::open(m.path("app.db")).unwrap();
        db.pragma_update(None, "journal_mode", "wal").unwrap();
        db.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        m.sync();

        let store_dir = c.url.strip_prefix("file://").map(PathBuf::from);
        let before = store_dir.as_deref().map(files);
        let log_from = c.s3_log_end();
        let status0 = m.status();
        for i in 0..N {
            db.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
                .unwrap();
            m.sync();
        }
        let status1 = m.status();
        let counter = |k: &str| {
            status1["requests"][k].as_u64().unwrap() - status0["requests"][k].as_u64().unwrap()
        };
        let commits = status1["commits"].as_u64().unwrap() - status0["commits"].as_u64().unwrap();
        assert!(commits >= N, "[{}] {commits} commits for {N} syncs", c.name);

        let cost = match (&store_dir, before, log_from) {
            (Some(dir), Some(before), _) => {
                // Objects written: new ones and rewritten ones (the head hint), the lease
                // left out; an object written and deleted since (an index object a merge
                // replaced) is not seen, so the daemon's count is taken if higher. A file
                // store cannot count its LISTs: the daemon's counter does.
                let after = files(dir);
                let written = after
                    .iter()
                    .filter(|(p, v)| {
                        !p.ends_with("lease") && before.get(p.as_path()) != Some(v)
                    })
                    .count() as u64;
                let deletes = before.keys().filter(|p| !after.contains_key(*p)).count() as u64;
                Cost {
                    puts: written.max(counter("puts")),
                    gets: counter("gets"),
                    lists: counter("lists"),
                    deletes,
                    by_kind: BTreeMap::new(),
                }
            }
            (None, _, Some(from)) => s3_cost(&c.s3_requests(from).unwrap()),
            _ => panic!(
                "[{}] the S3 server's request log is unknown: set OWFS_TEST_MOTO_LOG (scripts/test.sh does)",
                c.name
            ),
        };
        eprintln!(
            "[{}] {N} one-row transactions, each synced: {commits} commits, {} PUTs, {} LISTs, \
             {} GETs, {} DELETEs (the daemon's counters: {} PUTs, {} LISTs, {} GETs)",
            c.name,
            cost.puts,
            cost.lists,
            cost.gets,
            cost.deletes,
            counter("puts"),
            counter("lists"),
            counter("gets"),
        );
        // A commit: its generation record, which carries its pack (decisions/
        // one-request-a-commit.md); per 16 commits the index object they deferred, the head
        // hint, and at most one merge of the mount's index objects.
        let puts_bound = commits + 3 * (commits / 16 + 1);
        assert!(
            cost.puts <= puts_bound,
            "[{}] {} PUTs for {commits} commits (at most {puts_bound}): {:?}",
            c.name,
            cost.puts,
            cost.by_kind
        );
        // gc's condemned packs once a minute; per 16 commits the deferred index object's
        // two checks and a merge's listing.
        let lists_bound = 1 + 3 * (commits / 16 + 1);
        assert!(
            cost.lists <= lists_bound,
            "[{}] {} LISTs for {commits} commits (at most {lists_bound}): {:?}",
            c.name,
            cost.lists,
            cost.by_kind
        );
        // A commit reads nothing back: its parent is in memory.
        assert!(
            cost.gets <= 4,
            "[{}] {} GETs for {commits} commits: {:?}",
            c.name,
            cost.gets,
            cost.by_kind
        );
        drop(db);
        m.umount();
    }
}

/// A mount writes the index object of its small commits' packs after 16 of them (or 30 s, or
/// at unmount): a daemon killed before that leaves packs no index object names. Another
/// process reads those generations by the packs' own trailers, the next mount names them in
/// its index object, and gc keeps them (docs/decisions/one-pack-a-commit.md).
#[test]
fn packs_a_crash_left_without_an_index_object_are_found_by_their_trailers() {
    for c in Case::all() {
        // A short lease: gc refuses a short grace while a lease is live.
        let fast = [
            "lease_ttl_ms=3000",
            "lease_renew_ms=500",
            "lease_margin_ms=1000",
            "lease_skew_ms=200",
        ];
        let m = c.mount_rw("crash", "m", &fast);
        let body = noise(300_000, 7);
        std::fs::write(m.path("first.txt"), b"first").unwrap();
        m.sync();
        std::fs::write(m.path("b.bin"), &body).unwrap();
        let g = m.sync();
        let st = m.status();
        assert_eq!(
            st["deferred_index_writes"].as_u64(),
            Some(0),
            "[{}] the commits' index object is not written yet: {st}",
            c.name
        );
        kill_and_detach(m.daemon_pid(), &m.at);
        drop(m);

        let spec = format!("crash@{g}");
        let out = c.owfs(&["cat", &spec, "b.bin"]);
        assert!(out.status.success(), "[{}] {:?}", c.name, out);
        assert!(out.stdout == body, "[{}] b.bin read back differs", c.name);
        // first.txt's blob is in the previous commit's pack, inside the previous record:
        // found through the newest record's list of pending packs.
        let out = c.owfs(&["cat", &spec, "first.txt"]);
        assert!(out.status.success(), "[{}] {:?}", c.name, out);
        assert_eq!(out.stdout, b"first", "[{}]", c.name);

        // The next mount reads them the same way, and names them in its index object: after
        // its unmount every pack in the store is in the index.
        let m2 = c.mount_rw_with("crash", "m2", &fast, &["--takeover"]);
        assert!(
            std::fs::read(m2.path("b.bin")).unwrap() == body,
            "[{}]",
            c.name
        );
        std::fs::write(m2.path("after.txt"), b"after the crash").unwrap();
        m2.umount();
        let rt = runtime();
        let repo = c.repo(&rt);
        repo.refresh_index().unwrap();
        let indexed: std::collections::HashSet<_> =
            repo.with_index(|i| i.pack_names().iter().copied().collect());
        let packs = rt.block_on(repo.store.list("packs")).unwrap();
        let mut unindexed: Vec<_> = packs
            .iter()
            .filter(|p| {
                let name = p
                    .key
                    .rsplit('/')
                    .next()
                    .and_then(chunkstore::Hash::from_hex);
                !name.is_some_and(|n| indexed.contains(&n))
            })
            .map(|p| p.key.clone())
            .collect();
        // And the packs inside records.
        for n in rt
            .block_on(chunkstore::generation::list_generations(
                &repo.store,
                "crash",
            ))
            .unwrap()
        {
            let rec = rt
                .block_on(chunkstore::generation::get_generation(
                    &repo.store,
                    "crash",
                    n,
                ))
                .unwrap();
            if let Some(name) = rec.pack_name().unwrap() {
                if !indexed.contains(&name) {
                    unindexed.push(rec.key());
                }
            }
        }
        assert!(
            unindexed.is_empty(),
            "[{}] packs no index object names after the second mount: {unindexed:?}",
            c.name
        );

        // gc (twice, so that a condemned pack would go) keeps them all.
        for _ in 0..2 {
            c.ok(&["gc", "--grace", "0s"]);
        }
        let dir = c.dir("restored");
        c.ok(&["restore", &spec, dir.to_str().unwrap()]);
        assert_eq!(
            std::fs::read(dir.join("b.bin")).unwrap(),
            body,
            "[{}]",
            c.name
        );
        assert_eq!(std::fs::read(dir.join("first.txt")).unwrap(), b"first");
    }
}

/// A small commit's pack lives inside its generation record (docs/decisions/
/// one-request-a-commit.md). Retention deletes records; gc first copies such a pack to its
/// own key, so the blobs later generations still use stay readable, from every reader; a
/// pack nothing uses any more then goes the way of any other (condemned, then deleted).
#[test]
fn packs_inside_records_outlive_their_records() {
    let rt = runtime();
    for c in Case::all() {
        let m = c.mount_rw("inrec", "m", &[]);
        let kept = noise(200_000, 11);
        std::fs::write(m.path("kept.bin"), &kept).unwrap();
        let first = m.sync();
        std::fs::write(m.path("gone.txt"), b"overwritten later").unwrap();
        m.sync();
        std::fs::write(m.path("gone.txt"), b"the last version").unwrap();
        let last = m.sync();
        m.umount();
        let store = c.store();
        let rec = rt
            .block_on(chunkstore::generation::get_generation(
                &store, "inrec", first,
            ))
            .unwrap();
        let pack = rec
            .pack_name()
            .unwrap()
            .expect("a small commit's pack is inside its record");
        let pack_key = chunkstore::pack::pack_key(&pack);
        assert!(rt.block_on(store.get_opt(&pack_key)).unwrap().is_none());

        // Only the last generation stays: kept.bin's pack moves out of its record.
        let out = c.json(&["gc", "--keep-last", "1", "--grace", "0s"]);
        assert!(
            out["packs_moved_out_of_records"].as_u64().unwrap() >= 1,
            "[{}] {out}",
            c.name
        );
        let listed = rt.block_on(chunkstore::generation::list_generations(&store, "inrec"));
        assert_eq!(listed.unwrap(), vec![last], "[{}]", c.name);
        assert!(rt.block_on(store.get_opt(&pack_key)).unwrap().is_some());
        assert_eq!(
            c.cat("inrec", last, "kept.bin").unwrap(),
            kept,
            "[{}]",
            c.name
        );
        let m = c.mount_rw("inrec", "m2", &[]);
        assert!(
            std::fs::read(m.path("kept.bin")).unwrap() == kept,
            "[{}]",
            c.name
        );
        // kept.bin goes too: after two more runs of gc nothing needs that pack.
        std::fs::remove_file(m.path("kept.bin")).unwrap();
        m.sync();
        m.umount();
        for _ in 0..2 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            c.ok(&["gc", "--keep-last", "1", "--grace", "0s"]);
        }
        assert!(
            rt.block_on(store.get_opt(&pack_key)).unwrap().is_none(),
            "[{}] a pack nothing needs stayed",
            c.name
        );
        assert_eq!(
            c.owfs(&["drill", "inrec"]).status.code(),
            Some(0),
            "[{}]",
            c.name
        );
    }
}

/// A byte flipped in the pack a record carries: the file whose blob it hits reads as corrupt
/// (exit 7, naming the file), never as wrong bytes; the record itself still reads.
#[test]
fn a_damaged_pack_inside_a_record_is_reported_not_read() {
    let rt = runtime();
    for c in Case::all() {
        let m = c.mount_rw("dmgrec", "m", &[]);
        let body = noise(100_000, 5);
        std::fs::write(m.path("data.bin"), &body).unwrap();
        let g = m.sync();
        m.umount();
        let store = c.store();
        let rec = rt
            .block_on(chunkstore::generation::get_generation(&store, "dmgrec", g))
            .unwrap();
        let entries = rec.embedded.clone().expect("the record carries its pack");
        let blob = entries.iter().max_by_key(|e| e.stored_len).expect("a blob");
        let mut bytes = rt.block_on(store.get(&rec.key())).unwrap().to_vec();
        bytes[blob.offset as usize + blob.stored_len as usize / 2] ^= 0x04;
        rt.block_on(store.put(&rec.key(), bytes.into())).unwrap();
        let out = c.owfs(&["cat", &format!("dmgrec@{g}"), "data.bin"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "[{}] {err}", c.name);
        assert!(err.contains("data.bin"), "[{}] {err}", c.name);
        c.ok(&["log", "dmgrec"]);
    }
}

/// A fork taken while its source is mounted, before the source named its recent packs in an
/// index object: the fork's record lists the source's packs inside records as pending, so
/// every reader of the fork finds them.
#[test]
fn a_fork_reads_what_its_source_keeps_inside_records() {
    for c in Case::all() {
        let m = c.mount_rw("src", "m", &[]);
        let a = noise(50_000, 1);
        std::fs::write(m.path("a.bin"), &a).unwrap();
        m.sync();
        std::fs::write(m.path("b.txt"), b"second commit").unwrap();
        let g = m.sync();
        assert_eq!(
            m.status()["deferred_index_writes"].as_u64(),
            Some(0),
            "[{}] the source's packs are in no index object yet",
            c.name
        );
        c.ok(&["fork", &format!("src@{g}"), "dst"]);
        assert_eq!(c.cat("dst", 1, "a.bin").unwrap(), a, "[{}]", c.name);
        assert_eq!(c.cat("dst", 1, "b.txt").unwrap(), b"second commit");
        let dir = c.dir("dst-restored");
        c.ok(&["restore", "dst", dir.to_str().unwrap()]);
        assert!(
            std::fs::read(dir.join("a.bin")).unwrap() == a,
            "[{}]",
            c.name
        );
        m.umount();
    }
}
