"""The README's walk-through (poison -> inspect-data -> retrain -> scan -> repair -> filter ->
report), run exactly as written: the commands are read from the README itself, so the two cannot
drift apart."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from trojanscope.cli import cli

README = Path(__file__).resolve().parents[2] / "README.md"
MARK = "<!-- walkthrough"

pytestmark = pytest.mark.usefixtures("one_thread")


def walkthrough_commands(text: str) -> list[list[str]]:
    """The ``trojanscope ...`` command lines of the fenced block after the walk-through marker
    (continuation lines joined, ``# comments`` dropped)."""
    start = text.index(MARK)
    block = re.search(r"```[a-z]*\n(.*?)```", text[start:], re.S)
    assert block, "no fenced block after the walk-through marker"
    lines, cur = [], ""
    for raw in block.group(1).splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not cur and not line.startswith("trojanscope "):
            continue  # output shown in the README, or a blank line
        cur += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(cur.strip())
            cur = ""
    return [shlex.split(c, comments=True) for c in lines]


def test_the_walkthrough_is_in_the_readme_and_covers_every_step():
    cmds = walkthrough_commands(README.read_text())
    verbs = [c[1] for c in cmds]
    for step in ("poison", "inspect-data", "scan", "repair", "filter"):
        assert step in verbs, (step, verbs)
    assert verbs.index("poison") < verbs.index("inspect-data") < verbs.index("scan") < verbs.index("repair")
    inspect = cmds[verbs.index("inspect-data")]
    assert "--retrain" in inspect and "runs/bn/train.npz" in " ".join(inspect)  # the poisoned set poison wrote
    assert any("--report" in c for c in cmds)


def test_the_walkthrough_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh folder: everything the commands read, they wrote
    for args in walkthrough_commands(README.read_text()):
        r = CliRunner().invoke(cli, args[1:], catch_exceptions=False)
        allowed = (0, 1) if args[1] == "scan" else (0,)  # scan: exit 1 means a backdoor was found
        assert r.exit_code in allowed, (" ".join(args), r.exit_code, r.output, r.stderr)
        assert "Traceback" not in r.stderr and "warning" not in r.stderr, (" ".join(args), r.stderr)
        if args[1] == "scan":
            assert r.exit_code == 1, f"the walk-through's scan should find the backdoor:\n{r.output}"
    for f in ("runs/bn/train.npz", "runs/bn/model.safetensors", "runs/scan/scan.json", "runs/fixed/model.json"):
        assert (tmp_path / f).is_file(), f
    assert any(p.suffix == ".html" for p in (tmp_path / "runs").rglob("*.html"))
