"""The typed surface, checked by mypy itself: tests/typing/ must pass ``mypy --strict``
(its ``type: ignore`` lines prove that wrong calls are rejected, since strict mode flags
an ignore that is not needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_typing_examples_pass_mypy_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-incremental",
            "--cache-dir", str(tmp_path / "cache"), str(ROOT / "tests" / "typing"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
