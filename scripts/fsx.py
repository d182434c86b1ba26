#!/usr/bin/env python3
"""fsx.py: a bounded, seeded random I/O exerciser in the spirit of fsx (File System eXerciser).

On one file in DIR it runs --ops random operations and keeps what the file must contain in
memory: writes at random offsets (past EOF too, leaving holes), reads compared with the model,
truncates up and down, mmap reads, mmap writes with msync, fallocate (growing the file and
KEEP_SIZE), hole punching, fsync, close and reopen, copy_file_range within the file, and
dropping the file's page cache (posix_fadvise DONTNEED). Every --check-every operations and at
the end it compares the file's size and whole content with the model. On a difference it
prints the last 20 operations, the first differing offset and the bytes expected and found,
keeps the file, and exits 1. An operation the file system does not support (EOPNOTSUPP etc.)
is switched off for the rest of the run, and said so.

The same --seed (with the same options) repeats the same operations. Python 3 stdlib only.

Exit: 0 all verified, 1 mismatch or unexpected error, 2 usage error.
"""

import argparse
import collections
import ctypes
import ctypes.util
import errno
import mmap
import os
import random
import sys
import time

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PAGE = mmap.PAGESIZE
UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY}

# operation -> relative weight
WEIGHTS = {
    "write": 20,
    "read": 14,
    "truncate": 6,
    "mapread": 8,
    "mapwrite": 8,
    "falloc": 4,
    "falloc_keep": 4,
    "punch": 5,
    "copy_range": 7,
    "fsync": 3,
    "reopen": 3,
    "dropcache": 3,
}


class Mismatch(Exception):
    pass


def _libc_fallocate():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "fallocate64", None) or libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


