"""`relist demo`: the whole story at a small size, through the installed command; its report in Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import open_page

SMALL = [
    "--n-lists", "1500", "--epochs", "1", "--users", "100", "--serve-requests", "8",
    "--rl-steps", "4", "--rl-envs", "8", "--cascade-items", "600", "--eval-users", "100",
]  # fmt: skip
METHODS = (
    "logged order",
    "initial ranker (LambdaMART)",
    "prm",
    "prm +P1+P2",
    "generator greedy",
    "LAST parallel",
)


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relist.cli", "demo", "--out", str(out), *SMALL, *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    done = _demo(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def _table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first markdown table after ``heading``: first cell -> the other cells."""
    block = text[text.index(heading) :]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_the_demo_tells_the_whole_story_and_prints_the_headline_tables(demo):
    out, done = demo
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in progress] == [f"[{k}/8]" for k in range(1, 9)]
    rerank = _table_rows(done.stdout, "## Re-ranking")
    assert list(rerank) == list(METHODS)
    for offline, online in rerank.values():  # every number carries its interval
        for cell in (offline, online):
            value, low, high = map(float, cell.replace("[", " ").replace("]", " ").replace(",", " ").split())
            assert low <= value <= high
    assert "over the 150 test lists" in done.stdout and "100 simulated users" in done.stdout
    assert "One training seed" in done.stdout
    cascade = _table_rows(done.stdout, "## Cascade")
    assert list(cascade) == ["hand-set weights", "random weights", "TD3", "UNEX-RL"]
    report = Path(done.stdout.split("report: ")[-1].strip())
    assert report == out / "report.html" and report.is_file()

    serving = json.loads((out / "serve" / "serve.json").read_text())
    assert serving["statuses"] == {"200": 8}
    assert serving["weights_unchanged"] and serving["weights_before"] == serving["weights_after"]
    for part in ("data", "ranker/rerank", "reranker/best", "reranker_principled/best", "last/generator", "sim"):
        assert (out / part).is_dir(), part
    assert json.loads((out / "run.json").read_text())["config"]["n_lists"] == 1500


def test_the_report_opens_in_headless_chromium_with_every_plot_and_no_errors(demo):
    out, _ = demo
    shot = out / "report.png"
    page = open_page((out / "report.html").resolve().as_uri(), str(shot))
    plots = sorted(p for p in out.rglob("*.png") if p != shot and "checkpoint" not in p.parts)
    assert len(page["images"]) == len(plots) >= 3
    assert all(image["complete"] and image["width"] > 0 for image in page["images"]), page["images"]
    assert page["messages"] == []
    for text in ("LAST parallel", "UNEX-RL", "Package versions", "relist demo", "content_hash"):
        assert text in page["text"], text
    assert shot.stat().st_size > 10_000


def test_the_demo_replaces_a_directory_it_wrote_and_refuses_any_other(tmp_path):
    from relist.demo import MARKER, DemoConfig, _check_out

    own = tmp_path / "own"
    _check_out(DemoConfig(out=own))
    (own / "old-result.txt").write_text("from the last demo")
    _check_out(DemoConfig(out=own))
    assert sorted(p.name for p in own.iterdir()) == [MARKER]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep")
    done = _demo(foreign, "--n-lists", "300")
    assert done.returncode == 2 and "did not write" in done.stderr
    assert [p.name for p in foreign.iterdir()] == ["important.txt"]
    assert (foreign / "important.txt").read_text() == "keep"
