"""imager.training.loop.code_digest: the training-code part of the resume fingerprint. It must follow
every change of code and ignore comments, formatting and docstrings; TRAINING_CODE must cover every
imager module that the training math imports."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from imager.training.loop import TRAINING_CODE, code_digest
from tests.conftest import REPO

SOURCE = '''"""A module."""

import torch


def loss(x, scale=2.0):
    """Mean square."""
    return (x * scale).pow(2).mean()  # squared


class Net:
    """A class."""

    def forward(self, x):
        return x
'''


@pytest.fixture
def package(tmp_path) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "mod.py").write_text(SOURCE)
    (pkg / "sub" / "other.py").write_text("VALUE = 1\n")
    return pkg


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.replace('"""Mean square."""', '"""The mean of the squares,\n    scaled."""'),
        lambda s: s.replace('    """A class."""\n\n', ""),
        lambda s: s.replace("# squared", "# the square, averaged"),
        lambda s: s.replace("(x * scale).pow(2).mean()", "(\n        (x * scale)\n        .pow(2)\n        .mean()\n    )"),
        lambda s: "# header comment\n\n" + s + "\n\n",
    ],
    ids=["docstring", "docstring-removed", "comment", "formatting", "blank-lines"],
)
def test_documentation_and_formatting_leave_the_digest(package, edit):
    before = code_digest([package])
    mod = package / "mod.py"
    mod.write_text(edit(mod.read_text()))
    assert code_digest([package]) == before


@pytest.mark.parametrize(
    "edit",
    [
        lambda pkg: (pkg / "mod.py").write_text(SOURCE.replace("scale=2.0", "scale=3.0")),
        lambda pkg: (pkg / "mod.py").write_text(SOURCE.replace(".pow(2)", ".abs()")),
        lambda pkg: (pkg / "mod.py").write_text(SOURCE.replace("return x", "return x + 1")),
        lambda pkg: (pkg / "sub" / "other.py").write_text("VALUE = 2\n"),
        lambda pkg: (pkg / "sub" / "new.py").write_text("EXTRA = 0\n"),
        lambda pkg: (pkg / "sub" / "other.py").unlink(),
    ],
    ids=["default", "operation", "method", "nested-file", "added-file", "removed-file"],
)
def test_every_code_change_changes_the_digest(package, edit):
    before = code_digest([package])
    edit(package)
    assert code_digest([package]) != before


def test_order_does_not_matter_and_places_do(package):
    files = [package / "sub" / "other.py", package / "mod.py"]
    assert code_digest(files) == code_digest(reversed(files))
    assert code_digest([package / "mod.py"]) != code_digest([package])
    before = code_digest([package])
    (package / "sub" / "other.py").rename(package / "other.py")  # same code, moved within the package
    assert code_digest([package]) != before


def test_a_copied_tree_has_the_same_digest(package, tmp_path):
    copy = shutil.copytree(package, tmp_path / "elsewhere" / package.name)
    assert code_digest([copy]) == code_digest([package])


# Modules a training run imports that cannot change its weights: params parsing and errors, file
# helpers, the data set's writing side (its output is fingerprinted through shards/index.json), the
# samplers of the sample grids (their own generator), the encoder interface (not run: embeddings come
# from the cache, fingerprinted through meta.json and keys.txt).
NOT_TRAINING_MATH = {
    "imager", "imager.config", "imager.schema", "imager.errors", "imager.io", "imager.text", "imager.text.base",
    "imager.data", "imager.data.download", "imager.data.images", "imager.data.records", "imager.data.shard",
    "imager.evaluation", "imager.evaluation.config",
    "imager.samplers", "imager.samplers.denoiser", "imager.samplers.guidance", "imager.samplers.registry", "imager.samplers.solvers",
    # sampling draws the grids, which the weights never see (inference/images.py, the image helpers, is training code)
    "imager.inference", "imager.inference.config", "imager.inference.sampling", "imager.inference.cascade",
    "imager.data.config", "imager.text.config", "imager.text.factory",
    # the sha256 of the file a fine-tune starts from: its own part of the fingerprint (training/init.py)
    "imager.inference.metadata",
    # reading a user's sketch file (inference/conditions.py's read_condition); training makes its line maps from tensors
    "imager.inference.edit",
}  # fmt: skip


def imports_of(module: str) -> set[str]:
    """The imager modules ``module`` imports, at the top or inside functions (lazy imports count)."""
    path = REPO.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)  # `from pkg import sub` imports the submodule when there is one
            found |= {f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")}
    return {m for m in found if m.split(".")[0] in ("imager", "stages")}


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def test_training_code_covers_every_module_the_training_run_imports():
    seen, todo = set(), ["imager.training.run"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            if module in NOT_TRAINING_MATH:  # what these import lazily (encoders, download sources) is not run either
                continue
            parts = module.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ too
            todo += [".".join(parts[:i]) for i in range(1, len(parts))] + sorted(imports_of(module))
    imported = {m for m in seen if m.startswith("imager")}
    assert {"imager.training.loop", "imager.models.unet", "imager.models.diffusers_unet"} <= imported
    covered = {
        ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in TRAINING_CODE
        for f in ([p] if p.is_file() else p.rglob("*.py"))
    }
    assert all(p.is_relative_to(REPO / "imager") and p.exists() for p in TRAINING_CODE)
    assert imported - covered - NOT_TRAINING_MATH == set()
