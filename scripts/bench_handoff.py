#!/usr/bin/env python3
"""Handoff, crash recovery and idle cost of `owfs mount` (driven by scripts/bench-handoff.sh).

Subcommands:

  run [options]            the whole benchmark on one or more backends; one JSON line per
                           measurement on --out (and progress on stderr)
  report RESULTS.jsonl     the Markdown tables of a run
  append PATH --start N    (internal) the light workload: append the line "N+1", "N+2", ...
                           to PATH every 10 ms (open O_APPEND, write, close) until SIGTERM or
                           the first error (the mount went away); prints the last N written
  freeport                 print a free TCP port on 127.0.0.1
  mkbucket ENDPOINT NAME   create bucket NAME on a moto S3 server

What `run` measures, per backend (file:// directory store, S3 = moto_server on loopback):

  setup      node A mounts workspace `hand` (default options) and writes --files x 16 MiB of
             random data through the mount, then `owfs sync`.
  handoff    --runs runs of each variant, as two chains, each on a fresh store and workspace
             (a mount reads one index object per commit the store has seen, so both chains
             start from the same history): (b) first, then (a). The source node runs the
             light workload (`append`, a line every 10 ms) for at least 1 s before.
             (b) none: the target's cache directory is empty; no node of the chain was ever
                 pre-pulled (the first source is the node that wrote the data);
             (a) pre-pull: the target runs `owfs mount --prefetch-only hand --cache-dir C`
                 while the source runs, before the handoff; every source of the chain was
                 itself pre-pulled (the first one by an untimed handoff).
             Then the kernel's caches are dropped (sync; echo 3 > drop_caches; not with
             --no-drop-caches) and the clock starts: `owfs handoff SRC`; `owfs mount hand DST
             --cache-dir C --wait` (started when the handoff returns); first read (open + read
             4 KiB of one of the data files, checked); first write (a new 4 KiB file: open,
             write, fsync, close). The pause is the time to the end of the first write.
             Then `cat` of every data file > /dev/null: "whole workspace read", measured from
             the same start. In (b) that read is made in every run while it takes under
             --slow-read seconds, else only in the first --full-read-runs runs; in the other
             runs the target is handed on while it still fetches in the background (recorded
             as source_complete = false for the next run).
             Every handoff is checked: the target sees every line the workload appended on
             the source (none lost).
  crash      --crash-runs runs of each: SIGKILL of the source's daemon (pid from `owfs status
             MNT --json`), `umount -l` of its mount, then
             (takeover) `owfs mount hand DST --takeover` (default lease options);
             (wait) the source was mounted with -o lease_ttl_ms=5000,lease_renew_ms=1000,
             lease_margin_ms=1000 and the target mounts with the same options and --wait:
             the time includes waiting for the dead holder's lease to expire (+ the default
             2 s clock-skew allowance).
             Measured from the start of the target's mount: first read, first write (as
             above). Also: lines the workload appended that the target does not see (lost:
             written after the source's last commit) -- they must be a prefix (no holes).
  commits    the workload stopped, 20 x (write a new 4 KiB file; `owfs sync`) on the holder:
             requests per commit from the daemon's counters (`owfs status MNT --json` ->
             requests), and on S3 from moto's request log.
  idle       (in the background, from the start of the run, on its own workspace and store or
             bucket) a mount with default options, one small file written and synced, then
             left alone for --idle-seconds: its store requests from the daemon's counters
             (and on S3 moto's log lines for its bucket), extrapolated to one hour.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the checkout
from benchlib import MOTO_REQUEST, add_store_commands, proc_cpu_s, write_report  # noqa: E402

MIB = 1 << 20
FILE_MIB = 16
WS = "hand"
SHORT_LEASE = "lease_ttl_ms=5000,lease_renew_ms=1000,lease_margin_ms=1000"
T0 = time.monotonic()


def say(msg):
    el = time.monotonic() - T0
    print(f"[{time.strftime('%H:%M:%S')} +{el:5.0f}s] bench-handoff: {msg}", file=sys.stderr, flush=True)


def drop_caches(enabled):
    os.sync()
    if not enabled:
        return
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        return s[s.rindex(")") + 2] != "Z"
    except OSError:
        return False


class Failure(Exception):
    pass


# --- one backend ------------------------------------------------------------------------------


class Backend:
    def __init__(self, name, a, store, env, bucket=None):
        self.name = name
        self.a = a
        self.base_store = store
        self.store = store
        self.env = env
        self.bucket = bucket
        self.dir = os.path.join(a.workdir, name)
        self.logs = os.path.join(self.dir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.env["TMPDIR"] = self.logs  # owfs writes its daemons' logs there
        self.nodes = 0

    def owfs(self, args, timeout=300, check=True, store=None):
        cmd = [self.a.owfs, "--store", store or self.store, "-q"] + args
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failure(f"{self.name}: `owfs {' '.join(args)}` did not return within {timeout} s")
        dt = time.perf_counter() - t0
        if check and p.returncode != 0:
            raise Failure(
                f"{self.name}: `owfs {' '.join(args)}` exited {p.returncode}: "
                f"{(p.stderr or p.stdout).strip()[-400:]}"
            )
        return p, dt

    def new_store(self, suffix):
        """A fresh store (a directory, or a prefix of the bucket) for the next chain."""
        self.store = f"{self.base_store}-{suffix}"
        if self.store.startswith("file://"):
            os.makedirs(self.store[len("file://"):], exist_ok=True)

    def node(self, opts=None, ws=WS, store=None, name=None):
        if name is None:
            self.nodes += 1
            name = f"n{self.nodes:03d}"
        return Node(self, name, opts, ws, store)


LIVE_NODES = []  # every node that may have a mount or a daemon (for clean-up)


class Node:
    def __init__(self, be, name, opts, ws, store):
        self.be = be
        self.name = name
        self.opts = opts
        self.ws = ws
        self.store = store or be.store  # fixed at creation: the backend's store changes per chain
        self.dir = os.path.join(be.dir, name)
        self.mnt = os.path.join(self.dir, "mnt")
        self.cache = os.path.join(self.dir, "cache")
        os.makedirs(self.mnt)
        self.pid = None
        self.log = None
        self.app = None
        self.prepulled = False
        LIVE_NODES.append(self)

    def prepull(self):
        p, dt = self.be.owfs(["--json", "mount", "--prefetch-only", self.ws, "--cache-dir", self.cache],
                             store=self.store)
        try:
            info = json.loads(p.stdout)
        except ValueError:
            info = {"output": p.stdout.strip()[-200:]}
        self.prepulled = True
        return dt, info

    def mount(self, wait=False, takeover=False):
        args = ["mount", self.ws, self.mnt, "--cache-dir", self.cache]
        if self.opts:
            args += ["-o", self.opts]
        if wait:
            args.append("--wait=120s")
        if takeover:
            args.append("--takeover")
        p, dt = self.be.owfs(args, timeout=180, store=self.store)
        m = re.search(r"\(log: ([^)]+)\)", p.stdout + p.stderr)
        self.log = m.group(1) if m else None
        return dt

    def learn_pid(self):
        st = self.status()
        self.pid = st["pid"]
        with open(os.path.join(self.be.a.workdir, "pids"), "a") as f:
            f.write(f"{self.pid}\n")
        return st

    def status(self):
        p, _ = self.be.owfs(["status", self.mnt, "--json"], timeout=60, store=self.store)
        return json.loads(p.stdout)

    def sync(self):
        return self.be.owfs(["sync", self.mnt], timeout=120, store=self.store)[1]

    def handoff(self):
        p, dt = self.be.owfs(["--json", "handoff", self.mnt], timeout=180, store=self.store)
        try:
            info = json.loads(p.stdout)
        except ValueError:
            info = {}
        return dt, info

    # the light workload
    def start_appender(self, start_n):
        self.app_start = start_n
        self.app_t0 = time.monotonic()
        self.app = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "append", os.path.join(self.mnt, "appender.log"),
             "--start", str(start_n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def appender_ran_for(self, seconds):
        left = self.app_t0 + seconds - time.monotonic()
        if left > 0:
            time.sleep(left)

    def stop_appender(self, signal_it=True):
        """Returns the last line number written (and closed) by the workload on this node."""
        if not self.app:
            return None
        if signal_it and self.app.poll() is None:
            self.app.send_signal(signal.SIGTERM)
        try:
            out, err = self.app.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.app.kill()
            out, err = self.app.communicate()
        self.app = None
        try:
            return int(out.split()[0])
        except (ValueError, IndexError):
            raise Failure(f"{self.be.name}: the workload on {self.name} printed {out!r} {err[-300:]!r}")

    def appended_lines(self):
        """The workload's file as this node sees it: its lines, which must be 1..N."""
        path = os.path.join(self.mnt, "appender.log")
        if not os.path.exists(path):
            return 0
        with open(path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for i, l in enumerate(lines):
            if l != str(i + 1).encode():
                raise Failure(f"{self.be.name}: appender.log on {self.name}: line {i + 1} is {l[:40]!r}")
        return len(lines)

    def wait_quiet(self, limit=60.0):
        """Until the daemon uses under 10% of a CPU over 1 s (its background prefetch done)."""
        t0 = time.monotonic()
        prev = proc_cpu_s(self.pid)
        while prev is not None and time.monotonic() - t0 < limit:
            time.sleep(1.0)
            cur = proc_cpu_s(self.pid)
            if cur is None or cur - prev < 0.1:
                break
            prev = cur
        return round(time.monotonic() - t0, 1)

    def wait_exit(self, limit=60.0):
        t0 = time.monotonic()
        while self.pid and alive(self.pid) and time.monotonic() - t0 < limit:
            time.sleep(0.02)
        return not (self.pid and alive(self.pid))

    def kill9(self):
        os.kill(self.pid, signal.SIGKILL)

    def destroy(self):
        """After its daemon is gone: collect a panic from its log, remove its directories."""
        notes = []
        if self.app:
            self.stop_appender()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        if self.pid and alive(self.pid):
            self.wait_exit(30)
        if self.log and os.path.exists(self.log):
            with open(self.log, errors="replace") as f:
                text = f.read()
            if "panicked" in text:
                lines = text.splitlines()
                i = next(i for i, l in enumerate(lines) if "panicked" in l)
                what = " ".join(l.strip() for l in lines[i:i + 2])
                notes.append(f"{self.be.name}: daemon of node {self.name} (pid {self.pid}) panicked: {what[:300]}")
        shutil.rmtree(self.dir, ignore_errors=True)
        if self in LIVE_NODES:
            LIVE_NODES.remove(self)
        return notes


# --- data -------------------------------------------------------------------------------------


def write_data(node, nfiles):
    """nfiles x 16 MiB of random data through the mount; returns {name: (sha of first 4 KiB, sha)}."""
    hashes = {}
    for i in range(nfiles):
        name = f"data{i:03d}.bin"
        data = os.urandom(FILE_MIB * MIB)
        with open(os.path.join(node.mnt, name), "wb") as f:
            f.write(data)
        hashes[name] = (hashlib.sha256(data[:4096]).hexdigest(), hashlib.sha256(data).hexdigest())
    return hashes


def first_read(node, name, hashes):
    with open(os.path.join(node.mnt, name), "rb") as f:
        b = f.read(4096)
    if hashlib.sha256(b).hexdigest() != hashes[name][0]:
        raise Failure(f"{node.be.name}: first 4 KiB of {name} on {node.name} differ from what was written")


def first_write(node, tag):
    fd = os.open(os.path.join(node.mnt, f"w-{tag}.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, os.urandom(4096))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(node, hashes, check):
    cat_all(node, hashes)
    verify_file(node, hashes, check)


def cat_all(node, hashes):
    p = subprocess.run(["cat"] + [os.path.join(node.mnt, n) for n in sorted(hashes)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise Failure(f"{node.be.name}: cat of the workspace on {node.name} failed: {p.stderr.strip()[-300:]}")


def verify_file(node, hashes, check):
    h = hashlib.sha256()
    with open(os.path.join(node.mnt, check), "rb") as f:
        while b := f.read(MIB):
            h.update(b)
    if h.hexdigest() != hashes[check][1]:
        raise Failure(f"{node.be.name}: {check} on {node.name} differs from what was written")


# --- the phases -------------------------------------------------------------------------------


class Runner:
    def __init__(self, a, be, out):
        self.a = a
        self.be = be
        self.out = out
        self.lines = 0  # lines of the workload's file in the latest generation
        self.notes = []

    def emit(self, rec):
        rec = dict(rec, backend=self.be.name)
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()

    def retire(self, node):
        """Wait for a node's daemon to exit (after a handoff), then remove its directories."""
        node.wait_exit(60)
        for n in node.destroy():
            self.notes.append(n)
            self.emit({"kind": "note", "text": n})

    def new_source(self, node):
        """node now holds the workspace: check the workload's file, start the workload there."""
        self.lines = node.appended_lines()
        node.start_appender(self.lines)

    def setup(self, chain):
        a = self.a
        self.be.new_store(chain)
        src = self.be.node()
        t = src.mount()
        src.learn_pid()
        say(f"{self.be.name}: node {src.name} mounted in {t:.2f} s; writing {a.files} x {FILE_MIB} MiB")
        t0 = time.perf_counter()
        self.hashes = write_data(src, a.files)
        t_write = time.perf_counter() - t0
        t_sync = src.sync()
        self.emit({"kind": "setup", "chain": chain, "store": self.be.store, "files": a.files, "mib": a.files * FILE_MIB, "write_s": round(t_write, 2),
                   "sync_s": round(t_sync, 2), "requests": src.status()["requests"]})
        say(f"{self.be.name}: wrote in {t_write:.1f} s, synced in {t_sync:.2f} s")
        self.new_source(src)
        src.wait_quiet(10)
        return src

    def move_untimed(self, src, opts=None):
        """Hand the workspace to a fresh pre-pulled node (not measured): a source whose working
        copy is complete for the next run."""
        dst = self.be.node(opts)
        dst.prepull()
        src.appender_ran_for(0.3)
        _, info = src.handoff()
        written = src.stop_appender(signal_it=False)
        dst.mount(wait=True)
        dst.learn_pid()
        got = dst.appended_lines()
        if got < written:
            raise Failure(f"{self.be.name}: after a handoff {dst.name} sees {got} lines, {written} were written")
        read_all(dst, self.hashes, sorted(self.hashes)[0])
        self.retire(src)
        self.new_source(dst)
        dst.wait_quiet()
        return dst

    def handoffs(self, src):
        """Two chains: (b) first -- every source an earlier target that had an empty cache,
        the first one the setup node -- then (a), every source an earlier pre-pulled target
        (the first made so by an untimed move). A chain is what an operator runs: pre-pull on
        every handoff or never."""
        a = self.a
        names = sorted(self.hashes)
        full_b = 0  # (b) runs whose whole-workspace read was measured
        b_slow = False
        src_complete = True
        for variant in ("none", "prepull"):
            if variant == "prepull":
                # A fresh store and workspace, so both chains start from the same history
                # (a mount reads one index object per commit ever made in the store).
                src.appender_ran_for(0.2)
                src.handoff()
                src.stop_appender(signal_it=False)
                self.retire(src)
                src = self.setup("a")
                src = self.move_untimed(src)
                src_complete = True
            for run in range(1, a.runs + 1):
                dst = self.be.node()
                rec = {"kind": "handoff", "variant": variant, "run": run,
                       "source": "pre-pulled" if src.prepulled else "empty cache",
                       "source_complete": src_complete}
                if variant == "prepull":
                    dt, info = dst.prepull()
                    rec["prepull_s"] = round(dt, 3)
                    rec["prepull"] = info
                src.appender_ran_for(1.0)
                drop_caches(a.drop_caches)
                target = names[(run * 7 + (variant == "none")) % len(names)]
                t0 = time.perf_counter()
                t_h, info = src.handoff()
                t1 = time.perf_counter()
                dst.mount(wait=True)
                t2 = time.perf_counter()
                first_read(dst, target, self.hashes)
                t3 = time.perf_counter()
                first_write(dst, f"{variant}-{run}")
                t4 = time.perf_counter()
                rec.update(generation=info.get("generation"), handoff_s=round(t1 - t0, 4),
                           mount_s=round(t2 - t1, 4), read_s=round(t3 - t2, 4), write_s=round(t4 - t3, 4),
                           pause_s=round(t4 - t0, 4))
                measure_all = variant == "prepull" or not b_slow or full_b < a.full_read_runs
                if measure_all:
                    cat_all(dst, self.hashes)
                    t5 = time.perf_counter()
                    verify_file(dst, self.hashes, target)
                    rec["read_all_s"] = round(t5 - t0, 3)
                    if variant == "none":
                        full_b += 1
                        if t5 - t0 > a.slow_read:
                            b_slow = True
                written = src.stop_appender(signal_it=False)
                dst.learn_pid()
                got = dst.appended_lines()
                rec.update(lines_written=written, lines_seen=got, lines_lost=max(0, written - got))
                if got < written:
                    raise Failure(f"{self.be.name}: handoff run {run} ({variant}): {dst.name} sees {got} "
                                  f"lines of the workload, {written} were written before the handoff")
                self.retire(src)
                self.new_source(dst)
                # Without the whole read the target is still fetching in the background (the
                # next run's source is then incomplete: recorded as source_complete).
                if measure_all:
                    rec["settle_s"] = dst.wait_quiet()
                self.emit(rec)
                say(f"{self.be.name}: handoff {variant:7s} {run}/{a.runs}: pause {rec['pause_s'] * 1000:6.0f} ms "
                    f"(handoff {rec['handoff_s'] * 1000:.0f}, mount {rec['mount_s'] * 1000:.0f}, read "
                    f"{rec['read_s'] * 1000:.0f}, write {rec['write_s'] * 1000:.0f})"
                    + (f", whole read at {rec['read_all_s']:.1f} s" if "read_all_s" in rec else "")
                    + (f", pre-pull {rec['prepull_s']:.1f} s" if "prepull_s" in rec else ""))
                src = dst
                src_complete = measure_all
        return src

    def crashes(self, src):
        a = self.a
        names = sorted(self.hashes)
        plan = [("takeover", r) for r in range(1, a.crash_runs + 1)] + [("wait", r) for r in range(1, a.crash_runs + 1)]
        for i, (variant, run) in enumerate(plan):
            opts = SHORT_LEASE if variant == "wait" else None
            if src.opts != opts:
                src = self.move_untimed(src, opts)
            src.appender_ran_for(1.5)
            dst = self.be.node(opts)
            target = names[(run * 5 + 3) % len(names)]
            tk = time.perf_counter()
            src.kill9()
            subprocess.run(["umount", "-l", src.mnt], check=True)
            t0 = time.perf_counter()
            dst.mount(wait=variant == "wait", takeover=variant == "takeover")
            t1 = time.perf_counter()
            first_read(dst, target, self.hashes)
            t2 = time.perf_counter()
            first_write(dst, f"crash-{variant}-{run}")
            t3 = time.perf_counter()
            written = src.stop_appender()
            dst.learn_pid()
            got = dst.appended_lines()
            rec = {"kind": "crash", "variant": variant, "run": run, "kill_to_mount_start_s": round(t0 - tk, 4),
                   "mount_s": round(t1 - t0, 4), "first_read_s": round(t2 - t0, 4),
                   "first_write_s": round(t3 - t0, 4), "lines_written": written, "lines_seen": got,
                   "lines_lost": max(0, written - got)}
            if variant == "wait":
                rec["opts"] = SHORT_LEASE
            self.retire(src)
            self.emit(rec)
            say(f"{self.be.name}: crash {variant:8s} {run}/{a.crash_runs}: first read {rec['first_read_s'] * 1000:.0f} ms, "
                f"first write {rec['first_write_s'] * 1000:.0f} ms after the mount started; "
                f"{rec['lines_lost']} of {written} appended lines lost")
            # The next source: complete working copy, lease options of the next run.
            nxt = plan[i + 1][0] if i + 1 < len(plan) else "end"
            self.new_source(dst)
            src = self.move_untimed(dst, SHORT_LEASE if nxt == "wait" else None)
        return src

    def commits(self, src, reqlog, n=20):
        src.stop_appender()
        time.sleep(2.0)  # the workload's last commit
        s0 = src.status()
        pos0 = os.path.getsize(reqlog) if reqlog else None
        t0 = time.perf_counter()
        for i in range(n):
            with open(os.path.join(src.mnt, f"commit-{i:02d}.bin"), "wb") as f:
                f.write(os.urandom(4096))
            src.sync()
        dt = time.perf_counter() - t0
        time.sleep(0.5)
        s1 = src.status()
        rec = {"kind": "commits", "commits": n, "seconds": round(dt, 3),
               "commits_counted": s1["commits"] - s0["commits"],
               "requests": {k: s1["requests"][k] - s0["requests"][k] for k in s1["requests"]},
               "renewals": s1["lease"]["renewals"] - s0["lease"]["renewals"]}
        if reqlog:
            rec["server_log"] = count_log(reqlog, pos0, os.path.getsize(reqlog), self.be.bucket)
        self.emit(rec)
        r = rec["requests"]
        say(f"{self.be.name}: {n} commits: {r['puts']} PUT, {r['gets']} GET, {r['lists']} LIST "
            f"({rec['commits_counted']} commits counted by the daemon, {rec['renewals']} lease renewals)")
        src.handoff()
        self.retire(src)


def count_log(path, start, end, bucket):
    """Requests in moto's log between byte offsets, for one bucket: PUT/GET/LIST/HEAD/DELETE/POST."""
    counts = {"puts": 0, "gets": 0, "lists": 0, "heads": 0, "deletes": 0, "posts": 0}
    with open(path, "rb") as f:
        f.seek(start)
        chunk = f.read(end - start)
    for line in chunk.decode("utf-8", "replace").splitlines():
        m = MOTO_REQUEST.search(line)
        if not m:
            continue
        method, p = m.group(1), m.group(2).split("?", 1)[0].strip("/")
        if p.split("/", 1)[0] != bucket:
            continue
        if method == "GET":
            counts["lists" if "/" not in p else "gets"] += 1
        elif method in ("PUT", "HEAD", "DELETE", "POST"):
            counts[method.lower() + "s"] += 1
    return counts


def idle_thread(a, be, reqlog, out, errors):
    """A mount left alone: its store requests over --idle-seconds."""
    try:
        node = be.node(ws="idle", store=be.idle_store, name="idle")
        node.mount()
        node.learn_pid()
        with open(os.path.join(node.mnt, "hello.txt"), "w") as f:
            f.write("idle workspace\n")
        node.sync()
        time.sleep(3.0)
        s0 = node.status()
        pos0 = os.path.getsize(reqlog) if reqlog else None
        t0 = time.monotonic()
        time.sleep(a.idle_seconds)
        s1 = node.status()
        secs = time.monotonic() - t0
        rec = {"kind": "idle", "backend": be.name, "seconds": round(secs, 1),
               "requests": {k: s1["requests"][k] - s0["requests"][k] for k in s1["requests"]},
               "renewals": s1["lease"]["renewals"] - s0["lease"]["renewals"],
               "commits": s1["commits"] - s0["commits"],
               "renew_every_ms": s1["lease"].get("renew_every_ms"), "ttl_ms": s1["lease"].get("ttl_ms")}
        if reqlog:
            rec["server_log"] = count_log(reqlog, pos0, os.path.getsize(reqlog), be.idle_bucket)
        out.write(json.dumps(rec) + "\n")
        out.flush()
        r = rec["requests"]
        say(f"{be.name}: idle {secs:.0f} s: {r['puts']} PUT, {r['gets']} GET, {r['lists']} LIST, "
            f"{r['deletes']} DELETE, {rec['renewals']} renewals")
        node.handoff()
        node.wait_exit(60)
        node.destroy()
    except Exception as e:  # reported, the rest of the run goes on
        errors.append(f"{be.name}: idle: {e}")


class LockedOut:
    def __init__(self, f, lock):
        self.f = f
        self.lock = lock

    def write(self, s):
        with self.lock:
            self.f.write(s)

    def flush(self):
        with self.lock:
            self.f.flush()


def cmd_run(a):
    os.makedirs(a.workdir, exist_ok=True)
    lock = threading.RLock()
    raw = open(a.out, "a")
    out = LockedOut(raw, lock)
    base_env = dict(os.environ)
    backends = []
    for name in a.backends.split(","):
        if name == "file":
            store = f"file://{a.workdir}/file/store"
            idle_store = f"file://{a.workdir}/file/store-idle"
            for d in (store, idle_store):
                os.makedirs(d[len("file://"):], exist_ok=True)
            be = Backend("file", a, store, dict(base_env))
            be.idle_store, be.idle_bucket = idle_store, None
            backends.append((be, None))
        elif name == "s3":
            if not a.endpoint:
                say("s3: no --endpoint: skipped")
                continue
            env = dict(base_env, AWS_ENDPOINT_URL=a.endpoint, AWS_ALLOW_HTTP="true")
            be = Backend("s3", a, f"s3://{a.bucket}/owfs", env, bucket=a.bucket)
            be.idle_store, be.idle_bucket = f"s3://{a.bucket}-idle/owfs", f"{a.bucket}-idle"
            backends.append((be, a.moto_log))
        else:
            sys.exit(f"unknown backend {name}")
    meminfo = open("/proc/meminfo").read()
    mem_gib = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 1048576
    out.write(json.dumps({
        "kind": "info", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "backends": ",".join(be.name for be, _ in backends), "files": a.files, "runs": a.runs,
        "crash_runs": a.crash_runs, "idle_seconds": a.idle_seconds, "drop_caches": a.drop_caches,
        "full_read_runs": a.full_read_runs, "slow_read": a.slow_read,
        "host": f"{os.cpu_count()} CPUs, {mem_gib:.0f} GiB RAM, kernel {os.uname().release}",
        "command": a.command, "owfs": a.version, "moto": a.moto_version}) + "\n")
    errors = []
    idlers = [threading.Thread(target=idle_thread, args=(a, be, log, out, errors), daemon=True)
              for be, log in backends if a.idle_seconds > 0]
    for t in idlers:
        t.start()
    say(f"idle mounts started on {', '.join(be.name for be, _ in backends)} ({a.idle_seconds:.0f} s, in the background)")
    for be, log in backends:
        r = Runner(a, be, out)
        t0 = time.monotonic()
        try:
            src = r.setup("b")
            src = r.handoffs(src)
            src = r.crashes(src)
            r.commits(src, log)
        except Exception as e:  # noqa: BLE001 -- reported; the next backend still runs
            why = str(e) if isinstance(e, Failure) else f"{type(e).__name__}: {e}"
            say(f"FAILED: {why}")
            r.emit({"kind": "failed", "why": why})
            errors.append(None)
        finally:
            for n in list(LIVE_NODES):
                if n.be is be and n.ws == WS:
                    if n.app:
                        n.stop_appender()
                    if n.pid and alive(n.pid) and os.path.ismount(n.mnt):
                        try:
                            n.handoff()
                        except Exception:  # noqa: BLE001
                            pass
                    n.destroy()
        r.emit({"kind": "phase_time", "seconds": round(time.monotonic() - t0, 1)})
    for t in idlers:
        t.join()
    for e in (e for e in errors if e):
        say(f"FAILED: {e}")
        out.write(json.dumps({"kind": "failed", "why": e}) + "\n")
    out.write(json.dumps({"kind": "total", "seconds": round(time.monotonic() - T0, 1)}) + "\n")
    raw.close()
    if errors:
        sys.exit(1)


def cmd_append(a):
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    n = a.start
    why = "stopped"
    dev = os.stat(os.path.dirname(a.path)).st_dev
    while not stop:
        try:
            fd = os.open(a.path, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if n == 0 else 0), 0o644)
        except OSError as e:
            why = f"open: {e.strerror}"
            break
        try:
            if os.fstat(fd).st_dev != dev:
                why = "the mount went away"
                os.close(fd)
                break
            os.write(fd, f"{n + 1}\n".encode())
            os.close(fd)
        except OSError as e:
            why = f"write/close: {e.strerror}"
            try:
                os.close(fd)
            except OSError:
                pass
            break
        n += 1
        time.sleep(0.01)
    print(n, why)


# --- report -----------------------------------------------------------------------------------


def pct(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def ms(x):
    if x is None:
        return "—"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1000:.0f} ms"


def cmd_report(a):
    recs = []
    with open(a.results) as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    info = next((r for r in recs if r.get("kind") == "info"), {})
    backends = [b for b in info.get("backends", "file,s3").split(",")]
    label = {"file": "file://", "s3": "S3 (moto)"}

    def variant_runs(kind, variants):
        """(backend, variant label, its records) for every backend and variant that has any."""
        for b in backends:
            for v, vl in variants:
                rs = [r for r in recs if r.get("kind") == kind and r["backend"] == b and r["variant"] == v]
                if rs:
                    yield b, vl, rs

    o = []
    w = o.append
    mib = info.get("files", 0) * FILE_MIB
    size = f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"
    w(f"Run: {info.get('date', '?')}; {info.get('host', '?')}; owfs {info.get('owfs', '?')}"
      + (f"; moto {info['moto']} on 127.0.0.1" if info.get("moto") else "") + ".")
    tot = next((r["seconds"] for r in recs if r.get("kind") == "total"), None)
    w(f"Command: `{info.get('command', '?')}`" + (f" (whole run {tot / 60:.1f} min)." if tot else "."))
    w("")
    w(f"Workspace: {info.get('files', '?')} files x {FILE_MIB} MiB = {size} of random data; "
      f"page cache dropped before each handoff: {'yes' if info.get('drop_caches') else 'no'}.")
    w("")
    w("**Planned handoff** (`owfs handoff` on the source while it runs a line-append every 10 ms; "
      "then `owfs mount --wait` of the target; pause = until the target has served a first 4 KiB "
      "read and a first 4 KiB write + fsync). Whole read = from the same start until `cat` of every "
      "data file on the target has finished. Generations = the workspace's generation handed off "
      "(first–last run); each chain starts on a fresh store.")
    w("")
    w("| store | variant | runs | pause P50 | P95 | max | handoff P50 | mount P50 | first read P50 | "
      "first write P50 | whole read P50 | whole read max (n) | pre-pull P50 | generations |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, vl, rs in variant_runs("handoff", (("prepull", "(a) pre-pulled"), ("none", "(b) empty cache"))):
        p = [r["pause_s"] for r in rs]
        ra = [r["read_all_s"] for r in rs if "read_all_s" in r]
        pp = [r["prepull_s"] for r in rs if "prepull_s" in r]
        med = lambda k: statistics.median(r[k] for r in rs)
        w(f"| {label[b]} | {vl} | {len(rs)} | **{ms(statistics.median(p))}** | {ms(pct(p, 95))} | "
          f"{ms(max(p))} | {ms(med('handoff_s'))} | {ms(med('mount_s'))} | {ms(med('read_s'))} | "
          f"{ms(med('write_s'))} | **{ms(statistics.median(ra)) if ra else '—'}** | "
          f"{(ms(max(ra)) + f' ({len(ra)})') if ra else '—'} | {ms(statistics.median(pp)) if pp else '—'} | "
          f"{min(r['generation'] for r in rs)}–{max(r['generation'] for r in rs)} |")
    w("")
    w("Chains: in (a) every source node had itself been pre-pulled (the previous target); in (b) "
      "no node ever was (the first source is the node that wrote the data).")
    inc = [r for r in recs if r.get("kind") == "handoff" and not r.get("source_complete", True)]
    for b in backends:
        n_inc = len([r for r in inc if r["backend"] == b])
        n_all = len([r for r in recs if r.get("kind") == "handoff" and r["backend"] == b and r["variant"] == "none"])
        if n_inc:
            w(f"On {label[b]}, {n_inc} of the {n_all} (b) runs started from a source still fetching the "
              f"workspace in the background (the previous target, whose whole read was not measured: "
              f"it took over {info.get('slow_read', '?'):.0f} s, so it was measured in the first "
              f"{info.get('full_read_runs', '?')} runs only).")
    lost = sum(r.get("lines_lost", 0) for r in recs if r.get("kind") == "handoff")
    nh = len([r for r in recs if r.get("kind") == "handoff"])
    w("")
    w(f"Appended lines lost over the {nh} handoffs: {lost} (every target saw every line the source's "
      f"workload had written).")
    w("")
    w("**Crash recovery** (SIGKILL of the source's daemon, `umount -l`, then the target's mount; times "
      "from the start of the target's `owfs mount`, empty cache). Lost = lines the workload had "
      "appended after the source's last commit (10 ms apart); the target always saw a prefix.")
    w("")
    w("| store | variant | runs | first read P50 | max | first write P50 | max | mount P50 | lines lost P50 | max |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, vl, rs in variant_runs("crash", (("takeover", "`--takeover`"), ("wait", "`--wait`, ttl 5 s"))):
        fr = [r["first_read_s"] for r in rs]
        fw = [r["first_write_s"] for r in rs]
        lo = [r["lines_lost"] for r in rs]
        w(f"| {label[b]} | {vl} | {len(rs)} | {ms(statistics.median(fr))} | {ms(max(fr))} | "
          f"**{ms(statistics.median(fw))}** | {ms(max(fw))} | {ms(statistics.median(r['mount_s'] for r in rs))} | "
          f"{statistics.median(lo):.0f} | {max(lo)} |")
    w("")
    w("**Store requests of an idle mount** (default options: lease renewed every 10 s; counters of the "
      "daemon, `owfs status MNT --json` → requests; S3 also moto's log lines for the bucket).")
    w("")
    w("| store | idle s | PUT | GET | LIST | DELETE | lease renewals | commits | requests/h | PUT/h | server log (S3) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for b in backends:
        for r in (r for r in recs if r.get("kind") == "idle" and r["backend"] == b):
            q = r["requests"]
            tot = q["puts"] + q["gets"] + q["lists"] + q["deletes"]
            per_h = 3600 / r["seconds"]
            sl = r.get("server_log")
            slt = "—"
            if sl:
                slt = ", ".join(f"{v} {k[:-1].upper()}" for k, v in sl.items() if v) or "0"
            w(f"| {label[b]} | {r['seconds']:.0f} | {q['puts']} | {q['gets']} | {q['lists']} | {q['deletes']} | "
              f"{r['renewals']} | {r['commits']} | **{tot * per_h:.0f}** | {q['puts'] * per_h:.0f} | {slt} |")
    w("")
    w("**Requests per commit** (one new 4 KiB file, then `owfs sync`, 20 times; no other activity).")
    w("")
    w("| store | commits | PUT/commit | GET/commit | LIST/commit | DELETE/commit | renewals in window | server log per commit (S3) |")
    w("|---|---:|---:|---:|---:|---:|---:|---|")
    for b in backends:
        for r in (r for r in recs if r.get("kind") == "commits" and r["backend"] == b):
            q, n = r["requests"], r["commits"]
            sl = r.get("server_log")
            slt = "—"
            if sl:
                slt = ", ".join(f"{v / n:.2f} {k[:-1].upper()}" for k, v in sl.items() if v) or "0"
            w(f"| {label[b]} | {n} | {q['puts'] / n:.2f} | {q['gets'] / n:.2f} | {q['lists'] / n:.2f} | "
              f"{q['deletes'] / n:.2f} | {r['renewals']} | {slt} |")
    w("")
    for r in recs:
        if r.get("kind") == "setup":
            w(f"- Setup on {label[r['backend']]}, chain ({r.get('chain', '?')}): {r['mib']} MiB written "
              f"through the mount in {r['write_s']:.1f} s, `owfs sync` {r['sync_s']:.2f} s.")
    for r in recs:
        if r.get("kind") == "phase_time":
            w(f"- {label[r['backend']]}: all phases took {r['seconds']:.0f} s.")
    panics = {}
    for r in recs:
        if r.get("kind") == "failed":
            w(f"- **FAILED** {r.get('backend', '')}: {r['why']}")
        elif r.get("kind") == "note":
            m = re.match(r"(\w+): daemon of node (\S+) \(pid \d+\) panicked: (.*)", r["text"])
            if m:
                panics.setdefault((m.group(1), re.sub(r"\(\d+\)", "(N)", m.group(3))), []).append(m.group(2))
            else:
                w(f"- {r['text']}")
    for (b, what), nodes in panics.items():
        w(f"- {label.get(b, b)}: the daemon{'' if len(nodes) == 1 else 's'} of {len(nodes)} node{'' if len(nodes) == 1 else 's'} ({', '.join(nodes)}) logged a panic at exit: {what}")
    write_report(o, a.md)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--owfs", required=True)
    r.add_argument("--workdir", required=True)
    r.add_argument("--out", required=True, help="JSONL results (appended)")
    r.add_argument("--backends", default="file,s3")
    r.add_argument("--endpoint", default="")
    r.add_argument("--bucket", default="hb-hand")
    r.add_argument("--moto-log", default="")
    r.add_argument("--files", type=int, default=64)
    r.add_argument("--runs", type=int, default=20)
    r.add_argument("--crash-runs", type=int, default=5)
    r.add_argument("--idle-seconds", type=float, default=120)
    r.add_argument("--full-read-runs", type=int, default=3)
    r.add_argument("--slow-read", type=float, default=15.0)
    r.add_argument("--no-drop-caches", dest="drop_caches", action="store_false")
    r.add_argument("--command", default="", help="for the record")
    r.add_argument("--version", default="", help="owfs version/commit, for the record")
    r.add_argument("--moto-version", default="")
    r.set_defaults(fn=cmd_run)
    q = sub.add_parser("append")
    q.add_argument("path")
    q.add_argument("--start", type=int, default=0)
    q.set_defaults(fn=cmd_append)
    q = sub.add_parser("report")
    q.add_argument("results")
    q.add_argument("--md")
    q.set_defaults(fn=cmd_report)
    add_store_commands(sub)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
