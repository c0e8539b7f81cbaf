#!/usr/bin/env python3
"""Write + fdatasync rate on a growing file against a pre-zeroed one, and
against a file zero-filled ahead of the writes in 1 MiB steps.

Usage: scripts/fsync-growing-vs-prezeroed.py [DIR] [WRITERS]

Runs WRITERS processes at once (default 1; 3 = one per node of the
3-node benchmarks), each in a file of its own under DIR (default
target/), for 4 s per mode, alternating modes for three rounds. Each
write is 2,000 bytes, about one WAL batch. A growing file makes every
fdatasync also commit the inode's size to ext4's journal; a pre-zeroed
one (64 MiB written and synced first) does not. "Chunked" is what the
WAL does: when a write would pass the zero-filled end, the writer first
writes 1 MiB more of zeros, and the one fdatasync covers both, so only one
sync in about 500 commits a size. BENCHMARKS.md, "WAL
segments: growing against pre-zeroed", records the results.
"""
import multiprocessing
import os
import sys
import time

WRITE_BYTES = 2000
SECONDS = 4
PREZERO_BYTES = 64 << 20
CHUNK_BYTES = 1 << 20


def writer(directory, index, mode, results):
    path = os.path.join(directory, f"fsync-probe-{index}.bin")
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        if mode == "pre-zeroed":
            os.write(fd, b"\0" * PREZERO_BYTES)
            os.fsync(fd)
        payload = b"x" * WRITE_BYTES
        zeros = b"\0" * CHUNK_BYTES
        position = 0
        zeroed_end = 0
        count = 0
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            if mode == "chunked" and position + WRITE_BYTES > zeroed_end:
                os.pwrite(fd, zeros, zeroed_end)
                zeroed_end += CHUNK_BYTES
            os.pwrite(fd, payload, position)
            position += WRITE_BYTES
            os.fdatasync(fd)
            count += 1
        results.put(count / (time.monotonic() - started))
    finally:
        os.close(fd)
        os.remove(path)


def run(directory, writers, mode):
    results = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=writer, args=(directory, i, mode, results))
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
        for mode in ("growing", "pre-zeroed", "chunked"):
            rates = run(directory, writers, mode)
            shown = ", ".join(f"{rate:.0f}" for rate in rates)
            print(f"round {round_number}, {writers} writer(s), {mode}: {shown} per second each")


if __name__ == "__main__":
    main()
