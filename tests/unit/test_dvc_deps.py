"""dvc.yaml's `deps` against what each stage's command really imports: a stage that imports library
code its deps don't list would not rerun when that code changes, and `dvc repro` would keep stale
outputs. The imports are read statically (every import statement of a library module, wherever it
stands; of the stage's command function and its module's top level), so lazy imports count too.

imager/config.py gathers the settings models of every section to validate the whole file. A stage
depends on the models of its own params sections (their defaults decide its behaviour); the others
only decide whether the file is valid, which is the `params` stage's job: it depends on them all."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

# imager/tracking.py only logs to MLflow and changes no output (dvc.yaml's header says so); what only
# it imports (the MLflow model of imager/serving.py) is not followed either.
NOT_FOLLOWED = {"imager.tracking"}


def module_path(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _statements(tree: ast.AST, top_level_only: bool):
    """Import statements of ``tree``, leaving out ``if TYPE_CHECKING:`` blocks (never executed)."""
    todo = list(tree.body) if isinstance(tree, ast.Module) else [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not top_level_only or isinstance(node, ast.If):
            todo += list(ast.iter_child_nodes(node))


def lazy_exports(package: str) -> dict[str, str]:
    """The names a package's ``__getattr__`` loads on first use: its TYPE_CHECKING imports."""
    path = module_path(package)
    if path is None or path.name != "__init__.py":
        return {}
    exports = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if _is_type_checking(node):
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.ImportFrom) and stmt.module:
                    exports |= {a.asname or a.name: stmt.module for a in stmt.names}
    return exports


def imported_names(tree: ast.AST, module: str, *, top_level_only: bool = False) -> set[str]:
    """Absolute module names imported in ``tree`` (``from a import b`` gives a and, when b is a module
    or a lazily loaded name of package a, the module that holds it)."""
    names: set[str] = set()
    for node in _statements(tree, top_level_only):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
            continue
        base = node.module or ""
        if node.level:
            pkg = module.split(".")[: len(module.split(".")) - node.level + (module_path(module).name == "__init__.py")]
            base = ".".join([*pkg, base] if base else pkg)
        names.add(base)
        lazy = lazy_exports(base)
        for a in node.names:
            if module_path(f"{base}.{a.name}"):
                names.add(f"{base}.{a.name}")
            elif a.name in lazy:
                names.add(lazy[a.name])
    return {n for n in names if n.split(".")[0] in ("imager", "stages")}


def with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def section_modules(sections: list[str] | None) -> set[str]:
    """The modules that define the settings models of these params sections (all: every section)."""
    from imager.config import Params

    fields = Params.model_fields
    chosen = fields if sections is None else {k: fields[k] for k in {s.split(".")[0] for s in sections}}  # evaluate.base -> evaluate
    return {f.annotation.__module__ for f in chosen.values() if isinstance(f.annotation, type)}


def closure(start: set[str], sections: list[str] | None = None) -> set[Path]:
    """The files of every project module reachable from ``start``; imager.config is followed only
    into the settings of ``sections`` (None: all of them)."""
    seen: set[str] = set()
    todo = [p for name in start for p in with_parents(name)]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_FOLLOWED:
            continue
        seen.add(name)
        path = module_path(name)
        if path is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = imported_names(tree, name)
        if name == "imager.config":
            imported = {n for n in imported if not n.endswith(".config")} | section_modules(sections)
        todo += [p for n in imported for p in with_parents(n)]
    return {module_path(n) for n in seen if module_path(n) is not None}  # type: ignore[misc]


def commands() -> dict[str, object]:
    from stages.app import app

    return {(c.name or c.callback.__name__.replace("_", "-")): inspect.unwrap(c.callback) for c in app.registered_commands}


def command_module(command: str) -> Path:
    return Path(inspect.getsourcefile(commands()[command]))


def command_imports(command: str) -> set[str]:
    """What running ``imager <command>`` imports: everything its module imports, except inside the
    functions of the module's other commands."""
    fn = commands()[command]
    module = inspect.getmodule(fn)
    others = {f.__name__ for name, f in commands().items() if name != command and inspect.getmodule(f) is module}
    tree = ast.parse(inspect.getsource(module))
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name in others)]
    return imported_names(tree, module.__name__)


def has_code(path: Path) -> bool:
    """Whether a file holds more than a docstring."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def dvc_stages() -> dict[str, dict]:
    """Every stage of dvc.yaml, finetune/dvc.yaml and control/dvc.yaml (a foreach stage: its ``do``
    body, under ``file:name``); the stages of the pipelines in folders run from the project root (``wdir: ..``)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for folder in ("finetune", "control"):
        for name, spec in yaml.safe_load((REPO / folder / "dvc.yaml").read_text(encoding="utf-8"))["stages"].items():
            body = spec.get("do", spec)
            assert body.get("wdir") == "..", f"{folder}/dvc.yaml stage {name}: must run from the project root (wdir: ..)"
            stages[f"{folder}:{name}"] = body
    return stages


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_stage_deps_cover_its_imports(stage):
    spec = dvc_stages()[stage]
    words = spec["cmd"].split()
    assert words[0] == "imager", f"{stage}: cmd is not an imager command"
    deps = [REPO / d for d in spec.get("deps", []) if not d.startswith("data/")]
    sections = None if stage == "params" else [(next(iter(p)) if isinstance(p, dict) else p).split(".$")[0] for p in spec.get("params", [])]
    files = closure(command_imports(words[1]), sections) | {command_module(words[1]), REPO / "stages" / "__init__.py"}
    files = {f for f in files if f.name != "__init__.py" or has_code(f)}
    missing = sorted(f.relative_to(REPO).as_posix() for f in files if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {stage}: deps miss code it imports: {missing}"


def test_the_check_follows_lazy_imports():
    # The library imports heavy modules inside functions; the closure must see them.
    files = {f.relative_to(REPO).as_posix() for f in closure({"imager.text.factory"})}
    assert "imager/text/hf.py" in files and "imager/text/clip.py" in files
