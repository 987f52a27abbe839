"""The MLflow screenshots of docs/tutorials/experiments.md, from a run:

    python docs/mlflow_screenshots.py                      # the project's ./mlflow.db
    python docs/mlflow_screenshots.py --store other/mlflow.db --out some/folder

The store is copied to a temporary folder first and the MLflow server reads the copy, so the
project's own store is never opened (`mlflow server` may migrate or write to what it serves).
The server runs on a free loopback port; Debian's headless Chromium (/usr/bin/chromium, through
playwright) opens the tracking experiment's `evaluate` runs and saves runs.png (the runs with their
experiment and metrics) and compare.png (MLflow's comparison of the same runs) into
docs/images/mlflow/. It needs the evaluate runs of a `dvc repro` and of one or more `dvc exp run`s
(docs/tutorials/experiments.md makes them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.ui import free_port, served  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STAGE = "tags.`imager.stage` = 'evaluate'"
METRICS = ("fid_evaluator", "r_precision_evaluator", "clip_score_evaluator")
MAX_RUNS = 6  # the evaluate runs compared, one per DVC experiment


def evaluate_runs(store: Path) -> tuple[str, list[str], int]:
    """The tracking experiment's id, the ids of the newest evaluate run of each DVC experiment (of
    the plain `dvc repro` too), newest first, and the number of evaluate runs."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    newest: dict[str, mlflow.entities.Run] = {}
    found = client.search_runs(experiments, STAGE, order_by=["attributes.start_time DESC"], max_results=1000)
    for run in found:
        newest.setdefault(run.data.tags.get("imager.dvc_exp_name", ""), run)
    if not newest:
        raise SystemExit(f"{store}: no evaluate runs; run the pipeline (dvc repro) and an experiment (dvc exp run) first")
    runs = list(newest.values())[:MAX_RUNS]
    return runs[0].info.experiment_id, [run.info.run_id for run in runs], len(found)


@contextlib.contextmanager
def mlflow_server(store: Path) -> Iterator[str]:
    """`mlflow server` on the store (a copy: it may write), on a free loopback port; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--default-artifact-root", str(store.parent / "artifacts")]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with served(cmd, store.parent, f"{url}/health", store.parent / "server.log", timeout=120):
        yield url


def shoot(url: str, experiment: str, runs: list[str], listed: int, out: Path) -> list[Path]:
    """runs.png: the experiment's evaluate runs (`listed` of them) with the sampler and the main
    metrics as columns; compare.png: MLflow's comparison of `runs`, the params and metrics that differ."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = [out / "runs.png", out / "compare.png"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 300 + 32 * min(listed, 20)})
        page.set_default_timeout(90_000)
        page.goto(f"{url}/#/experiments/{experiment}/runs?searchFilter={quote(STAGE)}")
        page.get_by_role("link", name=re.compile(r"^evaluate")).first.wait_for()  # the runs are listed
        assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
        if assistant.is_visible():  # MLflow 3's side panel, open by default
            assistant.click()
        page.get_by_role("button", name="Columns").click()
        for name in ("Dataset", "Source", "Models", "sampler", *METRICS):  # off, then on
            page.get_by_text(name, exact=True).last.click()
        page.keyboard.press("Escape")
        page.get_by_text("r_precision_evaluator").first.wait_for()
        page.screenshot(path=str(shots[0]))

        page.set_viewport_size({"width": 1500, "height": 1000})
        page.goto(f"{url}/#/compare-runs?runs={quote(json.dumps(runs))}&experiments={quote(json.dumps([experiment]))}")
        page.get_by_text("Run details").wait_for()
        for switch in page.get_by_role("switch").all():  # "Show diff only" of the params, metrics and tags
            switch.click()
        page.get_by_text("Run details").evaluate("e => e.scrollIntoView({block: 'start'})")  # past the plots
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots[1]))
        browser.close()
    return shots


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=REPO / "mlflow.db", help="the MLflow store (an sqlite file); read only")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "mlflow", help="folder of runs.png and compare.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imager-mlflow-") as tmp:
        store = Path(tmp) / "mlflow.db"
        shutil.copy(args.store, store)
        experiment, runs, listed = evaluate_runs(store)
        with mlflow_server(store) as url:
            shots = shoot(url, experiment, runs, listed, args.out)
    for shot in shots:
        print(shot)
    return shots


if __name__ == "__main__":
    main()
