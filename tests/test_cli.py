"""The command line: the README's quick start as a new user runs it, and ``connectplugin``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    """This venv's scripts first on PATH, nothing of the checkout on PYTHONPATH: the suite's
    venv has the checkout installed (``pip install -e``), which maps ``connectplugin`` only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


# --- The README quick start, from an empty directory ------------------------------------------


def _quick_start() -> tuple[dict[str, str], list[str]]:
    """The files (path -> text) and shell commands of the README's Quick start section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    files, commands = {}, []
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```$", section, re.MULTILINE | re.DOTALL):
        if lang == "sh":
            commands += [line for line in body.splitlines() if line.strip()]
        else:  # the first line names the file: "# greeter.py: ..." or "// proto/x.proto: ..."
            first = body.splitlines()[0]
            name = re.match(r"(?:#|//) ([\w./]+)", first)
            assert name, f"a {lang} block in the quick start names no file: {first!r}"
            files[name.group(1)] = body
    return files, commands


def test_readme_quick_start_runs_in_an_empty_directory(tmp_path):
    files, commands = _quick_start()
    assert set(files) == {"proto/greet/v1/greet.proto", "greeter.py", "host.py"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    outputs = []
    for command in commands:
        command, _, comment = command.partition("#")
        result = subprocess.run(
            command, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        expected = comment.strip().removeprefix("prints:").strip() if "prints:" in comment else None
        outputs.append((result.stdout.strip(), expected))
    assert [out for out, expected in outputs if expected] == [e for _, e in outputs if e]
    assert any(expected for _, expected in outputs), "the quick start shows no output to check"
    # What ran came from the directory and the installed package, not from the checkout.
    probe = subprocess.run(
        [sys.executable, "-c", "import samples"], cwd=tmp_path, env=_env(), capture_output=True
    )
    assert probe.returncode != 0
