"""Shared fixtures: device/dtype, seeding, the path to ../shared/data (skipped when absent), and the check of a
command that must refuse its input."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.cli import huge_pages_for_tensors, retain_freed_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FUSION_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

#: Threads a test may use at most: the cores, up to two.
CORES = max(1, min(2, os.cpu_count() or 1))
# Each xdist worker takes its share of them: two workers with two OpenMP threads each on two cores spin-wait
# on each other.
torch.set_num_threads(max(1, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
# The test process is an entry point too: its real-size runs get the allocator settings that run.py gives them.
retain_freed_memory()
huge_pages_for_tensors()


def shared_data_dir(*parts: str) -> Path:
    """Path under ../shared/data; skips the test when it is absent, except in CI where it must exist."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI expects the shared data at {path}")
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def shared_data():
    """Callable fixture: ``shared_data("vifb", "ir")`` returns the path or skips."""
    return shared_data_dir


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def _threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny problems: one thread avoids OpenMP spin-waiting on a loaded 2-core machine (up to 100× slower)."""
    yield from _threads(1)


@pytest.fixture
def all_cores():
    """A test on the suite's critical path takes every core (:data:`CORES`), more than its worker's share."""
    yield from _threads(CORES)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` → content hash ('dir' for folders): equal snapshots = nothing changed."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def expect_error(capsys):
    """``expect_error(root, command, argv, *names)``: the command refuses its input as the toolkit's rule says —
    exit code 2, exactly one stderr line starting ``error:`` that contains each of ``names``, no traceback, and
    nothing under ``root`` written or changed. Returns the error line."""
    def check(root: Path, command: Callable[[list[str]], int], argv: list[str], *names: str) -> str:
        before = _snapshot(root)
        rc = command(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == 2, captured.err
        assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
        for name in names:
            assert name in lines[0], lines[0]
        assert "Traceback" not in captured.out + captured.err
        assert _snapshot(root) == before, "a failed command wrote or changed files"
        return lines[0]
    return check
