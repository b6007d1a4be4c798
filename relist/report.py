"""`relist report DIR...`: one self-contained HTML page of what relist commands wrote.

The page covers every directory given (an experiment's, the demo's, a training run's, an A/B test's):
its tables (each ``*.md`` the command wrote, with their intervals as written), every plot (PNG files,
embedded as data URIs), the data manifests (found in the directory or named by its configuration), the
configuration, the command line, the package versions and the seeds (``run.json``, which the command
line writes beside a command's output when it succeeds: see ``write_run_info``), and the result files
(CSV and JSON, as downloads embedded in the page). Nothing is fetched from the network when it is opened:
no scripts, fonts or styles from elsewhere.

Markdown is rendered by markdown-it-py with raw HTML turned off, so text from a file (a category named
``<unknown>``, an id) is shown as text, never interpreted.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from relist.config import option
from relist.io import atomic_write_text

# the packages whose versions decide a result (those installed are recorded)
PACKAGES = (
    "relist",
    "torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "lightgbm",
    "polars",
    "pyarrow",
    "safetensors",
    "faiss-cpu",
    "gymnasium",
    "pettingzoo",
    "fastapi",
    "uvicorn",
    "matplotlib",
    "ray",
)
RUN_INFO = "run.json"
CONFIG_FILES = ("config.json", "experiment.json", "env.json", "settings.json")
SKIPPED_DIRS = {"arrays", "splits", "vocab", "checkpoint", "__pycache__"}
MAX_DEPTH = 4  # directories below a given one that are searched
MAX_DOWNLOAD_BYTES = 4 << 20  # result files larger than this are listed, not embedded
SEED_KEYS = ("seed", "seeds", "stage_seeds", "split_seed")


@dataclass
class ReportConfig:
    dirs: tuple[Path, ...] = option(help="output directories of `relist` commands (experiments, demo, runs)")
    out: Path | None = option(
        None, help="HTML file to write (default: DIR/report.html for one directory, ./report.html for several)"
    )
    title: str = option("relist report", help="title of the page")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages in ``PACKAGES`` (those not installed are left out)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def run_info(config: Any, argv: list[str] | None = None, started: float | None = None) -> dict:
    """What a reader needs to redo a run: the command line (``argv`` after ``relist``, or else the process's
    own), the configuration, the seeds, the package versions, Python, the platform and the torch device."""
    import torch

    plain = _plain(config)
    info = {
        "command": list(sys.argv) if argv is None else ["relist", *argv],
        "cwd": os.getcwd(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": plain,
        "seeds": {k: plain[k] for k in SEED_KEYS if isinstance(plain, dict) and k in plain},
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if started is not None:
        info["wall_seconds"] = round(time.time() - started, 1)
    return info


def write_run_info(out: Path, config: Any, argv: list[str] | None = None, started: float | None = None) -> None:
    """Write ``out/run.json`` (see ``run_info``) into an existing output directory."""
    atomic_write_text(Path(out) / RUN_INFO, json.dumps(run_info(config, argv, started), indent=2, default=str))


# --- finding what a directory holds -------------------------------------------------------------------


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root``, sorted, at most ``MAX_DEPTH`` directories down, skipping data arrays and
    checkpoints; a directory's own files come before its sub-directories'."""

    def visit(directory: Path, depth: int) -> Iterator[Path]:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
        yield from (p for p in entries if p.is_file())
        if depth < MAX_DEPTH:
            for p in entries:
                if p.is_dir() and not p.is_symlink() and p.name not in SKIPPED_DIRS:
                    yield from visit(p, depth + 1)

    yield from visit(root, 0)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _named_data_dirs(config: Any) -> list[Path]:
    """Prepared-dataset directories a configuration names (its ``data`` field, or ``env``'s ``sim``)."""
    found = []
    if isinstance(config, dict):
        for key in ("data", "sim"):
            value = config.get(key)
            if isinstance(value, str) and value:
                found.append(Path(value))
    return found


@dataclass
class Section:
    """What one directory contributes to the page."""

    root: Path
    run: dict | None
    tables: list[tuple[Path, str]]  # (file, markdown)
    plots: list[tuple[Path, bytes]]
    configs: list[tuple[Path, Any]]
    manifests: list[tuple[Path, dict]]
    downloads: list[tuple[Path, bytes | None]]  # None: too large to embed
    metrics: list[tuple[Path, dict]]


