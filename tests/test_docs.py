"""The examples of docs/testing.md, run as what they are: small projects with tests.

In that page, ``<!-- example: NAME -->`` starts an example project (``<!-- example:
NAME; from OTHER: a.py, b.py -->`` also takes those files of an earlier one), and every
fenced block with a ``title="path"`` is a file of the current project. Each project is
written to a directory of its own and run with pytest in a subprocess, as its reader
would run it; a Python block without a title would not be run, so there must be none.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "testing.md"

_EXAMPLE = re.compile(r"<!--\s*example:\s*([\w-]+)\s*(?:;\s*from\s+([\w-]+)\s*:\s*([^>]*?))?\s*-->")
_FENCE = re.compile(r"^```(\w*)(.*)$")
_TITLE = re.compile(r'title="([^"]+)"')


@dataclass
class Example:
    name: str
    files: dict[str, str] = field(default_factory=dict)


def examples(text: str) -> dict[str, Example]:
    found: dict[str, Example] = {}
    current: Example | None = None
    lines = iter(text.splitlines())
    for line in lines:
        marker = _EXAMPLE.search(line)
        if marker:
            current = found[marker[1]] = Example(marker[1])
            if marker[2]:
                for name in marker[3].split(","):
                    current.files[name.strip()] = found[marker[2]].files[name.strip()]
            continue
        fence = _FENCE.match(line)
        if not fence:
            continue
        body = []
        for inner in lines:
            if inner.startswith("```"):
                break
            body.append(inner)
        title = _TITLE.search(fence[2])
        if title is None:
            assert fence[1] != "python", f"a Python block without a title: {body[:2]}"
            continue
        assert current is not None, f"{title[1]} comes before any example marker"
        current.files[title[1]] = "\n".join(body) + "\n"
    return found


EXAMPLES = examples(PAGE.read_text())


def test_the_page_has_its_examples() -> None:
    assert set(EXAMPLES) == {"pytest-asyncio", "anyio"}
    for example in EXAMPLES.values():
        assert any(name.startswith("tests/test_") for name in example.files)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_an_example_of_the_docs_passes(name: str, tmp_path: Path) -> None:
    example = EXAMPLES[name]
    if name == "pytest-asyncio":
        pytest.importorskip("pytest_asyncio")
    for path, text in example.files.items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tests = sum(
        len(re.findall(r"^(?:async )?def test_", text, re.M))
        for path, text in example.files.items()
        if path.startswith("tests/test_")
    )
    backends = 2 if '["asyncio", "trio"]' in example.files.get("tests/conftest.py", "") else 1
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout + done.stderr
    passed = re.search(r"(\d+) passed", summary)
    assert passed is not None, summary
    # anyio's tests run once per backend; pytest-asyncio's once
    assert int(passed[1]) >= tests if backends == 1 else int(passed[1]) > tests, summary
    assert "failed" not in summary, summary
    assert "error" not in summary, summary
