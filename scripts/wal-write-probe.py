#!/usr/bin/env python3
"""Synced writes on this disk, buffered against O_DIRECT: the probe behind
decision 0009 and BENCHMARKS.md session 42.

    python3 scripts/wal-write-probe.py DIR 4k|append|threads|zerofill

DIR must be on the disk under test (not a tmpfs). Modes:
- 4k: 3,000 writes of 4 KiB at growing offsets of a pre-zeroed file, each
  followed by fdatasync, four ways (buffered, O_DSYNC, O_DIRECT,
  O_DIRECT|O_DSYNC), two rounds;
- append: 4,000 appends of SZ bytes (environment, default 200) with an
  fdatasync each, buffered against O_DIRECT rewriting the partial block,
  three rounds;
- threads: three threads on three files, 600 B appends for 3 s, two rounds;
- zerofill: a 256 KiB direct write extending the file plus fdatasync,
  against 4 KiB overwrites plus fdatasync inside the filled part.
Prints wall time and the thread's CPU time per operation.
"""
import mmap
import os
import sys
import threading
import time


def prep(path, size=64 << 20):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.pwrite(fd, b"\0" * size, 0)
    os.fsync(fd)
    os.close(fd)


def aligned(size):
    buf = mmap.mmap(-1, size)
    buf.write(b"x" * size)
    return buf


def four_k(dir):
    path, n = os.path.join(dir, "probe"), 3000
    ways = [("pwrite+fdatasync", 0, True), ("O_DSYNC buffered", os.O_DSYNC, False),
            ("O_DIRECT|O_DSYNC", os.O_DIRECT | os.O_DSYNC, False),
            ("O_DIRECT+fdatasync", os.O_DIRECT, True)]
    for _ in range(2):
        for name, flags, sync in ways:
            prep(path)
            fd, buf, off = os.open(path, os.O_RDWR | flags), aligned(4096), 0
            t0, c0 = time.time(), time.thread_time()
            for _ in range(n):
                os.pwrite(fd, buf, off)
                if sync:
                    os.fdatasync(fd)
                off += 4096
            wall, cpu = time.time() - t0, time.thread_time() - c0
            os.close(fd)
            print(f"{name}: {1e6 * wall / n:.0f} us wall, {1e6 * cpu / n:.0f} us cpu per op")


def append_one(fd, direct, buf, off, size):
    if direct:
        start = off - off % 4096
        end = off + size
        length = (end + 4095) // 4096 * 4096 - start
        os.pwrite(fd, memoryview(buf)[:length], start)
    else:
        os.pwrite(fd, b"x" * size, off)
    os.fdatasync(fd)


def append(dir):
    path, n, size = os.path.join(dir, "probe"), 4000, int(os.environ.get("SZ", "200"))
    for _ in range(3):
        for name, direct in (("buffered", False), ("direct", True)):
            prep(path)
            fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
            buf, off = aligned(8192), 0
            t0, c0 = time.time(), time.thread_time()
            for _ in range(n):
                append_one(fd, direct, buf, off, size)
                off += size
            wall, cpu = time.time() - t0, time.thread_time() - c0
            os.close(fd)
            print(f"{name} SZ={size}: {1e6 * wall / n:.0f} us wall, {1e6 * cpu / n:.0f} us cpu per op")


def threads(dir):
    seconds, size = 3, 600

    def worker(i, direct, results):
        fd = os.open(os.path.join(dir, f"probe{i}"), os.O_RDWR | (os.O_DIRECT if direct else 0))
        buf, off, count = aligned(8192), 0, 0
        c0, stop = time.thread_time(), time.time() + seconds
        while time.time() < stop:
            append_one(fd, direct, buf, off, size)
            off += size
            count += 1
        results[i] = (count, time.thread_time() - c0)
        os.close(fd)

    for _ in range(2):
        for name, direct in (("buffered", False), ("direct", True)):
            for i in range(3):
                prep(os.path.join(dir, f"probe{i}"), 32 << 20)
            results = {}
            workers = [threading.Thread(target=worker, args=(i, direct, results)) for i in range(3)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            count = sum(r[0] for r in results.values())
            cpu = sum(r[1] for r in results.values())
            print(f"{name} x3: {count / seconds:.0f} syncs/s, {1e6 * cpu / count:.0f} us cpu per op")


def zerofill(dir):
    path = os.path.join(dir, "probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
    buf, step = mmap.mmap(-1, 262144 + 4096), 262144
    fills, overwrites, off = [], [], 0
    for _ in range(40):
        t = time.time()
        os.pwrite(fd, memoryview(buf)[:step + 4096], off)
        os.fdatasync(fd)
        fills.append(time.time() - t)
        for j in range(20):
            t = time.time()
            os.pwrite(fd, memoryview(buf)[:4096], off + 4096 * j)
            os.fdatasync(fd)
            overwrites.append(time.time() - t)
        off += step
    os.close(fd)
    fills.sort()
    overwrites.sort()
    print(f"zero-fill 256 KiB + fdatasync: median {1e6 * fills[len(fills) // 2]:.0f} us,"
          f" p90 {1e6 * fills[int(len(fills) * 0.9)]:.0f} us")
    print(f"overwrite 4 KiB + fdatasync: median {1e6 * overwrites[len(overwrites) // 2]:.0f} us")


if __name__ == "__main__":
    modes = {"4k": four_k, "append": append, "threads": threads, "zerofill": zerofill}
    if len(sys.argv) != 3 or sys.argv[2] not in modes:
        sys.exit(__doc__)
    modes[sys.argv[2]](sys.argv[1])
