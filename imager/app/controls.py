"""The sketch controls the app offers: the control files (ControlNet or adapter, written by
``imager train-control``) of the server's folders (``imager ui --control-dir DIR``,
``data/control`` by default).

A request names a control by its path relative to a folder (``controlnet/control.safetensors``:
the listing's name, links resolved), by the folder that holds a ``control.safetensors``
(``controlnet``) or by its full path; as for LoRA adapters (:mod:`imager.app.adapters`), only a
file inside a folder once every symlink and ``..`` is resolved is read, and the error does not
say whether any other file exists. Each control is loaded once per (file version, base model)
and kept while that base model is.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from imager.app.adapters import MAX_LISTED, SUFFIX, _inside
from imager.errors import ConfigError, ImagerError

log = logging.getLogger("imager")
FILE_NAME = "control.safetensors"  # what `imager train-control` writes in data/control/<variant>/
NETS_PER_BASE = 4  # loaded controls kept per base model


@dataclass(frozen=True)
class AvailableControl:
    """One control file of the folders, as the listing shows it."""

    name: str  # what a request names it by: its path in its folder, links resolved
    path: Path  # the resolved file
    arch: str  # controlnet or adapter
    condition: str  # lines, edges or lineart: what it was trained to follow
    parameters: int
    size: int
    base: dict[str, Any]  # the base model's config it was built for
    base_sha256: str

    def describe(self, fits: bool | None, default: bool = False) -> dict[str, Any]:
        """``fits``: built for the model's base (None: the model is not loaded yet, so unknown)."""
        return {"name": self.name, "arch": self.arch, "condition": self.condition, "parameters": self.parameters, "size": self.size,
                "base_sha256": self.base_sha256[:12], "fits": fits, "default": default}  # fmt: skip

    def fits(self, base_config: dict[str, Any], base_sha256: str | None) -> bool:
        """Whether it was built for a base model of this config and weights digest (as ``check_base``)."""
        return base_config == self.base and (not self.base_sha256 or self.base_sha256 == base_sha256)


class ControlLibrary:
    """The control folders; ``default``: the variant a request without ``controlnet`` uses (params'
    ``control.default``) when one of that name is listed, else the first listed control is."""

    def __init__(self, folders: Sequence[str | Path] = (), default: str | None = None):
        self.folders = [Path(f) for f in folders]
        self.default = default
        self._read: dict[tuple[Path, int, int], AvailableControl | str] = {}  # a control, or why the file is not one
        self._nets: weakref.WeakKeyDictionary[Any, OrderedDict] = weakref.WeakKeyDictionary()  # base model -> loaded controls
        self._lock = threading.Lock()

    def list(self) -> list[AvailableControl]:
        """The controls of every folder, by name (a name in an earlier folder hides a later one's);
        files that are not control files (a model, a LoRA adapter) are left out."""
        out: dict[str, AvailableControl] = {}
        for folder, root in self._roots():
            for path in sorted(islice(folder.rglob(f"*{SUFFIX}"), MAX_LISTED)):
                real = _inside(path, root)
                name = None if real is None else real.relative_to(root).as_posix()
                if name is None or name in out:
                    continue
                try:
                    out[name] = self.describe(name, real)
                except ConfigError as exc:
                    log.debug("not listed: %s", exc)
        return list(out.values())

    def default_name(self, listed: list[AvailableControl] | None = None) -> str | None:
        """The name a request without ``controlnet`` uses; None when the folders hold no control."""
        listed = self.list() if listed is None else listed
        for c in listed:
            if self.default is not None and c.name in (self.default, f"{self.default}/{FILE_NAME}"):
                return c.name
        return listed[0].name if listed else None

    def resolve(self, name: str | None, what: str = "controlnet") -> AvailableControl:
        """The control a request names (None: the default one), read; a ConfigError naming ``what``
        for anything outside the folders or a file that is not a control."""
        if not self.folders:
            raise ConfigError(f"{what}: this server offers no sketch controls (start it with --control-dir DIR)")
        if name is None:
            name = self.default_name()
            if name is None:
                raise ConfigError(f"{what}: the server's control folders hold no control file; train one with `imager train-control`")
        given = Path(name)
        for folder, root in self._roots():
            real = _inside(given if given.is_absolute() else folder / given, root)
            if real is not None and real.is_dir():
                real = _inside(real / FILE_NAME, root)
            if real is not None and real.suffix == SUFFIX and real.is_file():
                return self.describe(real.relative_to(root).as_posix(), real, what)
        raise ConfigError(f"{what}: no control '{name}' in the server's control folders; GET /api/v1/controls lists them")

    def describe(self, name: str, path: Path, what: str = "controlnet") -> AvailableControl:
        """The control at a resolved ``path``; a ConfigError naming it for a file that is not one."""
        from imager.models.control import read_control

        try:
            stat = path.stat()
        except OSError:
            raise ConfigError(f"{what}: {name}: cannot be read") from None
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            found = self._read.get(key)
            if found is None:
                if len(self._read) > 4 * MAX_LISTED:  # files replaced many times: forget the old versions
                    self._read.clear()
                try:
                    if not _marked(path):  # a model or an adapter of the same folder: refused on its header, not read whole
                        raise ConfigError("not an Imager control file (ControlNet or adapter)")
                    info = read_control(path)
                    found = AvailableControl(name, path, info.settings.arch, info.settings.condition, info.parameters, stat.st_size,
                                             info.base.model_dump(), info.base_sha256)  # fmt: skip
                except ImagerError as exc:
                    found = str(exc).removeprefix(f"{path}: ")
                self._read[key] = found
        if isinstance(found, str):
            raise ConfigError(f"{what}: {name}: {found}")
        return replace(found, name=name)

    def load(self, control: AvailableControl, base: Any, what: str = "controlnet") -> tuple[Any, str]:
        """(the control network on ``base``'s device, its file's SHA-256), loaded once per file
        version and base model; a ConfigError naming ``what`` and the control for another base."""
        from imager.errors import CheckpointError
        from imager.inference.metadata import file_sha256
        from imager.models.control import load_control

        stat = control.path.stat()
        key = (control.path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            nets = self._nets.setdefault(base, OrderedDict())
            if key in nets:
                nets.move_to_end(key)
                return nets[key]
        try:
            loaded = (load_control(control.path, base), file_sha256(control.path))
        except CheckpointError as exc:
            raise ConfigError(f"{what}: {control.name}: {str(exc).removeprefix(f'{control.path}: ')}") from None
        with self._lock:
            nets[key] = loaded
            while len(nets) > NETS_PER_BASE:
                nets.popitem(last=False)
        return loaded

    def _roots(self) -> list[tuple[Path, Path]]:
        """(folder, its resolved path) of each folder that exists."""
        out = []
        for folder in self.folders:
            try:
                root = folder.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if root.is_dir():
                out.append((folder, root))
        return out


def _marked(path: Path) -> bool:
    """Whether a safetensors file's header says it is a control file (True for a file whose header
    cannot be read: :func:`~imager.models.control.read_control` then says why)."""
    from safetensors import safe_open

    from imager.models.control import METADATA_KEY, MODEL_KIND

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY, "{}")
        meta = json.loads(raw)
    except Exception:  # noqa: BLE001 (safetensors raises several types for a foreign file)
        return True
    return isinstance(meta, dict) and meta.get("imager_model") == MODEL_KIND
