"""`imager ui`: its options checked before anything is served, one line each; what it serves."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from stages.app import app
from tests.conftest import tiny_params

runner = CliRunner()


@pytest.fixture
def served(monkeypatch):
    """Run `imager ui` up to the server: the app and the address it would be served on."""
    calls = {}
    monkeypatch.setattr("imager.app.server.serve", lambda app, **kw: calls.update(app=app, **kw))
    monkeypatch.setattr("imager.app.engine.Engine.start", lambda self, preload=False: calls.update(preload=preload))
    return calls


def ui(tmp_path, write_params, *args):
    params = write_params(tiny_params())
    return runner.invoke(app, ["ui", "--params", str(params), "--no-mlflow", "--history", str(tmp_path / "history"), *map(str, args)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auth", "alice"], "error: --auth: expected USER:PASSWORD"),
        (["--auth", ":pw"], "error: --auth: expected USER:PASSWORD"),
        (["--token", "short"], "error: --token: use at least 8 characters"),
        (["--base", "nowhere.safetensors"], "error: --base: no model file nowhere.safetensors"),
        (["--device", "tpu"], "error: --device: unknown device 'tpu'"),
    ],
)
def test_bad_options_fail_in_one_line(tmp_path, write_params, served, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = ui(tmp_path, write_params, *args)
    assert result.exit_code == 1 and result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.strip().startswith(message), result.output
    assert "app" not in served


def test_without_any_model_it_says_how_to_get_one(tmp_path, write_params, served, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ui(tmp_path, write_params)
    assert result.exit_code == 1 and "error: no model to serve: train one with `dvc repro`" in result.output


def test_serves_the_given_models_on_loopback_and_warns_when_exposed(tmp_path, write_params, served, model_files, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    base, sr = model_files
    result = ui(tmp_path, write_params, "--base", base, "--sr", sr, "--api-only")
    assert result.exit_code == 0, result.output
    assert served["host"] == "127.0.0.1" and served["port"] == 7860 and served["preload"] is True
    engine = served["app"].state.engine
    assert [s.base for s in engine.models.list()] == [base]
    assert "/api/v1/generate" in served["app"].openapi()["paths"]
    with caplog.at_level(logging.WARNING, logger="imager"):
        result = ui(tmp_path, write_params, "--base", base, "--sr", sr, "--api-only", "--host", "0.0.0.0", "--port", "9000")
    assert result.exit_code == 0 and served["host"] == "0.0.0.0" and served["port"] == 9000
    assert "anyone who can reach this machine can use the app; protect it with --auth" in caplog.text
