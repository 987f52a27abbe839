"""The documentation site (mkdocs.yml, docs/) builds in strict mode, so a broken link, a missing
page of the nav or an API reference that does not resolve fails the suite; the reference pages
carry the library's docstrings; and a broken link does fail the build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(site)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_site_builds_strictly_with_the_api_reference(tmp_path):
    result = build(REPO, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    samplers = (tmp_path / "site" / "reference" / "samplers" / "index.html").read_text()
    assert 'id="imager.samplers.solvers.sample_dpmpp_2m"' in samplers and "DPM-Solver++" in samplers
    cluster = (tmp_path / "site" / "cluster" / "index.html").read_text()
    assert "LAION-400M" in cluster


def test_every_page_is_in_the_nav_and_every_package_in_the_reference():
    cfg = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)

    def pages(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(cfg["nav"])) | set(cfg["not_in_nav"].split())
    docs = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert docs == listed
    reference = "".join(p.read_text() for p in (REPO / "docs" / "reference").glob("*.md"))
    for module in sorted((REPO / "imager").rglob("*.py")):
        name = ".".join(module.relative_to(REPO).with_suffix("").parts)
        if not module.name.startswith("_"):
            assert f"::: {name}\n" in reference, f"{name} is not in the API reference"


def test_a_broken_link_fails_the_build(tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(REPO / "imager", root / "imager", ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / "docs" / "index.md", "a", encoding="utf-8") as fh:
        fh.write("\nSee [the missing page](nowhere.md).\n")
    result = build(root, tmp_path / "site")
    assert result.returncode != 0 and "nowhere.md" in result.stderr


def test_the_readme_and_the_front_page_lead_to_every_tutorial_and_guide():
    """The README is the front door: every tutorial and guide of the nav is one link away from it
    and from the site's front page, and every link of the README into the repository resolves."""
    cfg = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    sections = {next(iter(item)): next(iter(item.values())) for item in cfg["nav"] if isinstance(item, dict)}
    wanted = [next(iter(entry.values())) for name in ("Tutorials", "Guides") for entry in sections[name]]
    assert len(wanted) > 10
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    index = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    for page in wanted:
        assert f"](docs/{page})" in readme, f"the README does not link docs/{page}"
        assert f"]({page})" in index, f"docs/index.md does not link {page}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), f"the README links {target}, which does not exist"
