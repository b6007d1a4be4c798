"""The README's quickstart: every command in its shell block parses, and the block runs as a reader runs it.

The block is read from README.md (the ```sh fence under "## Quickstart on real data"), never copied here, so
the test and the page cannot drift apart. The fast test parses every `relist` command of the block with the
command's real parser and configuration (choices, types, required options, the policies of `abtest`) and
checks that the block covers every step of the story, and that the README's command list names every command
of `relist`. The slow test runs the block itself, in a temporary directory laid out as the repository is (the
MIND subset at ``../shared/data/mind_small_5k``, as written), as one bash script that stops at the first
command that exits non-zero and names it; `relist serve ... &` runs in the background there and `kill $!`
ends it, as in a reader's shell. Without the MIND subset the slow test skips, except under CI (``CI=true``),
where it fails.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.shared_data import MIND_SUBSET as MIND
from tests.shared_data import SHARED

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICKSTART_HEADING = "## Quickstart on real data"
PORT = 8765


def quickstart_block() -> str:
    """The text of the first ```sh block after the quickstart heading."""
    text = README.read_text(encoding="utf-8")
    assert QUICKSTART_HEADING in text, f"README.md has no {QUICKSTART_HEADING!r} section"
    section = text.split(QUICKSTART_HEADING, 1)[1]
    match = re.search(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)
    assert match, "the quickstart section has no ```sh block"
    return match.group(1)


def commands(block: str) -> list[list[str]]:
    """The block's shell commands as argument lists: continuation lines joined, multi-line quotes kept whole,
    comments dropped, a trailing `&` removed."""
    out, pending = [], ""
    for line in block.splitlines():
        if line.endswith("\\"):  # a continuation line: bash drops the backslash and the line break
            pending += line[:-1] + " "
            continue
        pending += line + "\n"
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        pending = ""
        if words and words[-1] == "&":
            words = words[:-1]
        if words:
            out.append(words)
    assert not pending.strip(), f"the quickstart block ends inside a command: {pending!r}"
    return out


def relist_commands() -> list[list[str]]:
    return [words[1:] for words in commands(quickstart_block()) if words[0] == "relist"]


def test_every_quickstart_command_parses():
    """Each `relist` line parses with its command's own parser and builds its configuration (the choices,
    types and checks of the options), and `abtest`'s policies are valid specs."""
    from relist.cli import COMMANDS, command_path, make_parser, resolve
    from relist.config import build
    from relist.sim.policies import parse_spec

    lines = relist_commands()
    assert lines, "no relist command in the quickstart"
    for argv in lines:
        path = command_path(argv)
        assert path is not None, f"not a relist command: relist {shlex.join(argv)}"
        parser = make_parser(path)
        try:
            args = parser.parse_args(argv)
            cfg = build(resolve(COMMANDS[path].config), args, parser)
        except SystemExit as exit_:
            pytest.fail(f"relist {shlex.join(argv)} does not parse (exit {exit_.code})")
        if path == ("abtest",):
            parse_spec(cfg.policies)


def test_quickstart_tells_the_whole_story():
    """The block has every step the README promises, in order, and its server is stopped."""
    lines = commands(quickstart_block())
    steps = [" ".join(words[:3]) for words in lines]
    expected = [
        "relist data prepare",
        "relist data stats",
        "relist train ranker",
        "relist train reranker",
        "relist train evaluator",
        "relist train generator",
        "relist serve",
        "curl",
        "kill",
        "relist sim train",
        "relist abtest",
        "relist report",
    ]
    found = [next((k for k, step in enumerate(steps) if step.startswith(e)), None) for e in expected]
    assert None not in found, f"missing steps: {[e for e, k in zip(expected, found) if k is None]}"
    assert found == sorted(found), f"steps out of order: {steps}"
    rerankers = [words for words in lines if words[:3] == ["relist", "train", "reranker"]]
    assert any("--p1-weight" in w and "--p2-weight" in w for w in rerankers), "no re-ranker with the principles"
    assert any("--p1-weight" not in w and "--p2-weight" not in w for w in rerankers), "no re-ranker without them"
    (abtest,) = [words for words in lines if words[:2] == ["relist", "abtest"]]
    policies = abtest[abtest.index("--policies") + 1]
    for kind in ("ranker:", "reranker:", "greedy:", "last:"):
        assert kind in policies, f"abtest has no {kind} policy"
    (serve,) = [words for words in lines if words[:2] == ["relist", "serve"]]
    assert str(PORT) in serve, f"the quickstart's server is expected on port {PORT}"
    assert any("/rerank" in " ".join(w) for w in lines if w[0] == "curl"), "no curl to /rerank"
    assert "../shared/data/mind_small_5k" in quickstart_block()


def test_readme_lists_every_command():
    """The README's command list names every command of `relist` (the registry the parser is built from)."""
    from relist.cli import COMMANDS

    text = README.read_text(encoding="utf-8").split("## Commands", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("#")[0].strip() for line in text.splitlines() if line.startswith("relist ")}
    for path in COMMANDS:
        words = "relist " + " ".join(path)
        assert any(line == words or line.startswith(words + " ") for line in listed), f"{words} is not listed"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    """The quickstart block, run as written from a directory laid out as the repository (``../shared`` beside
    it): every command exits 0, the service answers the curl, and the report is written."""
    if not MIND.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the MIND subset is not at {MIND}, and CI=true: the quickstart must run")
        pytest.skip(f"the MIND subset is not at {MIND}")
    assert _port_free(PORT), f"port {PORT}, which the quickstart's server uses, is taken"
    work = tmp_path / "relist"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    script = (
        "set -euo pipefail\n"
        "trap 'echo \"quickstart: line $LINENO exited $?: $BASH_COMMAND\" >&2' ERR\n" + quickstart_block()
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "2")
    started = time.time()
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the background server goes with it whatever happens
    )
    try:
        stdout, stderr = process.communicate(timeout=3600)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    seconds = time.time() - started
    assert process.returncode == 0, f"the quickstart failed after {seconds:.0f} s:\n{stderr[-6000:]}"
    assert '"order"' in stdout and '"exploration"' in stdout, f"no /rerank answer in the output:\n{stdout[-3000:]}"
    assert '"ready":true' in stdout.replace(" ", ""), "the service never said it was ready"
    runs = work / "runs" / "qs"
    for path in ("mind/manifest.json", "ranker/rerank/manifest.json", "prm/best", "prm-p1p2/best"):
        assert (runs / path).exists(), f"{path} was not written"
    assert (runs / "abtest" / "summary.md").is_file()
    report = (runs / "report.html").read_text(encoding="utf-8")
    assert "<html" in report.lower() and "abtest" in report
    assert _port_free(PORT), "the quickstart left its server running"
