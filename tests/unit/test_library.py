"""The library's house rules: importing it has no side effects, and only tracking (MLflow runs) and
serving (the cascade as an MLflow model, imported only when a model is logged or served) import
mlflow."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

# tracking logs runs, serving is the model, the app lists and loads logged models, and a fine-tune
# fetches the model it starts from (init_from: an MLflow URI)
MLFLOW_MODULES = ["imager/app/models.py", "imager/serving.py", "imager/tracking.py", "imager/training/init.py"]


def test_only_the_modules_that_log_or_fetch_models_import_mlflow():
    importers = []
    for path in sorted((REPO / "imager").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.append(path.relative_to(REPO).as_posix())
    assert sorted(set(importers)) == MLFLOW_MODULES


def test_importing_every_module_writes_nothing_and_loads_no_mlflow(tmp_path):
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "imager").rglob("*.py")
        if p.relative_to(REPO).as_posix() != "imager/serving.py"  # an MLflow model by definition
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported at import time'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_params_validation_does_not_load_torch():
    code = "import sys, imager.config; imager.config.parse({}); assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
