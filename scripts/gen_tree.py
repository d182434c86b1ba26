#!/usr/bin/env python3
"""Helper of scripts/bench-storage.sh: deterministic test trees, the 1 MiB mutation, S3 usage
and the final markdown table. Standard library only, except `s3-usage` (boto3, which
moto[server] installs).

  gen_tree.py mixed DIR [--seed N] [--scale F]   ~1 GiB mixed tree (F scales every part)
  gen_tree.py small DIR --files N --dirs D [--min B] [--max B] [--seed N]
  gen_tree.py mutate DIR --round R               overwrite 1 MiB of a big file, append 4 KiB
  gen_tree.py s3-usage ENDPOINT BUCKET [PREFIX]  prints "<objects> <bytes>"
  gen_tree.py restic-added FILE                  "Added to the repository: X (Y stored)" -> "X Y" bytes
  gen_tree.py table RESULTS.tsv                  markdown tables on stdout
"""

import argparse
import os
import random
import sqlite3
import statistics
import sys

MiB = 1 << 20

WORDS = (
    "request response handler session user account order invoice payment cache miss hit "
    "timeout retry connection pool worker queue job scheduled completed failed started "
    "database query index table row commit rollback snapshot restore upload download chunk "
    "pack tree node leaf hash verify checksum latency bytes elapsed status ok error warn "
    "debug info trace backend frontend gateway proxy upstream downstream client server"
).split()
LEVELS = ["INFO"] * 12 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]
COMPONENTS = ["api", "db", "auth", "billing", "search", "mailer", "sched", "fs", "net", "gc"]


def message_pool(rng, n=4000):
    return [" ".join(rng.choices(WORDS, k=rng.randrange(4, 14))) for _ in range(n)]


