"""What a user gets from the distribution: an sdist whose own tests run.

The sdist test builds the sdist (``python -m build --sdist``, as a release would), unpacks
it, and has pytest *collect* the tests there, with the package imported from the unpacked
tree. It only collects (a few seconds), which is what a missing helper file, fixture
module or data file breaks; running the whole suite a second time would add a minute and
a half and find nothing more about packaging.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What a checkout may hold that is not source (build output, caches, journals, venvs).
_NOT_SOURCE = (
    ".git", ".venv", ".tox", "*.egg-info", "build", "dist", "site", "__pycache__",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".benchmarks", "*.db", "*.db-*",
)  # fmt: skip


def _collect(where: Path) -> int:
    """How many tests ``pytest --collect-only`` finds in ``where``, importing the package
    from ``where`` only."""
    env = {**os.environ, "PYTHONPATH": str(where)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = re.search(r"^(\d+) tests? collected", done.stdout, re.MULTILINE)
    assert found is not None, done.stdout[-3000:]
    return int(found.group(1))


@pytest.mark.slow
def test_the_sdist_has_what_its_tests_need(tmp_path: Path) -> None:
    # Built from a copy: setuptools would otherwise reuse the file list of an egg-info
    # left in the checkout by an earlier build, and write a new one there.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    built = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("anyio_background_tasks-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (tree,) = (tmp_path / "unpacked").iterdir()

    names = {p.relative_to(tree).as_posix() for p in tree.rglob("*")}
    for needed in (
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "tests/conftest.py",
        "tests/support.py",
        "tests/durability_apps/worker.py",
        "tests/typing/check_registered.py",
        "docs/cli.md",
        "examples/fastapi_app.py",
        "benchmarks/compare.py",
        "background_tasks/py.typed",
    ):
        assert needed in names, needed
    assert not any(n.endswith((".pyc", ".db")) or "__pycache__" in n for n in names)

    # The package the unpacked tests import is the unpacked one.
    where = subprocess.run(
        [sys.executable, "-c", "import background_tasks; print(background_tasks.__file__)"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(tree), where

    assert _collect(tree) == _collect(ROOT)
