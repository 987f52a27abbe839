"""The sketch control in a real headless Chromium: with a control folder served, the page shows the
control section, a stroke drawn with the mouse on its canvas reaches the engine as the request's
sketch (dark where it was drawn, white elsewhere) with the selected control and its settings, and
the image is made with it; an uploaded sketch goes the same way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imager.app.controls import ControlLibrary
from imager.app.engine import Engine
from imager.app.history import History
from imager.app.models import ModelRegistry, files_source
from tests.app.conftest import tiny_loader, write_models
from tests.app.test_control_app import ADAPTER, NET, make_control
from tests.browser.conftest import recording
from tests.browser.test_browser import decoded, finished, pytestmark, start  # noqa: F401  (the module's marks and skip)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The tiny cascade with a folder of two controls (the default: the ControlNet); it records what
    the page submitted."""
    folder = tmp_path_factory.mktemp("app_control")
    base, sr = write_models(folder / "models")
    make_control(base, folder / "control" / NET)
    make_control(base, folder / "control" / ADAPTER, "adapter", seed=5)
    registry = ModelRegistry([files_source(base, sr, label="tiny")], loader=tiny_loader)
    eng = recording(Engine(registry, History(folder / "history"), controls=ControlLibrary([folder / "control"], default="controlnet")))
    yield eng
    eng.close()


def open_control(page) -> None:
    page.click("#control_section button:has-text('Sketch control')")
    page.wait_for_selector("#control canvas")


def test_a_stroke_on_the_control_canvas_is_the_requests_sketch(page, engine, tmp_path):
    page.wait_for_selector("#control_section", state="attached")
    open_control(page)
    page.click("#controlnet input")
    page.click(f"li:has-text('{ADAPTER}')")  # the other control of the folder
    page.click("#control button[aria-label='Brush']")  # the empty canvas offers an upload or the brush
    box = page.locator("#control canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 60, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy, steps=16)
    page.mouse.up()
    page.fill("#prompt textarea", "a red apple")
    page.fill("#steps input[type=number]", "6")
    page.press("#steps input[type=number]", "Enter")
    page.screenshot(path=str(tmp_path / "drawn.png"), full_page=True)
    data, job = start(page, engine)
    finished(page, job)
    page.screenshot(path=str(tmp_path / "controlled.png"), full_page=True)
    assert (data["mode"], data["steps"], data["controlnet"]) == ("text", 6, ADAPTER)
    assert (data["control_scale"], data["control_start"], data["control_end"]) == (1, 0, 1)
    sketch = decoded(data["control"])
    dark = sketch.min(axis=-1) < 128 if sketch.ndim == 3 else sketch < 128
    rows, cols = np.nonzero(dark)
    h, w = dark.shape
    assert rows.size, "nothing drawn reached the request"
    assert abs(rows.mean() - h / 2) < h / 10 and abs(cols.mean() - w / 2) < w / 10  # a stroke across the middle
    assert cols.max() - cols.min() > 3 * (rows.max() - rows.min())  # horizontal
    assert not dark[: h // 4].any() and not dark[-h // 4 :].any()  # the paper stays white
    assert job.results and job.results[0].params["controls"][0]["control"] == ADAPTER
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1")


def test_an_uploaded_sketch_and_no_sketch(page, engine, tmp_path):
    page.wait_for_selector("#control_section", state="attached")
    page.fill("#prompt textarea", "a green pear")
    page.fill("#steps input[type=number]", "4")
    page.press("#steps input[type=number]", "Enter")
    data, job = start(page, engine)  # the canvas left empty: no control at all
    finished(page, job)
    assert "control" not in data and "controls" not in job.results[0].params
    open_control(page)
    canvas = np.full((64, 64), 255, np.uint8)
    canvas[8:56, 30:34] = 0  # a vertical bar
    source = tmp_path / "bar.png"
    Image.fromarray(canvas).save(source)
    with page.expect_file_chooser() as chooser:  # the canvas' own Upload button, as a user uploads
        page.click("#control button[aria-label='Upload']")
    chooser.value.set_files(str(source))
    page.wait_for_function("document.querySelector('#control button[aria-label=\"Upload\"]') === null")  # the image is in
    page.locator("#control").screenshot(path=str(tmp_path / "uploaded.png"))
    data, job = start(page, engine)
    finished(page, job)
    assert data["controlnet"] == NET  # the server's default
    sketch = decoded(data["control"])
    dark = sketch.min(axis=-1) < 128 if sketch.ndim == 3 else sketch < 128
    rows, cols = np.nonzero(dark)
    assert rows.size and rows.max() - rows.min() > 3 * (cols.max() - cols.min())  # vertical, as uploaded
    assert job.results[0].params["controls"][0]["control"] == NET