def text_block(rng, nbytes, msgs, start_ts=1_700_000_000):
    """Log-like lines: compressible (zstd -1 about 3x) but not repetitive enough to dedup."""
    out = []
    total = 0
    ts = start_ts + rng.randrange(86400)
    while total < nbytes:
        ts += rng.randrange(3)
        line = "%d.%03d %s %s[%d] %s id=%08x dur=%dms\n" % (
            ts,
            rng.randrange(1000),
            rng.choice(LEVELS),
            rng.choice(COMPONENTS),
            rng.randrange(100, 40000),
            rng.choice(msgs),
            rng.getrandbits(32),
            rng.randrange(5000),
        )
        out.append(line)
        total += len(line)
    return "".join(out).encode()[:nbytes]


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def gen_mixed(root, seed, scale):
    rng = random.Random(seed)
    msgs = message_pool(rng)
    # 1. Large incompressible files: 600 MiB.
    for i, mib in enumerate([256, 192, 96, 56]):
        n = max(1, int(mib * scale)) * MiB
        path = os.path.join(root, "big", "blob-%d.bin" % i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            left = n
            while left:
                k = min(left, 16 * MiB)
                f.write(rng.randbytes(k))
                left -= k
    # 2. Compressible log-like text: 300 MiB in 15 files.
    for i in range(15):
        n = max(64 << 10, int(20 * MiB * scale))
        sub = "logs/%s" % COMPONENTS[i % len(COMPONENTS)]
        path = os.path.join(root, sub, "app-%02d.log" % i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            left = n
            while left:
                k = min(left, 4 * MiB)
                f.write(text_block(rng, k, msgs, 1_700_000_000 + i * 86400))
                left -= k
    # 3. ~5,000 small files of 1-20 KiB in nested dirs (half text, half binary).
    nsmall = max(10, int(5000 * scale))
    for i in range(nsmall):
        # 20 x 25 directories of ~10 files each.
        d = "src/m%02d/p%02d" % ((i // 250) % 20, (i // 10) % 25)
        size = rng.randrange(1024, 20 * 1024 + 1)
        if i % 2:
            data = rng.randbytes(size)
            name = "f%05d.bin" % i
        else:
            data = text_block(rng, size, msgs)
            name = "f%05d.txt" % i
        write(os.path.join(root, d, name), data)
    # 4. One SQLite database of ~50 MiB.
    db = os.path.join(root, "db", "app.db")
    os.makedirs(os.path.dirname(db), exist_ok=True)
    if os.path.exists(db):
        os.remove(db)
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, ts INTEGER, kind TEXT, body TEXT, blob BLOB)"
    )
    con.execute("CREATE INDEX events_ts ON events(ts)")
    target = int(50 * MiB * scale)
    rows_per_batch = 2000
    written = 0
    rid = 0
    while written < target:
        batch = []
        for _ in range(rows_per_batch):
            body = " ".join(rng.choices(WORDS, k=rng.randrange(10, 40)))
            blob = rng.randbytes(rng.randrange(32, 256))
            batch.append((rid, 1_700_000_000 + rid, rng.choice(COMPONENTS), body, blob))
            rid += 1
            written += len(body) + len(blob) + 40
        con.executemany("INSERT INTO events VALUES (?,?,?,?,?)", batch)
    con.commit()
    con.close()
    # 5. A few symlinks (relative, to a dir, dangling).
    links = {
        "latest.bin": "big/blob-0.bin",
        "logs/current": "api",
        "src/readme-link": "../logs/api/app-00.log",
        "dangling": "does/not/exist",
    }
    for name, target in links.items():
        p = os.path.join(root, name)
        if os.path.lexists(p):
            os.remove(p)
        os.symlink(target, p)


def gen_small(root, seed, files, dirs, lo, hi):
    rng = random.Random(seed)
    msgs = message_pool(rng)
    for i in range(files):
        d = os.path.join(root, "d%03d" % (i % dirs))
        if i < dirs:
            os.makedirs(d, exist_ok=True)
        size = rng.randrange(lo, hi + 1)
        data = text_block(rng, size, msgs) if i % 2 else rng.randbytes(size)
        with open(os.path.join(d, "f%06d" % i), "wb") as f:
            f.write(data)


def mutate(root, rnd):
    """1 MiB overwritten in place in the middle of the largest file (a different place each
    round) and 4 KiB appended to one small file."""
    rng = random.Random(1000 + rnd)
    big = os.path.join(root, "big", "blob-0.bin")
    size = os.path.getsize(big)
    off = size // 2 + ((rnd * 8 * MiB) % max(MiB, size // 2 - MiB))
    off = min(off, size - MiB)
    with open(big, "r+b") as f:
        f.seek(off)
        f.write(rng.randbytes(MiB))
    small = os.path.join(root, "src", "m00", "p00", "f00000.txt")
    with open(small, "ab") as f:
        f.write(text_block(rng, 4096, message_pool(rng, 200)))


def s3_usage(endpoint, bucket, prefix):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    n = b = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            n += 1
            b += o["Size"]
    print(n, b)


UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def restic_added(path):
    import re

    txt = open(path, errors="replace").read()
    m = re.search(r"Added to the repository: ([\d.]+) (\w+)(?: \(([\d.]+) (\w+) stored\))?", txt)
    if not m:
        print("nan nan")
        return
    raw = float(m.group(1)) * UNITS[m.group(2)]
    stored = float(m.group(3)) * UNITS[m.group(4)] if m.group(3) else raw
    print(int(raw), int(stored))


# ---------------------------------------------------------------------------------------
# Table: RESULTS.tsv has lines "backend<TAB>metric<TAB>tool<TAB>value" (one per repetition).


def load(path):
    res = {}
    for line in open(path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 4:
            continue
        be, metric, tool, val = parts
        try:
            v = float(val)
        except ValueError:
            continue
        res.setdefault((be, metric, tool), []).append(v)
    return res


def med(res, be, metric, tool):
    v = res.get((be, metric, tool))
    return statistics.median(v) if v else None


def fmt_s(v):
    return "–" if v is None else ("%.2f s" % v if v < 100 else "%.0f s" % v)


def fmt_b(v):
    if v is None:
        return "–"
    for unit in ["GiB", "MiB", "KiB"]:
        if v >= UNITS[unit]:
            return "%.2f %s" % (v / UNITS[unit], unit)
    return "%d B" % v


def fmt_n(v):
    return "–" if v is None else "%d" % v


def fmt_r(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return "**%.2f×**" % (a / b)


def nrep(res, be, metric, tool):
    return len(res.get((be, metric, tool), []))


def table(path):
    res = load(path)
    backends = []
    for be, _, _ in res:
        if be not in backends:
            backends.append(be)
    title = {"file": "file:// (local directory store)", "s3": "S3 (moto_server on loopback)"}
    kib = lambda v: fmt_b(v * 1024) if v is not None else "–"
    for be in backends:
        m = lambda metric, tool: med(res, be, metric, tool)
        size, files = m("tree_bytes", "mixed"), m("tree_files", "mixed")
        print("\n#### %s — mixed tree: %s, %s files\n" % (title.get(be, be), fmt_b(size), fmt_n(files)))
        print("| Measurement | owfs | restic | cp -a | owfs / restic | owfs / cp -a |")
        print("|---|---:|---:|---:|---:|---:|")

        def row(label, metric, f, cp=True, n=False):
            o, r = m(metric, "owfs"), m(metric, "restic")
            c = m(metric, "cp") if cp else None
            if o is None and r is None:
                return
            if n:
                reps = max(nrep(res, be, metric, t) for t in ("owfs", "restic", "cp"))
                label = "%s, median of %d" % (label, reps) if reps > 1 else label
            print(
                "| %s | %s | %s | %s | %s | %s |"
                % (label, f(o), f(r), f(c) if cp else "–", fmt_r(o, r), fmt_r(o, c) if cp else "–")
            )

        def ratio(a, b, digits=2):
            return "–" if a is None or not b else ("%%.%df" % digits) % (a / b)

        row("First snapshot, time", "snap1_s", fmt_s, n=True)
        row("First snapshot, peak RSS", "snap1_rss", kib)
        row("Stored after first snapshot (cp -a: tree size)", "stored_bytes", fmt_b)
        row("Objects in the store", "objects", fmt_n, cp=False)
        row("PUT requests, first snapshot", "puts1", fmt_n, cp=False)
        row("Restore, time (cp -a: back from the copy)", "restore_s", fmt_s, n=True)
        row("Restore, peak RSS", "restore_rss", kib)
        row("Second snapshot (~1 MiB changed), time", "snap2_s", fmt_s, cp=False, n=True)
        row("Second snapshot, new data reported (raw)", "snap2_raw", fmt_b, cp=False)
        row("Second snapshot, store growth", "snap2_stored", fmt_b, cp=False)
        row("Second snapshot, PUT requests", "puts2", fmt_n, cp=False)
        print(
            "| Second / first snapshot, time | %s | %s | – | – | – |"
            % (ratio(m("snap2_s", "owfs"), m("snap1_s", "owfs")), ratio(m("snap2_s", "restic"), m("snap1_s", "restic")))
        )
        print(
            "| Second / first snapshot, bytes stored | %s | %s | – | – | – |"
            % (
                ratio(m("snap2_stored", "owfs"), m("stored_bytes", "owfs"), 4),
                ratio(m("snap2_stored", "restic"), m("stored_bytes", "restic"), 4),
            )
        )
        row("10,000 small files: first snapshot, time", "small10k_s", fmt_s, n=True)
        row("10,000 small files: PUT requests", "small10k_puts", fmt_n, cp=False)
        row("10,000 small files: stored", "small10k_bytes", fmt_b, cp=False)
        row("100,000 small files: snapshot, time", "small100k_s", fmt_s)
        row("100,000 small files: snapshot, peak RSS", "small100k_rss", kib)
        row("100,000 small files: PUT requests", "small100k_puts", fmt_n, cp=False)
        row("100,000 small files: restore, time", "small100k_restore_s", fmt_s)
        row("100,000 small files: restore, peak RSS", "small100k_restore_rss", kib)
        notes = []
        rd = m("snap2_read", "owfs")
        if rd is not None:
            notes.append("owfs read %s of file data in each second snapshot" % fmt_b(rd))
        ident = res.get((be, "restore_identical", "owfs"))
        if ident:
            notes.append("owfs restore %s `diff -r` with the tree" % ("passed" if min(ident) == 1 else "FAILED"))
        pl = m("puts1_server_log", "owfs")
        if pl is not None:
            notes.append("PUTs seen by the server for owfs' first snapshot: %s" % fmt_n(pl))
        mr = m("moto_peak_rss_kib", "moto")
        if mr:
            notes.append("moto_server peak RSS %s" % kib(mr))
        if notes:
            print("\n" + "; ".join(notes) + ".")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("mixed")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scale", type=float, default=1.0)
    p = sub.add_parser("small")
    p.add_argument("dir")
    p.add_argument("--files", type=int, required=True)
    p.add_argument("--dirs", type=int, required=True)
    p.add_argument("--min", type=int, default=1024)
    p.add_argument("--max", type=int, default=4096)
    p.add_argument("--seed", type=int, default=7)
    p = sub.add_parser("mutate")
    p.add_argument("dir")
    p.add_argument("--round", type=int, required=True)
    p = sub.add_parser("s3-usage")
    p.add_argument("endpoint")
    p.add_argument("bucket")
    p.add_argument("prefix", nargs="?", default="")
    p = sub.add_parser("restic-added")
    p.add_argument("file")
    p = sub.add_parser("table")
    p.add_argument("results")
    a = ap.parse_args()
    if a.cmd == "mixed":
        gen_mixed(a.dir, a.seed, a.scale)
    elif a.cmd == "small":
        gen_small(a.dir, a.seed, a.files, a.dirs, a.min, a.max)
    elif a.cmd == "mutate":
        mutate(a.dir, a.round)
    elif a.cmd == "s3-usage":
        s3_usage(a.endpoint, a.bucket, a.prefix)
    elif a.cmd == "restic-added":
        restic_added(a.file)
    elif a.cmd == "table":
        table(a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
