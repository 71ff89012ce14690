"""Every code block of README.md runs as written on a CPU-only machine.

The python blocks run in order in one fresh Python process (a reader pasting them into one
session), given nothing but the installed package: no TRITON_INTERPRET (the test suite's own
setting is removed), no extra imports, no extra variables. The bash blocks are the quick start's
two commands, which are not run here: `bash bench/main.sh` installs packages and runs the main job
(minutes), and `bash tests/run.sh` is this test suite itself (it would recurse); the test checks
that there are exactly those two and that the scripts exist.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
QUICK_START = ["bash bench/main.sh", "bash tests/run.sh"]


def code_blocks(text):
    """[(language, code)] of the fenced blocks of a markdown text, in order."""
    blocks = re.findall(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S)
    if text.count("\n```") != 2 * len(blocks):
        raise AssertionError("README.md has an unterminated or indented code fence")
    return blocks


def test_blocks_are_python_or_the_quick_start():
    blocks = code_blocks(open(README, encoding="utf-8").read())
    langs = [lang for lang, _ in blocks]
    assert set(langs) <= {"python", "bash"}, f"code blocks in other languages: {langs}"
    bash = [code for lang, code in blocks if lang == "bash"]
    assert len(bash) == 1, "a bash block other than the quick start: run it in a test or make it text"
    commands = [line.split("#")[0].strip() for line in bash[0].splitlines() if line.strip()]
    assert commands == QUICK_START
    for cmd in commands:
        assert os.path.exists(os.path.join(ROOT, cmd.split()[1])), cmd
    assert langs.count("python") >= 3


def test_python_blocks_run_as_written(tmp_path):
    blocks = [code for lang, code in code_blocks(open(README, encoding="utf-8").read())
              if lang == "python"]
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDRNN_BACKEND",
                                                             "FUSEDRNN_KERNEL")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"README's python blocks did not finish in {exc.timeout} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert r.stdout.count("PASSED") == 2  # the two verify reports
    assert "through Triton's interpreter in a child process" in r.stderr
