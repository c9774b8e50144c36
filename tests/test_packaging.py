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


# ------------------------------------------------------------------ imports without their extra


def _without(blocked: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where importing ``blocked`` fails, as it does
    when the package is not installed (``sys.modules[name] = None`` makes Python refuse
    the import with ModuleNotFoundError)."""
    guard = f"import sys\nsys.modules[{blocked!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", guard + code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


_IMPORT = """
try:
    import {module}
except ImportError as exc:
    print(type(exc).__name__, isinstance(exc, ModuleNotFoundError), exc.name, exc, sep="|")
else:
    print("imported")
"""


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("background_tasks.fastapi", "fastapi", "fastapi"),
        ("background_tasks.cli", "rich", "cli"),
    ],
)
def test_a_module_without_its_extra_says_what_to_install(
    module: str, blocked: str, extra: str
) -> None:
    done = _without(blocked, _IMPORT.format(module=module))
    assert done.returncode == 0, done.stderr
    kind, is_module_not_found, name, message = done.stdout.strip().split("|")
    assert kind == "MissingExtra"
    assert is_module_not_found == "True"  # code catching ModuleNotFoundError still works
    assert name.partition(".")[0] == blocked  # the module that failed (rich.console, ...)
    assert f"needs {blocked}," in message
    assert f"pip install 'anyio-background-tasks[{extra}]'" in message


def test_the_package_imports_without_any_extra() -> None:
    code = "\n".join(
        [f"sys.modules[{name!r}] = None" for name in ("fastapi", "rich", "psycopg")]
        + ["import background_tasks, background_tasks.__main__", "print('ok')"]
    )
    done = _without("starlette", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_bgtasks_without_rich_is_one_line_saying_what_to_install() -> None:
    done = _without(
        "rich", "from background_tasks.__main__ import main\nraise SystemExit(main(['--help']))"
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("bgtasks: error: the bgtasks command line needs rich")
    assert "pip install 'anyio-background-tasks[cli]'" in done.stderr
