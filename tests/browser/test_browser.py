"""The web page in a real headless Chromium: generate with live previews, stop, inpaint with a mask
drawn with the mouse, parameters restored from a PNG, and the login the server asks for."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from tests.app.conftest import Server, picture
from tests.browser.conftest import CHROMIUM, DEFAULTS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:DeprecationWarning", "ignore:The copy keyword is deprecated:DeprecationWarning"),
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Chromium at /usr/bin/chromium: run `make browser` (as root: apt-get install chromium)"),
]

# Records every src the preview <img> takes and every progress line, whatever Gradio re-renders.
WATCH = """() => {
  window.__previews = []; window.__lines = [];
  const seen = () => {
    document.querySelectorAll('#preview img').forEach(i => { if (i.src && !window.__previews.includes(i.src)) window.__previews.push(i.src); });
    const line = document.querySelector('#progress .imager-line');
    if (line && !window.__lines.includes(line.textContent)) window.__lines.push(line.textContent);
  };
  new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


ZOOM = "Array.from(document.querySelectorAll('#editor *')).map(e => e.childElementCount ? '' : e.textContent.trim()).find(t => /^[0-9]+%$/.test(t))"


def start(page, engine, timeout: float = 30.0):
    """Click Generate; the job the page submitted."""
    before = len(engine.submitted)
    page.click("#generate")
    deadline = time.monotonic() + timeout
    while len(engine.submitted) == before:
        assert time.monotonic() < deadline, "the page submitted nothing"
        page.wait_for_timeout(50)
    return engine.submitted[-1]


def finished(page, job, state: str = "done") -> str:
    """Wait until the page shows ``job`` in ``state``; its progress line."""
    page.wait_for_selector(f'#progress [data-job="{job.id}"][data-state="{state}"]')
    return page.inner_text("#progress .imager-line")


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_generate_shows_live_previews_then_the_image_and_its_seed(page, engine, tmp_path):
    assert page.input_value("#steps input[type=number]") == str(DEFAULTS["steps"])  # the form starts from the defaults
    page.evaluate(WATCH)
    page.fill("#prompt textarea", "red apple")
    data, job = start(page, engine)
    page.wait_for_selector("#preview img")
    page.screenshot(path=str(tmp_path / "running.png"), full_page=True)
    line = finished(page, job)
    page.screenshot(path=str(tmp_path / "done.png"), full_page=True)
    assert (data["prompt"], data["mode"], data["steps"], data["preview_every"]) == ("red apple", "text", 30, 1) and "seed" not in data
    assert line == f"done: 1 image in {job.describe()['progress']['elapsed_s']:.1f} s, seed {job.request.seed}"
    previews = page.evaluate("window.__previews")
    assert len(previews) >= 2, previews  # the live x̂0 changed while it ran
    lines = page.evaluate("window.__lines")
    assert any(t.startswith("base: step ") and "/30 · image 1/1" in t for t in lines), lines
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1 && document.querySelector('#gallery img').naturalWidth > 0")
    assert page.input_value("#seed_used input, #seed_used textarea") == str(job.request.seed)
    page.click("text=Use this seed")  # the seed goes back into the form for the next run
    page.wait_for_function(f"document.querySelector('#seed input').value === '{job.request.seed}'")
    page.wait_for_function("document.querySelectorAll('#history img').length >= 1")  # the history was refreshed


def test_stop_ends_a_run_midway_and_saves_nothing(page, engine, tmp_path):
    submitted = len(engine.submitted)
    page.click("#generate")  # no prompt: the engine's one-line message, and nothing queued
    page.wait_for_selector(".toast-body.error:has-text(\"prompt: is empty; give a text such as 'red apple', or an image to edit\")")
    assert len(engine.submitted) == submitted
    page.fill("#prompt textarea", "slow pear")
    page.fill("#steps input[type=number]", "100")
    page.press("#steps input[type=number]", "Enter")
    data, job = start(page, engine)
    assert data["steps"] == 100
    page.wait_for_selector(f'#progress [data-job="{job.id}"][data-state="running"]')
    page.wait_for_selector("#preview img")
    page.click("#stop")
    line = finished(page, job, "cancelled")
    page.screenshot(path=str(tmp_path / "stopped.png"), full_page=True)
    assert line == "stopped: 0 of 1 image kept" and job.state == "cancelled"
    assert 0 < job.step < 100 and job.stage == "cancelled"
    assert not [e.name for e in engine.history.entries() if job.id in e.name]
    folder = engine.history.folder
    assert not [p.name for p in (folder.iterdir() if folder.is_dir() else []) if job.id in p.name]  # not even a temporary file


def test_inpaint_with_a_mask_drawn_with_the_mouse(page, engine, tmp_path):
    source = tmp_path / "photo.png"
    source.write_bytes(picture(5, 256))
    page.click("#mode label:has-text('Inpaint')")
    page.wait_for_selector("#editor input[type=file]", state="attached")
    # The upload takes a second or two to reach the canvas; a stroke before that paints on the
    # empty 800 px canvas instead. The editor's zoom changes when the image is fitted in.
    before = page.wait_for_function(f"() => {ZOOM}").json_value()  # the empty canvas, once the editor is up
    page.set_input_files("#editor input[type=file]", str(source))
    page.wait_for_function(f"() => {{ const z = {ZOOM}; return z && z !== {before!r}; }}")
    page.click("#editor button[aria-label='Brush']")
    box = page.locator("#editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 30, cy)
    page.mouse.down()
    page.mouse.move(cx + 30, cy, steps=12)
    page.mouse.up()
    page.screenshot(path=str(tmp_path / "mask.png"), full_page=True)
    page.fill("#prompt textarea", "a red apple in the middle")
    page.fill("#steps input[type=number]", "8")
    page.press("#steps input[type=number]", "Enter")
    data, job = start(page, engine)
    finished(page, job)
    page.screenshot(path=str(tmp_path / "inpainted.png"), full_page=True)
    assert (data["mode"], data["steps"]) == ("inpaint", 8) and job.results
    image, mask = decoded(data["image"]), decoded(data["mask"])
    assert np.array_equal(image, np.asarray(Image.open(source)))  # the upload itself, not the strokes over it
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
    rows, cols = np.nonzero(mask)
    assert (
        abs(rows.mean() - 128) < 20 and abs(cols.mean() - 128) < 20 and cols.max() - cols.min() > rows.max() - rows.min()
    )  # a horizontal stroke across the middle
    assert mask[:64].max() == 0 and mask[-64:].max() == 0
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1")


def test_a_dropped_png_restores_its_parameters(page, engine, tmp_path):
    job = engine.submit({"prompt": "green pear", "negative_prompt": "blurry", "seed": 1234, "steps": 7, "sampler": "ddim", "guidance": 4.5})
    while not job.finished_state:
        engine.wait(job, job.version, 5.0)
    page.set_input_files("#drop input[type=file]", str(job.results[0].path))
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'green pear'")
    page.screenshot(path=str(tmp_path / "restored.png"), full_page=True)
    assert page.input_value("#seed input") == "1234" and page.input_value("#negative_prompt textarea") == "blurry"
    assert page.input_value("#steps input[type=number]") == "7" and page.input_value("#guidance input[type=number]") == "4.5"
    plain = tmp_path / "holiday.png"
    plain.write_bytes(picture())
    page.set_input_files("#drop input[type=file]", str(plain))
    page.wait_for_selector("#restore_note:has-text('carries no Imager parameters')")
    assert page.input_value("#prompt textarea") == "green pear"  # the form is left as it was
    # the history: select an image, then "Use these parameters"
    page.fill("#prompt textarea", "something else")
    page.click("#history_refresh")
    page.wait_for_function("document.querySelectorAll('#history img').length >= 1")
    page.locator("#history img").first.click()
    page.wait_for_selector("#params :text('green pear')")
    page.click("#use_params")
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'green pear'")


def test_the_page_asks_for_the_servers_credentials(browser, engine, tmp_path):
    from imager.app.server import create_app

    with Server(create_app(engine, auth=("u", "p"), defaults=DEFAULTS | {"steps": 3})) as url:
        anonymous = browser.new_context()
        response = anonymous.request.get(f"{url}/ui/")
        assert response.status == 401 and response.headers["www-authenticate"].startswith("Basic")  # the browser's login box
        anonymous.close()
        context = browser.new_context(http_credentials={"username": "u", "password": "p"}, viewport={"width": 1300, "height": 1000})
        page = context.new_page()
        assert page.goto(f"{url}/ui/").status == 200
        page.fill("#prompt textarea", "blue plum")
        data, job = start(page, engine)
        finished(page, job)
        page.wait_for_function("document.querySelector('#gallery img')?.naturalWidth > 0")  # the image files need the login too
        page.screenshot(path=str(tmp_path / "login.png"), full_page=True)
        context.close()
