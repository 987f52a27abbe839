"""The app's history: every image it made, a PNG with its parameters in one folder.

Names are ``YYYYmmdd-HHMMSS-<job>-<i>.png``; :meth:`History.path` resolves a name only inside the
folder (one plain file name of letters, digits, ``.``, ``_``, ``-``, ending in ``.png``), so a
request cannot reach any other file.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imager.errors import ConfigError
from imager.inference.metadata import read_params, save_png

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png$")


class NotFoundError(ConfigError):
    """A job, image or model the server does not have (HTTP 404)."""


@dataclass
class Entry:
    name: str
    path: Path
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "url": f"/api/v1/history/{self.name}", "params": self.params}


class History:
    """The history folder (created on first use)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._params: dict[str, tuple[float, dict[str, Any]]] = {}  # name -> (mtime, params): listing reads each file once

    def save(self, pixels: np.ndarray, params: dict[str, Any], *, job: str, index: int) -> Entry:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{job}-{index}.png"
        path = save_png(self.folder / name, pixels, params)
        return Entry(name, path, dict(params))

    def path(self, name: str) -> Path:
        """The file of ``name`` in the folder; NotFoundError for anything else."""
        if not isinstance(name, str) or not NAME.match(name):
            raise NotFoundError(f"history: '{name}' is not an image name of the history")
        path = self.folder / name
        if path.resolve().parent != self.folder.resolve() or not path.is_file():
            raise NotFoundError(f"history: no image '{name}'")
        return path

    def params(self, name: str) -> dict[str, Any]:
        path = self.path(name)
        mtime = path.stat().st_mtime
        cached = self._params.get(name)
        if cached is None or cached[0] != mtime:
            try:
                params = read_params(path, f"history: {name}")
            except ConfigError:
                params = {}
            self._params[name] = cached = (mtime, params)
        return dict(cached[1])

    def entries(self, limit: int = 100) -> list[Entry]:
        """The newest ``limit`` images first."""
        if not self.folder.is_dir():
            return []
        files = [p for p in self.folder.iterdir() if NAME.match(p.name) and p.is_file() and not p.is_symlink()]
        files.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
        return [Entry(p.name, p, self.params(p.name)) for p in files[:limit]]