class Fsx:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.path = os.path.join(args.dir, args.file or "fsx-%d.dat" % args.seed)
        self.model = bytearray()
        self.log = collections.deque(maxlen=20)
        self.counts = collections.Counter()
        self.opno = 0
        self.fd = -1
        self.max_len = min(args.max_len, args.max_size)
        self._fallocate = _libc_fallocate()
        self.weights = dict(WEIGHTS)

    # --- helpers ----------------------------------------------------------------------------

    def say(self, msg):
        print("fsx: " + msg, flush=True)

    def disable(self, *ops, why):
        for op in ops:
            if self.weights.get(op):
                self.weights[op] = 0
        self.say("%s disabled: %s" % (" and ".join(ops), why))

    def note(self, text):
        self.log.append("#%d %s (size now 0x%x)" % (self.opno, text, len(self.model)))
        if self.a.verbose:
            self.say(self.log[-1])

    def open(self):
        self.fd = os.open(self.path, os.O_RDWR)

    def resize_model(self, size):
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def apply(self, off, data):
        end = off + len(data)
        if end > len(self.model):
            self.resize_model(end)
        self.model[off:end] = data

    def fallocate(self, mode, off, length):
        if self._fallocate(self.fd, mode, off, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def rand_len(self):
        # mostly small, sometimes up to max_len, sometimes exactly page-sized
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randint(1, min(4096, self.max_len))
        if r < 0.6:
            return min(PAGE * self.rng.randint(1, 4), self.max_len)
        return self.rng.randint(1, self.max_len)

    def rand_off(self, length, limit=None):
        """An offset for `length` bytes below `limit` (default max_size), biased towards EOF
        and page boundaries, where file systems tend to get it wrong."""
        limit = self.a.max_size if limit is None else limit
        hi = max(0, limit - length)
        size = len(self.model)
        r = self.rng.random()
        if r < 0.25 and size:
            off = size + self.rng.randint(-2 * PAGE, 2 * PAGE)
        elif r < 0.45:
            off = self.rng.randint(0, hi // PAGE) * PAGE + self.rng.choice((0, 0, -1, 1))
        else:
            off = self.rng.randint(0, hi)
        return min(max(off, 0), hi)

    def read_file(self, off, length):
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self.fd, length - len(out), off + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def compare(self, what, off, expected, got):
        if expected == got:
            return
        n = min(len(expected), len(got))
        first = next((i for i in range(n) if expected[i] != got[i]), n)
        lines = ["%s: data differ at file offset 0x%x (%d)" % (what, off + first, off + first)]
        if len(expected) != len(got):
            lines.append("  expected %d bytes, got %d" % (len(expected), len(got)))
        lo = max(0, first - 8)
        lines.append("  expected at 0x%x: %s" % (off + lo, expected[lo : lo + 32].hex(" ")))
        lines.append("  got      at 0x%x: %s" % (off + lo, got[lo : lo + 32].hex(" ")))
        if first < n:
            last = first
            while last < n and expected[last] != got[last]:
                last += 1
            lines.append("  first run of differing bytes: 0x%x bytes" % (last - first))
        raise Mismatch("\n".join(lines))

    def verify_all(self, why):
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            raise Mismatch(
                "%s: file size is 0x%x (%d), expected 0x%x (%d)"
                % (why, size, size, len(self.model), len(self.model))
            )
        step = 1 << 20
        for off in range(0, size, step):
            n = min(step, size - off)
            self.compare(why, off, bytes(self.model[off : off + n]), self.read_file(off, n))
        self.counts["full-check"] += 1

    # --- operations -------------------------------------------------------------------------

    def op_write(self):
        n = self.rand_len()
        off = self.rand_off(n)
        data = self.rng.randbytes(n)
        old = len(self.model)
        done = 0
        while done < n:
            done += os.pwrite(self.fd, data[done:], off + done)
        self.apply(off, data)
        self.note("write 0x%x len 0x%x%s" % (off, n, " (past EOF 0x%x)" % old if off > old else ""))

    def op_read(self):
        size = len(self.model)
        if not size:
            return self.op_write()
        n = self.rand_len()
        off = self.rng.randint(0, size - 1)
        if self.rng.random() < 0.2:
            off = max(0, size - self.rng.randint(1, n))  # reads crossing EOF
        self.note("read 0x%x len 0x%x" % (off, n))
        self.compare("read", off, bytes(self.model[off : off + n]), self.read_file(off, n))

    def op_truncate(self):
        size = len(self.model)
        r = self.rng.random()
        if r < 0.4 and size:
            new = self.rng.randint(0, size)  # down
        elif r < 0.6:
            new = min(self.a.max_size, size + self.rng.randint(0, 2 * PAGE))  # a little up
        else:
            new = self.rng.randint(0, self.a.max_size)
        if self.rng.random() < 0.3:
            new = new // PAGE * PAGE + self.rng.choice((0, 1, PAGE - 1)) if new else 0
            new = min(new, self.a.max_size)
        os.ftruncate(self.fd, new)
        self.resize_model(new)
        self.note("truncate 0x%x -> 0x%x" % (size, new))

    def _map(self, off, n, access):
        start = off // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        try:
            m = mmap.mmap(self.fd, off + n - start, offset=start, access=access)
        except OSError as e:
            if e.errno in UNSUPPORTED | {errno.ENODEV, errno.EACCES}:
                self.disable("mapread", "mapwrite", why="mmap: %s" % e.strerror)
                return None, 0
            raise
        return m, off - start

    def op_mapread(self):
        size = len(self.model)
        if not size:
            return self.op_write()
        off = self.rng.randint(0, size - 1)
        n = min(self.rand_len(), size - off)
        m, rel = self._map(off, n, mmap.ACCESS_READ)
        if m is None:
            return
        with m:
            got = m[rel : rel + n]
        self.note("mapread 0x%x len 0x%x" % (off, n))
        self.compare("mapread", off, bytes(self.model[off : off + n]), got)

    def op_mapwrite(self):
        n = self.rand_len()
        off = self.rand_off(n)
        size = len(self.model)
        if off + n > size:  # a mapping cannot extend the file: grow it first, as fsx does
            os.ftruncate(self.fd, off + n)
            self.resize_model(off + n)
        m, rel = self._map(off, n, mmap.ACCESS_WRITE)
        if m is None:
            if off + n > size:  # undo the growth so the disabled op leaves no trace
                os.ftruncate(self.fd, size)
                self.resize_model(size)
            return
        data = self.rng.randbytes(n)
        with m:
            m[rel : rel + n] = data
            m.flush()  # msync(MS_SYNC)
        self.apply(off, data)
        self.note("mapwrite 0x%x len 0x%x%s" % (off, n, " (grew from 0x%x)" % size if off + n > size else ""))

    def _falloc(self, op, mode, off, n):
        try:
            self.fallocate(mode, off, n)
        except OSError as e:
            if e.errno in UNSUPPORTED:
                self.disable(op, why="fallocate mode 0x%x: %s" % (mode, e.strerror))
                return False
            raise
        return True

    def op_falloc(self):
        n = self.rand_len()
        off = self.rand_off(n)
        if self._falloc("falloc", 0, off, n):
            if off + n > len(self.model):
                self.resize_model(off + n)
            self.note("fallocate 0x%x len 0x%x" % (off, n))

    def op_falloc_keep(self):
        n = self.rand_len()
        off = self.rand_off(n)
        if self._falloc("falloc_keep", FALLOC_FL_KEEP_SIZE, off, n):
            self.note("fallocate KEEP_SIZE 0x%x len 0x%x" % (off, n))

    def op_punch(self):
        size = len(self.model)
        if not size:
            return self.op_write()
        n = self.rand_len()
        off = self.rng.randint(0, size - 1)
        if self.rng.random() < 0.3:
            off = off // PAGE * PAGE
            n = max(PAGE, n // PAGE * PAGE)
        if self._falloc("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n):
            end = min(off + n, size)
            self.model[off:end] = bytes(end - off)
            self.note("punch hole 0x%x len 0x%x" % (off, n))

    def op_copy_range(self):
        size = len(self.model)
        if size < 2:
            return self.op_write()
        src = self.rng.randint(0, size - 1)
        n = min(self.rand_len(), size - src)
        # source and destination must not overlap within one file
        for _ in range(10):
            dst = self.rand_off(n)
            if dst + n <= src or dst >= src + n:
                break
        else:
            return self.op_read()
        data = bytes(self.model[src : src + n])
        done = 0
        while done < n:
            try:
                c = os.copy_file_range(self.fd, self.fd, n - done, src + done, dst + done)
            except OSError as e:
                if done == 0 and e.errno in UNSUPPORTED | {errno.EXDEV}:
                    self.disable("copy_range", why="copy_file_range: %s" % e.strerror)
                    return
                raise
            if c == 0:
                raise Mismatch(
                    "copy_range: copy_file_range returned 0 at source offset 0x%x, "
                    "inside the file (size 0x%x)" % (src + done, size)
                )
            done += c
        self.apply(dst, data)
        self.note("copy_range 0x%x -> 0x%x len 0x%x" % (src, dst, n))

    def op_fsync(self):
        if self.rng.random() < 0.5:
            os.fsync(self.fd)
            self.note("fsync")
        else:
            os.fdatasync(self.fd)
            self.note("fdatasync")

    def op_reopen(self):
        os.close(self.fd)
        self.fd = -1
        self.open()
        self.note("close and reopen")

    def op_dropcache(self):
        # Clean pages only are dropped: sometimes write back first so that all of them go and
        # the next reads come from the file system, not the page cache.
        synced = self.rng.random() < 0.6
        if synced:
            os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.note("drop page cache (posix_fadvise DONTNEED%s)" % (", after fdatasync" if synced else ""))

    # --- the run ----------------------------------------------------------------------------

    def pick(self):
        ops = [op for op, w in self.weights.items() if w]
        return self.rng.choices(ops, weights=[self.weights[o] for o in ops])[0]

    def run(self):
        a = self.a
        if a.no_mmap:
            self.disable("mapread", "mapwrite", why="--no-mmap")
        if a.no_punch:
            self.disable("punch", why="--no-punch")
        if not hasattr(os, "copy_file_range"):
            self.disable("copy_range", why="this Python has no os.copy_file_range")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.close(fd)
        self.open()
        # Probe hole punching once up front so that "not supported" is said before the run.
        if self.weights["punch"]:
            os.pwrite(self.fd, b"\1" * 2 * PAGE, 0)
            if self._falloc("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE):
                if os.pread(self.fd, PAGE, 0) != bytes(PAGE):
                    raise Mismatch("probe: a punched hole does not read back as zeros")
            os.ftruncate(self.fd, 0)
        corrupt_at = a.ops // 2 if a.self_test_corrupt else -1
        t0 = time.monotonic()
        for self.opno in range(1, a.ops + 1):
            op = self.pick()
            try:
                getattr(self, "op_" + op)()
            except OSError as e:
                raise Mismatch("op #%d %s failed: %s" % (self.opno, op, e)) from None
            if self.weights[op]:  # not if it turned out unsupported just now
                self.counts[op] += 1
            if self.opno == corrupt_at:
                if not self.model:
                    self.apply(0, b"\0")
                    os.pwrite(self.fd, b"\0", 0)
                at = self.rng.randrange(len(self.model))
                self.model[at] ^= 0x5A
                self.note("SELF-TEST: flipped model byte at 0x%x" % at)
                self.verify_all("self-test check after op #%d" % self.opno)
            if a.check_every and self.opno % a.check_every == 0:
                self.verify_all("check after op #%d" % self.opno)
            if a.progress and self.opno % a.progress == 0:
                self.say("%d ops, size 0x%x" % (self.opno, len(self.model)))
        # the end: through the open descriptor, then through a fresh one after close
        self.verify_all("final check")
        os.close(self.fd)
        self.fd = -1
        self.open()
        self.verify_all("final check after reopen")
        os.close(self.fd)
        self.fd = -1
        return time.monotonic() - t0


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: scripts/fsx.py --seed 1 --ops 10000 /mnt/ws/files",
    )
    p.add_argument("dir", metavar="DIR", help="directory to create the test file in")
    p.add_argument("--seed", type=int, help="random seed (default: from the clock; printed)")
    p.add_argument("--ops", type=int, default=10000, help="operations to run (default 10000)")
    p.add_argument(
        "--max-size", type=int, default=4 << 20, help="largest file size in bytes (default 4 MiB)"
    )
    p.add_argument(
        "--max-len", type=int, default=256 << 10, help="largest single op in bytes (default 256 KiB)"
    )
    p.add_argument(
        "--check-every", type=int, default=100,
        help="verify the whole file every K ops, 0 for only at the end (default 100)",
    )
    p.add_argument("--no-mmap", action="store_true", help="no mmap reads or writes")
    p.add_argument("--no-punch", action="store_true", help="no hole punching")
    p.add_argument("--file", help="test file name in DIR (default fsx-SEED.dat)")
    p.add_argument("--keep", action="store_true", help="keep the test file after a clean run")
    p.add_argument("--progress", type=int, default=0, metavar="N", help="say something every N ops")
    p.add_argument("-v", "--verbose", action="store_true", help="print every operation")
    p.add_argument(
        "--self-test-corrupt", action="store_true",
        help="flip one byte of the in-memory model half-way to show that a mismatch is caught "
        "(the run must then fail with exit 1)",
    )
    a = p.parse_args()
    if a.seed is None:
        a.seed = int.from_bytes(os.urandom(4), "little")
    if a.ops < 0 or a.max_size < 1 or a.max_len < 1 or a.check_every < 0:
        p.error("--ops, --check-every must be >= 0 and --max-size, --max-len >= 1")
    if not os.path.isdir(a.dir):
        p.error("%s is not a directory" % a.dir)

    fsx = Fsx(a)
    opts = " ".join(
        x for x in (
            "--ops %d" % a.ops,
            "--max-size %d" % a.max_size if a.max_size != 4 << 20 else "",
            "--max-len %d" % a.max_len if a.max_len != 256 << 10 else "",
            "--check-every %d" % a.check_every if a.check_every != 100 else "",
            "--no-mmap" if a.no_mmap else "",
            "--no-punch" if a.no_punch else "",
            "--self-test-corrupt" if a.self_test_corrupt else "",
        ) if x
    )
    fsx.say("seed %d, %s, file %s" % (a.seed, opts, fsx.path))
    try:
        secs = fsx.run()
    except Mismatch as e:
        print("fsx: FAILED at op #%d (seed %d)" % (fsx.opno, a.seed), file=sys.stderr)
        print(str(e), file=sys.stderr)
        print("last %d operations:" % len(fsx.log), file=sys.stderr)
        for line in fsx.log:
            print("  " + line, file=sys.stderr)
        print("model size 0x%x; file kept: %s" % (len(fsx.model), fsx.path), file=sys.stderr)
        print("repeat: %s --seed %d %s %s" % (sys.argv[0], a.seed, opts, a.dir), file=sys.stderr)
        return 1
    if not a.keep:
        os.unlink(fsx.path)
    counts = ", ".join("%s %d" % kv for kv in sorted(fsx.counts.items()))
    fsx.say("%d ops verified in %.1fs (seed %d): %s" % (a.ops, secs, a.seed, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
