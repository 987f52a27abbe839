"""Fixtures of the benchmark's tests: one torch thread, and the command's output folders moved
under each test's tmp_path, so that the suite never writes docs/ or benchmarks/results/."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every benchmark test on one torch thread (tests/conftest.py says why)."""


@pytest.fixture(autouse=True)
def outputs(tmp_path, monkeypatch) -> dict[str, Path]:
    """Where ``python -m benchmarks`` writes by default (``results``) and with --publish (``published``)."""
    import benchmarks.__main__ as main

    moved = {"results": tmp_path / "results", "published": tmp_path / "docs"}
    monkeypatch.setattr(main, "RESULTS", moved["results"])
    monkeypatch.setattr(main, "PUBLISHED", moved["published"])
    return moved
