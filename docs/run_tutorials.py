"""Run the python blocks of the tutorials on the trained pipeline and put the pictures they draw
into docs/images/tutorials/: the pictures of the documentation come from runs, not by hand.

    python docs/run_tutorials.py            # after `make repro`, from the project root

The test suite runs the same blocks (and the bash ones) on a tiny random cascade
(tests/stages/test_tutorials.py)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(<!-- not tested -->\s*\n)?```(\w+)\n(.*?)\n```", re.S)
DRAWN = Path("tutorial-images")  # where the tutorials save their pictures, relative to the working folder


def main() -> None:
    target = ROOT / "docs" / "images" / "tutorials"
    target.mkdir(parents=True, exist_ok=True)
    for page in sorted((ROOT / "docs" / "tutorials").glob("*.md")):
        code = [c for skip, lang, c in FENCE.findall(page.read_text(encoding="utf-8")) if lang == "python" and not skip]
        if not any(str(DRAWN) in c for c in code):
            continue
        shutil.rmtree(DRAWN, ignore_errors=True)
        namespace: dict = {"__name__": "__tutorial__"}
        for i, block in enumerate(code, start=1):
            exec(compile(block, f"{page.name}, block {i}", "exec"), namespace)  # noqa: S102 - the tutorial's own code
        for picture in sorted(DRAWN.glob("*.png")):
            shutil.copy(picture, target / picture.name)
            print(f"{page.name}: {target / picture.name}", file=sys.stderr)
        shutil.rmtree(DRAWN)


if __name__ == "__main__":
    main()
