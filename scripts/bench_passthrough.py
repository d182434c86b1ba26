#!/usr/bin/env python3
"""What FUSE passthrough would buy owfs on reads, measured (docs/decisions/fuse-caching.md).

Reads one file of --mib MiB four ways, in the same run: native ext4; through the FUSE probe
(owfs/examples/passthrough_probe.rs) answering reads itself (as owfs does); through the probe
with FUSE_PASSTHROUGH (the kernel reads the backing file). It also checks whether the kernel
grants passthrough together with the writeback cache, which owfs needs for its writes.

Workloads: sequential read in 1 MiB reads and 4 KiB preads at random offsets, each with a cold
(dropped) and a warm kernel cache. Medians of --runs; ratios against native.

Usage: python3 scripts/bench_passthrough.py [--mib 256] [--runs 5] [--out FILE]
Needs root (mount, drop_caches) and the probe: cargo build --release -p owfs --example passthrough_probe
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def seq_read(path):
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(MIB):
            pass
    return time.perf_counter() - t0


def rand_read(path, offsets):
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


class Probe:
    def __init__(self, exe, backing, mode):
        self.at = tempfile.mkdtemp(prefix=f"owfs-probe-{mode}-")
        self.proc = subprocess.Popen(
            [exe, backing, self.at, mode], stdout=subprocess.PIPE, text=True
        )
        for _ in range(100):
            if os.path.ismount(self.at):
                break
            time.sleep(0.05)
        else:
            sys.exit(f"bench_passthrough: the probe did not mount {self.at}")
        self.path = os.path.join(self.at, "data")

    def close(self):
        subprocess.run(["umount", self.at], check=True)
        out, _ = self.proc.communicate(timeout=10)
        os.rmdir(self.at)
        return out.strip()


def measure(path, offsets, runs):
    r = {"seq cold": [], "seq warm": [], "rand cold": [], "rand warm": []}
    for _ in range(runs):
        drop_caches()
        r["seq cold"].append(seq_read(path))
        r["seq warm"].append(seq_read(path))
        drop_caches()
        r["rand cold"].append(rand_read(path, offsets))
        r["rand warm"].append(rand_read(path, offsets))
    return {k: statistics.median(v) for k, v in r.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reads", type=int, default=4000, help="random 4 KiB reads per run")
    ap.add_argument("--dir", default="/var/tmp", help="where the test file lives (native ext4)")
    ap.add_argument(
        "--probe",
        default=os.path.join(ROOT, "target/release/examples/passthrough_probe"),
    )
    ap.add_argument("--out")
    a = ap.parse_args()
    if not os.path.exists(a.probe):
        sys.exit(
            f"bench_passthrough: {a.probe} missing: "
            "cargo build --release -p owfs --example passthrough_probe"
        )
    work = tempfile.mkdtemp(prefix="owfs-bench-pt-", dir=a.dir)
    backing = os.path.join(work, "data")
    with open(backing, "wb") as f:
        for _ in range(a.mib):
            f.write(os.urandom(MIB))
    rng = random.Random(7)
    offsets = [rng.randrange(0, a.mib * MIB // 4096) * 4096 for _ in range(a.reads)]

    both = Probe(a.probe, backing, "both")
    with open(both.path, "rb") as f:
        f.read(4096)
    both_says = both.close()

    results = {"native": measure(backing, offsets, a.runs)}
    for mode in ("daemon", "passthrough"):
        p = Probe(a.probe, backing, mode)
        try:
            results[mode] = measure(p.path, offsets, a.runs)
        finally:
            says = p.close()
        if mode == "passthrough" and says != "passthrough: on":
            sys.exit(f"bench_passthrough: passthrough was not used ({says!r})")
    os.remove(backing)
    os.rmdir(work)

    uname = os.uname().release
    lines = [
        f"Reads of one {a.mib} MiB file ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"kernel {uname}, medians of {a.runs}; random = {a.reads} preads of 4 KiB)",
        "",
        "| read | native | daemon answers | passthrough | daemon speed | passthrough speed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in results["native"]:
        n, d, p = (results[s][k] for s in ("native", "daemon", "passthrough"))
        lines.append(
            f"| {k} | {n * 1000:.0f} ms | {d * 1000:.0f} ms | {p * 1000:.0f} ms "
            f"| {n / d:.2f} | {n / p:.2f} |"
        )
    lines += ["", f"Passthrough asked for with the writeback cache: {both_says}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
