"""The LoRA adapters the app offers: the ``.safetensors`` adapter files of the server's folders
(``imager ui --lora-dir DIR``, ``data/finetune`` by default).

A request names an adapter by its path relative to a folder (``pixel-art.safetensors``,
``run1/adapter.safetensors``: the listing's name, links resolved) or by its full path; :meth:`AdapterLibrary.resolve` accepts only a
file that is inside a folder once every symlink and ``..`` is resolved, so a request cannot make the
server read any other file, and its error does not say whether such a file exists.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from imager.errors import ConfigError, ImagerError

log = logging.getLogger("imager")
SUFFIX = ".safetensors"
MAX_LISTED = 500  # files looked at per listing: a folder of checkpoints must not stall the server


@dataclass(frozen=True)
class Available:
    """One adapter file of the folders, as the listing shows it."""

    name: str  # what a request names it by: its path in its folder, links resolved
    path: Path  # the resolved file
    stage: str
    rank: int
    size: int
    base_sha256: str

    def describe(self, fits: bool | None) -> dict[str, Any]:
        """``fits``: trained on the model's weights (None: the model is not loaded yet, so unknown)."""
        return {"name": self.name, "stage": self.stage, "rank": self.rank, "scale": 1.0, "size": self.size,
                "base_sha256": self.base_sha256[:12], "fits": fits}  # fmt: skip


class AdapterLibrary:
    """The adapter folders; each file is read once per change (its size and mtime), not per listing."""

    def __init__(self, folders: Sequence[str | Path] = ()):
        self.folders = [Path(f) for f in folders]
        self._read: dict[tuple[Path, int, int], Available | str] = {}  # an adapter, or why the file is not one
        self._lock = threading.Lock()

    def list(self) -> list[Available]:
        """The adapters of every folder, by name (a name in an earlier folder hides a later one's);
        files that are not Imager adapters (a model, an optimizer state) are left out."""
        out: dict[str, Available] = {}
        for folder, root in self._roots():
            for path in sorted(islice(folder.rglob(f"*{SUFFIX}"), MAX_LISTED)):
                real = _inside(path, root)
                name = None if real is None else real.relative_to(root).as_posix()
                if name is None or name in out:
                    continue
                found = self._describe(name, real)
                if found is not None:
                    out[name] = found
        return list(out.values())

    def resolve(self, name: str, what: str = "lora") -> tuple[str, Path]:
        """(its name in the listing, the resolved file) of an adapter a request names; a ConfigError
        naming ``what`` for anything outside the folders."""
        if not self.folders:
            raise ConfigError(f"{what}: this server offers no LoRA adapters (start it with --lora-dir DIR)")
        given = Path(name)
        for folder, root in self._roots():
            real = _inside(given if given.is_absolute() else folder / given, root)
            if real is not None and real.suffix == SUFFIX and real.is_file():
                return real.relative_to(root).as_posix(), real
        raise ConfigError(f"{what}: no adapter '{name}' in the server's adapter folders; GET /api/v1/adapters lists them")

    def describe(self, name: str, path: Path) -> Available:
        """The adapter at a resolved ``path``; a ConfigError naming it for a file that is not one."""
        from imager.models.lora import read_adapter

        try:
            stat = path.stat()
        except OSError:
            raise ConfigError(f"lora: {name}: cannot be read") from None
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            found = self._read.get(key)
            if found is None:
                if len(self._read) > 4 * MAX_LISTED:  # files replaced many times: forget the old versions
                    self._read.clear()
                try:
                    if not _marked(path):  # a model of the same folder: refused on its header, not read whole
                        raise ConfigError("not an Imager LoRA adapter (no imager_adapter metadata)")
                    adapter = read_adapter(path)
                    found = Available(name, path, adapter.stage, adapter.settings.rank, stat.st_size, adapter.base_sha256)
                except ImagerError as exc:
                    found = str(exc).removeprefix(f"{path}: ")
                self._read[key] = found
        if isinstance(found, str):
            raise ConfigError(f"lora: {name}: {found}")
        return replace(found, name=name)

    def _describe(self, name: str, path: Path) -> Available | None:
        try:
            return self.describe(name, path)
        except ConfigError as exc:
            log.debug("not listed: %s", exc)
            return None

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


def _inside(path: Path, root: Path) -> Path | None:
    """``path`` resolved (symlinks and ``..`` followed), if that is inside ``root``; else None."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a loop of links, a NUL byte in the name
        return None
    return real if real.is_relative_to(root) and real != root else None


def _marked(path: Path) -> bool:
    """Whether a safetensors file's header says it is an adapter (True for a file whose header
    cannot be read: :func:`~imager.models.lora.read_adapter` then says why)."""
    from safetensors import safe_open

    from imager.models.lora import ADAPTER_KIND, METADATA_KEY

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY, "{}")
        meta = json.loads(raw)
    except Exception:  # noqa: BLE001 (safetensors raises several types for a foreign file)
        return True
    return isinstance(meta, dict) and meta.get("imager_adapter") == ADAPTER_KIND
