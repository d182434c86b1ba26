#!/usr/bin/env python3
"""Mount time on a fresh node against the length of a workspace's history.

For each N of --commits: a new workspace on a new S3 bucket (moto_server on a free loopback
port, started and stopped here) or file:// store, mounted with a long commit interval; N times
(append a line to a file; `owfs sync`); `owfs umount`. Then `owfs mount` of the same workspace
on an empty cache directory is timed (from the command's start until it returns, the mount
ready), and the new daemon's store requests (GET, LIST, from `owfs status --json`) and the
number of index objects in the store are reported, before the file is checked line by line.

Usage: python3 scripts/bench_history.py [--commits 10,200,800] [--backend s3|file]
                                         [--owfs-bin PATH] [--workdir DIR] [--out FILE]
Needs root (FUSE), moto[server] for s3. Prints a Markdown table (and writes it to --out).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start_moto(log):
    port = free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    sys.exit("bench-history: moto_server did not answer")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", default="10,200,800")
    ap.add_argument("--backend", choices=["s3", "file"], default="s3")
    ap.add_argument("--owfs-bin", default=os.path.join(ROOT, "target/release/owfs"))
    ap.add_argument("--workdir", default="/var/tmp/owfs-bench-history")
    ap.add_argument("--out")
    a = ap.parse_args()
    counts = [int(x) for x in a.commits.split(",")]
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    env = dict(os.environ)
    moto = None
    if a.backend == "s3":
        moto, url = start_moto(open(os.path.join(a.workdir, "moto.log"), "w"))
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_REGION="us-east-1", AWS_ENDPOINT_URL=url, AWS_ALLOW_HTTP="true")
    version = subprocess.run([a.owfs_bin, "--version"], capture_output=True, text=True).stdout.strip()
    rows = []
    try:
        for n in counts:
            w = os.path.join(a.workdir, f"n{n}")
            os.makedirs(w)
            if a.backend == "s3":
                bucket = f"hist{n}-{os.getpid()}"
                urllib.request.urlopen(urllib.request.Request(f"{url}/{bucket}", method="PUT"))
                store = f"s3://{bucket}/p"
            else:
                store = f"file://{w}/store"
            e = dict(env, OWFS_STORE=store)

            def owfs(*args, check=True):
                r = subprocess.run([a.owfs_bin, *args], env=e, capture_output=True, text=True,
                                   timeout=600)
                if check and r.returncode != 0:
                    sys.exit(f"bench-history: owfs {' '.join(args)}: {r.stderr.strip()}")
                return r.stdout

            mp1, mp2 = os.path.join(w, "mnt1"), os.path.join(w, "mnt2")
            os.makedirs(mp1)
            os.makedirs(mp2)
            owfs("mount", "hist", mp1, "--cache-dir", os.path.join(w, "c1"),
                 "-o", "commit_interval_ms=600000")
            t0 = time.perf_counter()
            for i in range(n):
                with open(os.path.join(mp1, "log"), "a") as f:
                    f.write(f"line {i}\n")
                owfs("sync", mp1)
            commit_s = time.perf_counter() - t0
            owfs("umount", mp1)
            t0 = time.perf_counter()
            owfs("mount", "hist", mp2, "--cache-dir", os.path.join(w, "c2"))
            mount_s = time.perf_counter() - t0
            st = json.loads(owfs("status", "--json", mp2))
            req = st["requests"]
            with open(os.path.join(mp2, "log")) as f:
                lines = f.read().splitlines()
            owfs("umount", mp2)
            if lines != [f"line {i}" for i in range(n)]:
                sys.exit(f"bench-history: {n} commits: the fresh mount read {len(lines)} lines")
            objs = count_index_objects(a.backend, store, e, w)
            rows.append((n, commit_s / max(n, 1), mount_s, req["gets"], req["lists"], objs))
            print(f"[{time.strftime('%H:%M:%S')}] {n} commits: mount {mount_s:.3f} s, "
                  f"{req['gets']} GET, {req['lists']} LIST, {objs} index objects", flush=True)
    finally:
        if moto:
            moto.kill()
            moto.wait()
        shutil.rmtree(a.workdir, ignore_errors=True)
    out = [f"Mount on an empty cache after N commits ({a.backend}; {version}; "
           f"{time.strftime('%Y-%m-%d %H:%M')} UTC)", "",
           "| commits | per commit (write + `owfs sync`) | fresh mount | GET | LIST | index objects |",
           "|---:|---:|---:|---:|---:|---:|"]
    for n, per, m, g, li, o in rows:
        out.append(f"| {n} | {per * 1000:.0f} ms | {m * 1000:.0f} ms | {g} | {li} | {o} |")
    text = "\n".join(out) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


def count_index_objects(backend, store, env, w):
    if backend == "file":
        d = os.path.join(w, "store", "index")
        return len(os.listdir(d)) if os.path.isdir(d) else 0
    bucket, prefix = store[len("s3://"):].split("/", 1)
    url = f"{env['AWS_ENDPOINT_URL']}/{bucket}?list-type=2&prefix={prefix}/index/"
    n, token = 0, None
    while True:
        u = url + (f"&continuation-token={urllib.parse.quote(token)}" if token else "")
        body = urllib.request.urlopen(u).read().decode()
        n += body.count("<Key>")
        if "<NextContinuationToken>" not in body:
            return n
        token = body.split("<NextContinuationToken>")[1].split("</NextContinuationToken>")[0]


if __name__ == "__main__":
    main()
