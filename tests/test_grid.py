"""The experiment grid executor: one small `relist experiment principled` grid run in this process, in two
local worker processes and on a local Ray cluster gives the same results; --resume works with each."""

from __future__ import annotations

import csv
import sys

import pytest

from relist.cli import main
from relist.data.prepare import PrepareConfig, prepare
from relist.grid import run_tasks


def _square_with_torch(x: int) -> tuple[int, int]:
    import torch

    return x * x, torch.get_num_threads()


def test_run_tasks_keeps_the_order_and_the_threads_everywhere():
    expected = [(x * x, 1) for x in range(5)]
    assert run_tasks(_square_with_torch, range(5), jobs=1) == expected
    assert run_tasks(_square_with_torch, range(5), jobs=2) == expected
    with pytest.raises(ValueError, match="at least 1"):
        run_tasks(_square_with_torch, range(2), jobs=0)


def _sleep_and_say(path: str) -> None:
    import os
    import time

    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_local_workers_end_when_the_grid_is_killed(tmp_path):
    """A grid killed outright (SIGKILL: no clean-up runs) leaves no worker behind to go on writing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "from relist.grid import run_tasks\n"
        "from tests.test_grid import _sleep_and_say\n"
        f"run_tasks(_sleep_and_say, [{str(tmp_path / 'a')!r}, {str(tmp_path / 'b')!r}], jobs=2)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    grid = subprocess.Popen([sys.executable, "-c", script], cwd=root)
    files = [tmp_path / "a", tmp_path / "b"]
    try:
        deadline = time.monotonic() + 60
        while not all(f.is_file() and f.read_text() for f in files):
            assert time.monotonic() < deadline and grid.poll() is None, "the workers did not start"
            time.sleep(0.1)
        workers = [int(f.read_text()) for f in files]
    finally:
        grid.send_signal(signal.SIGKILL)  # also when the workers did not start: nothing is left running
        grid.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a worker outlived the grid"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie waiting for its (new) parent to collect it."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _grid(data, out, *extra) -> list[dict]:
    args = ["experiment", "principled", "--data", str(data), "--models", "midnn", "--seeds", "1"]
    args += ["--max-steps", "3", "--batch-size", "32", "--out", str(out), "--no-progress", *extra]
    assert main(args) == 0
    return list(csv.DictReader(open(out / "results.csv")))


def test_a_grid_gives_the_same_results_in_process_in_workers_and_on_ray(tmp_path):
    """The four runs of a grid in this process and in two worker processes; then two of the workers' runs lost
    and redone on a local Ray cluster by --resume: every result is the same (and the kept runs untouched)."""
    pytest.importorskip("ray", reason="the ray extra (installed by the test set-up)")
    prepare(PrepareConfig(source="synthetic", out=tmp_path / "data", n_lists=400, n_users=50, n_items=150, seed=3))
    metric = lambda rows: [(r["model"], r["variant"], r["seed"], r["test_ndcg@10"], r["best_step"]) for r in rows]  # noqa: E731
    one = metric(_grid(tmp_path / "data", tmp_path / "one", "--jobs", "1"))
    assert len(one) == 4
    assert metric(_grid(tmp_path / "data", tmp_path / "two", "--jobs", "2")) == one
    runs = tmp_path / "two" / "runs" / "midnn"
    lost = [runs / variant / "seed0" / "metrics.json" for variant in ("+P1", "+P1+P2")]
    kept = runs / "base" / "seed0" / "metrics.json"
    before = kept.stat().st_mtime_ns
    for path in lost:
        path.unlink()
    again = metric(_grid(tmp_path / "data", tmp_path / "two", "--resume", "--ray-address", "local", "--jobs", "2"))
    assert again == one and all(p.is_file() for p in lost) and kept.stat().st_mtime_ns == before
