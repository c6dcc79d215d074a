"""tools/: the `python tools/NAME.py` scripts of a checkout, one per console command, each a thin call into the
command's main(). Each runs `--help` as a user runs it: from the repo root, in a fresh process."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# console command -> the module whose main() it runs, as pyproject.toml [project.scripts] declares them
SCRIPTS = dict(re.findall(r'^(vqgan-[\w-]+) = "([\w.]+):main"$', (ROOT / "pyproject.toml").read_text(), re.M))


def tool_of(module: str) -> Path:
    return ROOT / "tools" / f"{module.rpartition('.')[2]}.py"


def test_every_console_command_has_a_tools_script_that_calls_its_main():
    assert {"vqgan-train", "vqgan-train-prior", "vqgan-tokenize", "vqgan-sample", "vqgan-export", "vqgan-convert",
            "vqgan-fid", "vqgan-evaluate"} <= set(SCRIPTS)
    assert {tool_of(module).name for module in SCRIPTS.values()} == {p.name for p in (ROOT / "tools").glob("*.py")}
    for command, module in SCRIPTS.items():
        tree = ast.parse(tool_of(module).read_text(encoding="utf-8"))
        imports = [(node.module, [a.name for a in node.names]) for node in tree.body if isinstance(node, ast.ImportFrom)]
        assert imports == [(module, ["main"])], command  # the command's own main, nothing of its own
        assert f"`{command}`" in ast.get_docstring(tree)


def test_every_tools_script_runs_help_from_the_repo_root():
    env = {**os.environ, "VQGAN_DEBUG": ""}
    runs = {command: subprocess.Popen([sys.executable, str(tool_of(module).relative_to(ROOT)), "--help"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for command, module in SCRIPTS.items()}
    for command, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"{command}: {err}"
        assert out.startswith(f"usage: {command} "), f"{command}: {out[:200]}"  # the help names the command
