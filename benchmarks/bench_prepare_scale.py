"""Scale of `relist data prepare taobao-ad` on a raw_sample.csv of Taobao Ad's full shape.

Generates raw files of the real dataset's shape (26.6M impressions, 1.14M users, 846,811 ads,
8 days; impressions come in bursts, ~5% clicked), then prepares them in a child process and prints
rows per second, wall time and the child's peak RSS. Reference measured in the same run: the time
polars needs only to read raw_sample.csv, so the ratio says what the list construction costs over
bare I/O.

    python benchmarks/bench_prepare_scale.py [--rows 26600000] [--workdir /tmp/relist-scale]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl


def generate(folder: Path, rows: int, users: int, ads: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    burst = 8
    n_bursts = rows // burst + 1
    burst_user = rng.integers(1, users + 1, n_bursts)
    burst_start = 1494000000 + rng.integers(0, 8 * 86400, n_bursts)
    user = np.repeat(burst_user, burst)[:rows]
    time_stamp = (np.repeat(burst_start, burst) + rng.integers(0, 400, n_bursts * burst))[:rows]
    clk = (rng.random(rows) < 0.05).astype(np.int8)
    pl.DataFrame(
        {
            "user": user,
            "time_stamp": time_stamp,
            "adgroup_id": rng.integers(1, ads + 1, rows),
            "pid": np.where(rng.random(rows) < 0.5, "430548_1007", "430539_1007"),
            "nonclk": 1 - clk,
            "clk": clk,
        }
    ).write_csv(folder / "raw_sample.csv")
    pl.DataFrame(
        {
            "adgroup_id": np.arange(1, ads + 1),
            "cate_id": rng.integers(1, 6770, ads),
            "campaign_id": rng.integers(1, 420000, ads),
            "customer": rng.integers(1, 255000, ads),
            "brand": np.where(rng.random(ads) < 0.3, "NULL", rng.integers(1, 99000, ads).astype(str)),
            "price": np.round(rng.lognormal(5, 1.5, ads), 2),
        }
    ).write_csv(folder / "ad_feature.csv")
    with_profile = rng.random(users) < 0.93
    ids = np.arange(1, users + 1)[with_profile]
    n = len(ids)
    profile = pl.DataFrame(
        {
            "userid": ids,
            "cms_segid": rng.integers(0, 97, n),
            "cms_group_id": rng.integers(0, 13, n),
            "final_gender_code": rng.integers(1, 3, n),
            "age_level": rng.integers(0, 7, n),
            "pvalue_level": pl.Series(rng.integers(1, 4, n)).scatter(np.flatnonzero(rng.random(n) < 0.5), None),
            "shopping_level": rng.integers(1, 4, n),
            "occupation": rng.integers(0, 2, n),
            "new_user_class_level ": rng.integers(1, 5, n),
        }
    )
    profile.write_csv(folder / "user_profile.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=26_600_000)
    parser.add_argument("--users", type=int, default=1_140_000)
    parser.add_argument("--ads", type=int, default=846_811)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/relist-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    raw = args.workdir / "raw"
    if not all((raw / name).is_file() for name in ("raw_sample.csv", "ad_feature.csv", "user_profile.csv")):
        started = time.perf_counter()
        generate(raw, args.rows, args.users, args.ads)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - started:.1f} s", flush=True)

    started = time.perf_counter()
    pl.read_csv(raw / "raw_sample.csv")
    read_seconds = time.perf_counter() - started

    out = args.workdir / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "relist.cli", "data", "prepare", "taobao-ad", "--src", str(raw), "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GiB on Linux
    print(
        f"prepare taobao-ad: {args.rows:,} rows in {seconds:.1f} s = {args.rows / seconds:,.0f} rows/s; "
        f"peak RSS {peak_gib:.2f} GiB"
    )
    print(
        f"reference (polars read of raw_sample.csv alone): {read_seconds:.1f} s; ratio prepare / read = "
        f"{seconds / read_seconds:.2f}"
    )
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
