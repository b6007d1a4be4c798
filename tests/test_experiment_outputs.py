"""The experiments' plots and tables do not mislead: whole labels, marked oracle rows, axes from zero or
visibly broken, readable obedience panels, no empty plot, no "± nan" for one seed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from relist.experiments import last, principled, unexrl  # noqa: E402
from relist.experiments.plots import BROKEN_AXIS, metric_axis, wrap_label  # noqa: E402
from relist.tables import ONE_SEED, mean_cell, metrics_table, seeds_interval  # noqa: E402

ORACLE = "LAST parallel (activations) [oracle selection: test labels]"


def _broken(ax) -> bool:
    return any(line.get_gid() == BROKEN_AXIS for line in ax.lines)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_metric_axis_starts_at_zero_or_marks_the_break():
    fig, ax = plt.subplots()
    assert metric_axis(ax, [0.1, 0.5], label="ndcg@10") is None
    assert ax.get_ylim()[0] == 0 and not _broken(ax) and "starts at" not in ax.get_ylabel()
    fig, ax = plt.subplots()
    start = metric_axis(ax, [0.412, 0.418, 0.421], [0.405, 0.41, 0.415], label="ndcg@10")
    assert start is not None and 0 < start < 0.405 and ax.get_ylim()[0] == pytest.approx(start)
    assert _broken(ax) and f"axis starts at {start:g}" in ax.get_ylabel()


def test_wrapped_labels_keep_every_character():
    assert wrap_label(ORACLE).replace("\n", " ") == ORACLE
    assert max(len(line) for line in wrap_label(ORACLE).split("\n")) <= 24


def _offline_rows(values: dict[str, float], seeds=(0, 1)) -> list[dict]:
    return [
        {"seed": s, "study": "offline", "method": m, "ndcg@10": v + 0.001 * s, "evaluator": 0.12 + 0.0001 * s}
        for s in seeds
        for m, v in values.items()
    ]


def test_offline_figure_keeps_whole_labels_and_marks_the_oracle_and_the_broken_axis():
    values = {"initial order": 0.405, "prm +P1+P2": 0.407, "generator greedy": 0.406, ORACLE: 0.468}
    fig = last.offline_figure(_offline_rows(values))
    ndcg, evaluator = fig.axes[:2]
    shown = [t.get_text().replace("\n", " ") for t in ndcg.get_xticklabels()]
    assert shown == list(values)  # nothing cut
    hatched = [bar.get_hatch() for bar in ndcg.patches]
    assert hatched == [None, None, None, "//"]  # the oracle bar, and only it, is marked
    assert _broken(evaluator) and "axis starts at" in evaluator.get_ylabel()  # 0.12 and 0.1201: cut, said so
    assert "oracle selection" in " ".join(t.get_text() for t in fig.texts)


def test_last_writes_only_the_plots_of_the_studies_that_ran(tmp_path):
    rows = _offline_rows({"initial order": 0.4, "generator greedy": 0.41})
    (tmp_path / "quality.png").write_bytes(b"an earlier run's plot")
    assert last._plots(tmp_path, rows) == ["offline.png"]
    assert (tmp_path / "offline.png").is_file()
    assert not (tmp_path / "quality.png").exists() and not (tmp_path / "offsets.png").exists()
    rows += [{"seed": 0, "study": "offsets", "method": "all steps=0/6", "lift_ndcg@10": 0.0, "lift_evaluator": 1e-4}]
    assert last._plots(tmp_path, rows) == ["offline.png", "offsets.png"]


def _principled_rows(level: float, spread: float) -> list[dict]:
    rows = []
    for m, model in enumerate(("prm", "dlcm")):
        for v, variant in enumerate(principled.VARIANTS):
            for seed in (0, 1):
                value = level + spread * (m + v) / 8 + 0.001 * seed
                rows.append({"model": model, "variant": variant, "seed": seed, "test_ndcg@10": value,
                             "test_map@10": value - 0.05})  # fmt: skip
    return rows


def test_principled_metric_bars_start_at_zero_or_mark_the_break():
    close = principled.metrics_figure(
        _principled_rows(0.41, 0.004), {"ndcg@10": 0.405, "map@10": 0.355}, ["prm", "dlcm"]
    )
    assert all(_broken(ax) for ax in close.axes[:2])
    wide = principled.metrics_figure(_principled_rows(0.2, 0.4), {"ndcg@10": 0.1, "map@10": 0.06}, ["prm", "dlcm"])
    assert all(ax.get_ylim()[0] == 0 and not _broken(ax) for ax in wide.axes[:2])


def test_obedience_panels_one_per_model_each_variant_one_colour(tmp_path):
    models = ["prm", "dlcm", "setrank"]
    for model in models:
        for variant in principled.VARIANTS:
            run = tmp_path / "runs" / model / principled._variant_dir(variant) / "seed3"
            run.mkdir(parents=True)
            history = [{"step": s, "valid": {"obedience_p1@full": 0.1 + 0.01 * s}} for s in (8, 16, 24)]
            (run / "history.jsonl").write_text("\n".join(json.dumps(h) for h in history) + "\n")
    rows = [{"model": m, "variant": "base", "seed": 3} for m in models]
    fig = principled.obedience_figure(tmp_path, rows, models)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert [ax.get_title() for ax in panels] == models
    colours = []
    for ax in panels:
        assert [line.get_label() for line in ax.lines] == list(principled.VARIANTS)
        colours.append([line.get_color() for line in ax.lines])
        assert len(set(colours[-1])) == len(principled.VARIANTS)  # distinct within a panel
    assert all(c == colours[0] for c in colours)  # and the same variant has the same colour everywhere
    assert principled.obedience_figure(tmp_path / "nothing", rows, models) is None


def test_one_seed_cells_and_headings_never_show_nan():
    assert mean_cell([0.41]) == "0.4100" and "nan" not in mean_cell([0.41], signed=True)
    assert mean_cell([0.40, 0.42]).startswith("0.4100 ± ")
    assert seeds_interval(1) == ONE_SEED and "5 seeds" in seeds_interval(5)
    assert "nan" not in metrics_table({"a": {"auc": float("nan"), "ndcg@10": 0.5}})


def _unexrl_record(stages: int, method: str, seed: int, dwell: float) -> dict:
    curve = [
        {"step": 0, "requests": 0, "session_dwell": dwell - 5},
        {"step": 1, "requests": 10, "session_dwell": dwell},
    ]
    return {"stages": stages, "method": method, "seed": seed, "session_dwell": dwell, "curve": curve}


def test_unexrl_writes_no_empty_stage_plot(tmp_path):
    one_count = [_unexrl_record(3, m, s, 100.0 + s) for m in ("default", "unexrl") for s in (0, 1)]
    assert unexrl._plots(tmp_path, one_count, ["unexrl"], 3) == ["curves.png"]
    assert (tmp_path / "curves.png").is_file() and not (tmp_path / "stages.png").exists()
    more = one_count + [_unexrl_record(4, m, s, 90.0 + s) for m in ("default", "unexrl") for s in (0, 1)]
    assert unexrl._plots(tmp_path, more, ["unexrl"], 3) == ["curves.png", "stages.png"]
    assert (tmp_path / "stages.png").is_file()
    assert unexrl._plots(tmp_path, one_count, ["unexrl"], 3) == ["curves.png"]  # --stages= on the same OUT
    assert not (tmp_path / "stages.png").exists()  # the earlier stage plot is not left as if it were this run's


def _unexrl_run(method: str, seed: int, shift: float, rng) -> dict:
    sessions = np.full(50, 2.0)
    dwell = sessions * (1000 + 10 * seed + shift) + rng.normal(0, 100, 50)
    users = {"dwell": dwell.tolist(), "sessions": sessions.tolist()}
    value = float(dwell.sum() / sessions.sum())
    return {"stages": 3, "method": method, "seed": seed, "session_dwell": value, "session_length": 1.5,
            "clicks_per_request": 1.0, "requests_used": 100, "users": users, "curve": []}  # fmt: skip


def test_unexrl_table_of_one_seed_says_its_interval_is_over_users_only():
    rng = np.random.default_rng(1)
    cfg = unexrl.UnexrlExperimentConfig(env=Path("env.yaml"), out=Path("out"), reference_budget=0, resamples=200)
    env_cfg = SimpleNamespace(seed=None, split_seed=None, source="synthetic", sizes=(100, 30, 10))
    for n_seeds in (1, 3):
        records = [_unexrl_run(m, s, d, rng) for s in range(n_seeds) for m, d in (("default", -20), ("unexrl", 0))]
        text = unexrl._summary(records, [], ["unexrl"], [], cfg, 3, env_cfg)
        assert ("## The table (1 seed)" in text) == (n_seeds == 1) and "nan" not in text
        assert ("1 seed, no interval over seeds" in text) == (n_seeds == 1)
        assert ("interval over seeds and evaluation users" in text) == (n_seeds > 1)
