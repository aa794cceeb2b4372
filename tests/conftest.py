"""Shared fixtures: the real CIFAR-10 copy (built once per session from ../shared) and tiny run configs."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding cifar-10-batches-py/: the repo's data/ when built, else built now from ../shared."""
    local = REPO / "data"
    if (local / "cifar-10-batches-py" / "test_batch").is_file():
        return local
    out = tmp_path_factory.mktemp("cifar")
    script = SHARED / "data" / "build_cifar10.py"
    assert script.is_file(), f"{script} is missing: the tests need ../shared beside the repository"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    return out
