#!/usr/bin/env python3
"""Write + fdatasync rate on a growing file against a pre-zeroed one.

Usage: scripts/fsync-growing-vs-prezeroed.py [DIR] [WRITERS]

Runs WRITERS processes at once (default 1; 3 = one per node of the
3-node benchmarks), each in a file of its own under DIR (default
target/), for 4 s per mode, alternating modes for three rounds. Each
write is 2,000 bytes, about one WAL batch. A growing file makes every
fdatasync also commit the inode's size to ext4's journal; a pre-zeroed
one (64 MiB written and synced first) does not. BENCHMARKS.md, "WAL
segments: growing against pre-zeroed", records the results.
"""
import multiprocessing
import os
import sys
import time

WRITE_BYTES = 2000
SECONDS = 4
PREZERO_BYTES = 64 << 20


def writer(directory, index, prezeroed, results):
    path = os.path.join(directory, f"fsync-probe-{index}.bin")
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        if prezeroed:
            os.write(fd, b"\0" * PREZERO_BYTES)
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        payload = b"x" * WRITE_BYTES
        count = 0
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            os.write(fd, payload)
            os.fdatasync(fd)
            count += 1
        results.put(count / (time.monotonic() - started))
    finally:
        os.close(fd)
        os.remove(path)


def run(directory, writers, prezeroed):
    results = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=writer, args=(directory, i, prezeroed, results))
        for i in range(writers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return [results.get() for _ in processes]


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "target"
    writers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    os.makedirs(directory, exist_ok=True)
    for round_number in range(1, 4):
        for prezeroed in (False, True):
            rates = run(directory, writers, prezeroed)
            mode = "pre-zeroed" if prezeroed else "growing"
            shown = ", ".join(f"{rate:.0f}" for rate in rates)
            print(f"round {round_number}, {writers} writer(s), {mode}: {shown} per second each")


if __name__ == "__main__":
    main()
