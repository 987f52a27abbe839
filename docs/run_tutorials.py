"""Run the tutorials on the trained pipeline and put the pictures they draw into
docs/images/tutorials/: the pictures of the documentation come from runs, not by hand.

    python docs/run_tutorials.py            # after `make repro`, from the project root

Each tutorial that draws pictures runs in a temporary folder that links the project's params.yaml
and data/ (its bash blocks through bash, its python blocks in one namespace, in order). The test
suite runs the same blocks on a tiny random cascade (tests/stages/test_tutorials.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(<!-- not tested -->\s*\n)?```(\w+)\n(.*?)\n```", re.S)
DRAWN = "tutorial-images"  # where the tutorials save their pictures, relative to the working folder


def run(page: Path, folder: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {"__name__": "__tutorial__"}
    before = Path.cwd()
    os.chdir(folder)
    try:
        for i, (skip, lang, code) in enumerate(FENCE.findall(page.read_text(encoding="utf-8")), start=1):
            if skip or lang not in ("bash", "python"):
                continue
            if lang == "bash":
                subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, check=True)
            else:
                exec(compile(code, f"{page.name}, block {i}", "exec"), namespace)  # noqa: S102 - the tutorial's own code
    finally:
        os.chdir(before)


def main() -> None:
    target = ROOT / "docs" / "images" / "tutorials"
    target.mkdir(parents=True, exist_ok=True)
    for page in sorted((ROOT / "docs" / "tutorials").glob("*.md")):
        if DRAWN not in page.read_text(encoding="utf-8"):
            continue
        with tempfile.TemporaryDirectory(prefix="imager-tutorial-") as tmp:
            folder = Path(tmp)
            for name in ("params.yaml", "data"):
                (folder / name).symlink_to(ROOT / name)
            run(page, folder)
            for picture in sorted((folder / DRAWN).glob("*.png")):
                shutil.copy(picture, target / picture.name)
                print(f"{page.name}: {target / picture.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
