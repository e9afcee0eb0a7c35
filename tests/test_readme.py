"""Every python block of README.md runs verbatim, and prints what the README says.

A ```python block followed by a line "prints" and a ```text block must write exactly that
text to stdout; other python blocks must run without error. Blocks run one by one, each
in a fresh namespace, in a temporary directory (they may write files), on the default
backend.
"""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```python\n(?P<code>.*?)```\n(?:prints\n```text\n(?P<out>.*?)```)?",
                   re.DOTALL)


def readme_blocks():
    if not README.exists():  # the tests run from a checkout; an sdist may not ship README
        return []
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(pytest.param(match["code"], match["out"], id=f"README.md:{line}"))
    return blocks


def test_readme_has_python_blocks():
    assert len(readme_blocks()) >= 4


@pytest.mark.parametrize("code, expected", readme_blocks())
def test_readme_block_runs_and_prints_what_it_says(code, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    if expected is not None:
        assert stdout.getvalue() == expected
