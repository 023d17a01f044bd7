"""
What train.py's token-id check (loader.check_token_ids -> tokenizer.max_token_id) costs on a 1 GiB bin:
the time to read every id when meta.json records no maximum (bins from another tool or --adopt).

    python benchmarks/bench_token_check.py            # 1 GiB of random ids in a temporary folder
    python benchmarks/bench_token_check.py --gib 4

Prints the time from the page cache (the file was just written or read) and cold (the file's pages
dropped with posix_fadvise first, so it comes from the disk).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kit.tokenizer import max_token_id  # noqa: E402


def write_random_bin(path, gib):
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(int(gib * 2**30) // 2**26):  # 64 MiB at a time
            rng.integers(0, 50257, 2**25, dtype=np.uint16).tofile(f)
        f.flush()
        os.fsync(f.fileno())


def drop_from_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def timed_max(path):
    t0 = time.perf_counter()
    largest = max_token_id(path)
    return largest, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as tmp:
        path = Path(tmp) / "train.bin"
        write_random_bin(path, args.gib)
        size_gib = path.stat().st_size / 2**30
        drop_from_page_cache(path)
        largest, cold = timed_max(path)
        _, warm = timed_max(path)
        print(f"{size_gib:.2f} GiB, largest id {largest}: cold {cold:.2f} s ({size_gib / cold:.2f} GiB/s), "
              f"page cache {warm:.2f} s ({size_gib / warm:.2f} GiB/s); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
