"""`relist report`: one self-contained page of what the commands wrote; `run.json` beside every output."""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from relist.cli import main, record
from relist.config import option
from relist.data.prepare import PrepareConfig, prepare
from relist.report import collect, write_report


def _png(path: Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)
    return path.read_bytes()


def _embedded(html: str, kind: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'"data:{re.escape(kind)};base64,([A-Za-z0-9+/=]+)"', html)]


def test_the_page_embeds_every_plot_table_manifest_and_file_and_shows_file_text_as_text(tmp_path):
    data = prepare(PrepareConfig(source="synthetic", out=tmp_path / "data", n_lists=200, n_users=30, n_items=80))
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "summary.md").write_text(
        "# Results\n\n| method | ndcg@10 |\n|---|---|\n| <unknown> | 0.5 [0.4, 0.6] |\n\n<script>alert(1)</script>\n"
    )
    plots = [_png(run / "a.png"), _png(run / "sub" / "b.png")]
    (run / "results.csv").write_text("method,value\nx,1\n")
    (run / "config.json").write_text(json.dumps({"data": str(data), "seed": 7}))
    page = write_report([run]).read_text()

    assert sorted(_embedded(page, "image/png")) == sorted(plots)
    assert _embedded(page, "text/csv") == [b"method,value\nx,1\n"]
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;unknown&gt;" in page and "<table>" in page and "0.5 [0.4, 0.6]" in page
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["content_hash"] in page  # the manifest of the data the configuration names
    assert not re.search(r'(src|href)="(?!data:|#)', page), "the page refers to something outside itself"
    assert "No run.json here" in page  # said, not hidden


def test_a_command_writes_run_json_with_its_command_line_seeds_and_versions(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["data", "prepare", "synthetic", "--out", str(out), "--n-lists", "200", "--seed", "4"]
    assert main(argv) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == ["relist", *argv]
    assert info["seeds"] == {"seed": 4} and info["config"]["n_lists"] == 200
    assert info["versions"]["torch"] == torch.__version__
    section = collect(out)
    assert section.run == info and section.manifests  # the report reads both back
    page = write_report([out]).read_text()
    assert " ".join(["relist", *argv]) in page


@dataclass
class _ExperimentLike:
    out: Path = option(help="output directory")
    seeds: int = option(3, help="seeds")


def test_an_experiment_command_writes_its_report_and_report_takes_several_directories(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "summary.md").write_text("# A\n")
    (b / "summary.md").write_text("# B\n")
    record(("experiment", "last"), _ExperimentLike(out=a), ["experiment", "last", "--out", str(a)], time.time())
    assert (a / "report.html").is_file() and (a / "run.json").is_file()
    record(("abtest",), _ExperimentLike(out=b), ["abtest"], time.time())
    assert (b / "run.json").is_file() and not (b / "report.html").exists()  # only experiments write a page

    assert main(["report", str(a), str(b), "--out", str(tmp_path / "both.html")]) == 0
    page = (tmp_path / "both.html").read_text()
    assert page.index(">A</h3>") < page.index(">B</h3>")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
