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


def test_readme_layout_names_every_module():
    """The README's Layout section lists every module of fastnn/ and kernels/, and
    nothing that does not exist."""
    root = README.parent
    if not (root / "fastnn").is_dir():
        pytest.skip("needs the source checkout")
    text = README.read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    entries = [re.split(r"\s{2,}", line.strip())[0] for line in block.splitlines()
               if line.strip()]
    listed = {name.strip() for entry in entries for name in entry.split(",")}
    modules = {p.name for p in (root / "fastnn").glob("*.py")}
    modules |= {p.name + "/" for p in (root / "fastnn").iterdir()
                if (p / "__init__.py").exists()}
    modules |= {p.name for p in (root / "kernels").glob("*.py*")}
    missing = modules - listed
    assert not missing, f"README Layout does not list {sorted(missing)}"
    places = [root, root / "fastnn", root / "kernels"]
    unknown = {name for name in listed
               if not any((place / name.rstrip("/")).exists() for place in places)}
    assert not unknown, f"README Layout lists {sorted(unknown)}, which do not exist"
