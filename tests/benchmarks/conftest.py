"""Fixtures of the benchmark's tests: one torch thread, and the command's output folders moved
under each test's tmp_path, so that the suite never writes docs/ or benchmarks/results/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads spin-wait for each other (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def outputs(tmp_path, monkeypatch) -> dict[str, Path]:
    """Where ``python -m benchmarks`` writes by default (``results``) and with --publish (``published``)."""
    import benchmarks.__main__ as main

    moved = {"results": tmp_path / "results", "published": tmp_path / "docs"}
    monkeypatch.setattr(main, "RESULTS", moved["results"])
    monkeypatch.setattr(main, "PUBLISHED", moved["published"])
    return moved