def collect(root: Path) -> Section:
    """Everything the page shows of ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    run = None
    tables, plots, configs, manifests, downloads, metrics = [], [], [], [], [], []
    manifest_paths: set[Path] = set()
    for path in _walk(root):
        rel = path.relative_to(root)
        if path.name == RUN_INFO and run is None and len(rel.parts) == 1:
            run = _read_json(path)
        elif path.suffix == ".md":
            tables.append((rel, path.read_text(encoding="utf-8", errors="replace")))
        elif path.suffix == ".png":
            plots.append((rel, path.read_bytes()))
        elif path.name in CONFIG_FILES:
            value = _read_json(path)
            if value is not None:
                configs.append((rel, value))
        elif path.name == "manifest.json":
            value = _read_json(path)
            if isinstance(value, dict):
                manifests.append((rel, value))
                manifest_paths.add(path.resolve())
        elif path.name == "metrics.json":
            value = _read_json(path)
            if isinstance(value, dict):
                metrics.append((rel, value))
        if path.suffix in (".csv", ".json") and path.name != RUN_INFO:
            size = path.stat().st_size
            downloads.append((rel, path.read_bytes() if size <= MAX_DOWNLOAD_BYTES else None))
    named = [d for _, c in configs for d in _named_data_dirs(c)]
    if run:
        named += _named_data_dirs(run.get("config"))
    for directory in named:
        manifest = (directory if directory.is_absolute() else Path(run["cwd"] if run else ".") / directory) / (
            "manifest.json"
        )
        if manifest.is_file() and manifest.resolve() not in manifest_paths:
            value = _read_json(manifest)
            if isinstance(value, dict):
                manifests.append((manifest, value))
                manifest_paths.add(manifest.resolve())
    return Section(root, run, tables, plots, configs, manifests, downloads, metrics)


# --- rendering ------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #aaa; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.86em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.82em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .file { font-family: monospace; font-size: 0.85em; color: #555; }
nav li { margin: 0.15em 0; } .missing { color: #a00; }
"""


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for token in tokens:  # a file's headings sit below the page's and the directory's
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + 2)}"
    return md.renderer.render(tokens, md.options, {})


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_block(value: Any) -> str:
    return f"<pre>{_e(json.dumps(value, indent=2, default=str))}</pre>"


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def _scalars(value: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """The numbers and strings of a nested mapping, keys joined with '.' (lists left out)."""
    out = []
    for k, v in value.items():
        if isinstance(v, dict):
            out += _scalars(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((f"{prefix}{k}", v))
    return out


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metric_tables(value: dict) -> str:
    """A metrics.json as tables: each mapping of numbers (``{"test": {"ndcg@10": ...}}``) one row of a table
    whose columns are the metric names; the remaining scalars as name / value rows."""
    groups = {k: v for k, v in value.items() if isinstance(v, dict) and v and all(_is_number(x) for x in v.values())}
    html_parts = []
    if groups:
        columns = list(dict.fromkeys(name for g in groups.values() for name in g))
        head = "".join(f"<th>{_e(c)}</th>" for c in columns)
        rows = "".join(
            f"<tr><th>{_e(k)}</th>" + "".join(f"<td>{_e(_number(g.get(c, '')))}</td>" for c in columns) + "</tr>"
            for k, g in groups.items()
        )
        html_parts.append(f"<table><tr><th></th>{head}</tr>{rows}</table>")
    rest = {k: v for k, v in value.items() if k not in groups}
    pairs = [(k, _number(v)) for k, v in _scalars(rest)]
    if pairs:
        html_parts.append(_kv_table(pairs))
    return "".join(html_parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _manifest_summary(manifest: dict) -> list[tuple[str, Any]]:
    """The lines a reader looks for first: source, seed, counts per split, content hash."""
    pairs = [(k, manifest[k]) for k in ("source", "seed", "content_hash") if k in manifest]
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    pairs += [(k, v) for k, v in counts.items() if not isinstance(v, (dict, list))]
    splits = counts.get("splits")
    if isinstance(splits, dict):
        pairs += [(f"split {k}", v) for k, v in splits.items()]
    return pairs or _scalars(manifest)[:20]


def _anchor(index: int, name: str) -> str:
    return f"s{index}-{name}"


def _section_html(index: int, section: Section) -> str:
    parts = [f'<h2 id="{_anchor(index, "top")}">{_e(section.root)}</h2>']
    run = section.run
    if run:
        parts.append("<h3>Run</h3>")
        pairs = [("command", " ".join(map(str, run.get("command", []))))]
        pairs += [(k, run[k]) for k in ("cwd", "finished", "wall_seconds", "python", "platform", "cpus") if k in run]
        pairs += [("torch threads", run.get("torch_threads")), ("CUDA device", run.get("cuda") or "none")]
        pairs += [(f"seed: {k}", v) for k, v in (run.get("seeds") or {}).items()]
        parts.append(_kv_table(pairs))
        versions = run.get("versions") or {}
        parts.append("<h4>Package versions</h4>" + _kv_table(sorted(versions.items())))
    else:
        parts.append(
            '<p class="missing">No run.json here: the command line, seeds and versions of this run were not '
            "recorded (the <code>relist</code> command writes it when a command succeeds).</p>"
        )
    if section.tables:
        parts.append("<h3>Tables</h3>")
        for rel, text in section.tables:
            parts.append(f'<p class="file">{_e(rel)}</p>{_markdown(text)}')
    if section.metrics:
        parts.append("<h3>Metrics of the runs</h3>")
        for rel, value in section.metrics:
            parts.append(f'<details><summary class="file">{_e(rel)}</summary>{_metric_tables(value)}</details>')
    if section.plots:
        parts.append("<h3>Plots</h3>")
        for rel, data in section.plots:
            src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            parts.append(f'<figure><img src="{src}" alt="{_e(rel)}"><figcaption>{_e(rel)}</figcaption></figure>')
    if section.manifests:
        parts.append("<h3>Data</h3>")
        for rel, manifest in section.manifests:
            parts.append(
                f'<p class="file">{_e(rel)}</p>{_kv_table(_manifest_summary(manifest))}'
                f"<details><summary>full manifest</summary>{_json_block(manifest)}</details>"
            )
    if section.configs or run:
        parts.append("<h3>Configuration</h3>")
        if run and "config" in run:
            parts.append(f'<p class="file">run.json: config</p>{_json_block(run["config"])}')
        for rel, value in section.configs:
            parts.append(f'<details><summary class="file">{_e(rel)}</summary>{_json_block(value)}</details>')
    if section.downloads:
        parts.append("<h3>Result files</h3><ul>")
        for rel, data in section.downloads:
            if data is None:
                parts.append(f'<li class="file">{_e(rel)} (too large to embed; in the directory)</li>')
                continue
            kind = "text/csv" if rel.suffix == ".csv" else "application/json"
            href = f"data:{kind};base64," + base64.b64encode(data).decode("ascii")
            name = "_".join(rel.parts)
            link = f'<a class="file" download="{_e(name)}" href="{href}">{_e(rel)}</a>'
            parts.append(f"<li>{link} ({len(data)} bytes)</li>")
        parts.append("</ul>")
    return "\n".join(parts)


def render(sections: list[Section], title: str = "relist report") -> str:
    """The page, as one HTML string."""
    nav = "".join(
        f'<li><a href="#{_anchor(i, "top")}">{_e(s.root)}</a>: {len(s.tables)} tables, {len(s.plots)} plots</li>'
        for i, s in enumerate(sections)
    )
    body = "\n".join(_section_html(i, s) for i, s in enumerate(sections))
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1><p>Written {_e(made)} by relist {_e(package_versions().get('relist', '?'))}.</p>"
        f"<nav><ul>{nav}</ul></nav>{body}</body></html>\n"
    )


def default_out(dirs: tuple[Path, ...] | list[Path]) -> Path:
    return Path(dirs[0]) / "report.html" if len(dirs) == 1 else Path("report.html")


def write_report(dirs: list[Path] | tuple[Path, ...], out: Path | None = None, title: str = "relist report") -> Path:
    """Write the page for ``dirs`` to ``out`` (default: see ``default_out``) and return its path."""
    if not dirs:
        raise ValueError("report: give at least one directory")
    sections = [collect(Path(d)) for d in dirs]
    out = Path(out) if out is not None else default_out(dirs)
    atomic_write_text(out, render(sections, title))
    return out


def report(cfg: ReportConfig) -> Path:
    return write_report(cfg.dirs, cfg.out, cfg.title)
