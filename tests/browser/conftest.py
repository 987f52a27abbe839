"""A real headless Chromium (Debian's, never a downloaded one) on the app served with the tiny engine.

One engine, server and browser for the module (each costs seconds on a small machine); each test
gets a fresh page. The engine records what the page submitted, so a test can check the request
the browser built and follow its job.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.conftest import Server, make_engine, write_models

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEFAULTS = {"sampler": "ddim", "steps": 30, "guidance": 3.0, "threshold": "none", "sr_steps": 3, "sr_guidance": 1.0}


def recording(eng):
    """``eng`` with ``eng.submitted``: the (request data, job) of every submit, in order."""
    eng.submitted = []
    submit = eng.submit

    def record(data):
        job = submit(data)
        eng.submitted.append((data, job))
        return job

    eng.submit = record
    return eng


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    eng = recording(make_engine(write_models(folder / "models"), folder))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def url(engine):
    from imager.app.server import create_app

    with Server(create_app(engine, ui=True, defaults=DEFAULTS)) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when == "call":
        item.call_failed = report.failed
    return report


@pytest.fixture
def page(browser, url, tmp_path, request):
    """The form, loaded. Tests save their own screenshots; a failed one also saves where it ended."""
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{url}/ui/")
    page.wait_for_selector("#prompt textarea")
    yield page
    if getattr(request.node, "call_failed", False):
        page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
    context.close()
