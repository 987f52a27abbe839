"""The HTTP API through a real server on 127.0.0.1 (the tiny cascade behind it): a job's events,
cancel, several clients at once, one-line JSON errors, limits and credentials."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from imager.app.request import Limits
from imager.app.server import create_app
from tests.app.conftest import Server, job_ending_at_first_snapshot, make_engine, picture

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(model_files, tmp_path, one_thread):
    engine = make_engine(model_files, tmp_path, Limits(upload_bytes=100_000, steps=50))
    server = Server(create_app(engine, ui=False, token=TOKEN, auth=("alice", "s3cret")))
    with server as url, httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        yield client
    engine.close()


def events(client: httpx.Client, job_id: str, **params) -> list[tuple[str, dict]]:
    out = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", params=params) as stream:
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                out.append((kind, json.loads(line.removeprefix("data: "))))
    return out


def test_generate_follow_the_events_and_fetch_the_image(api):
    job = api.post("/api/v1/generate", json={"prompt": "red apple", "seed": 4, "steps": 5})
    assert job.status_code == 202 and job.json()["seed"] == 4
    seen = events(api, job.json()["id"], previews="true")
    kinds = [k for k, _ in seen]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}
    steps = [(s["progress"]["stage"], s["progress"]["step"]) for _, s in seen]
    assert ("base", 1) in steps or ("base", 2) in steps
    previews = [base64.b64decode(s["preview_png"]) for _, s in seen if "preview_png" in s]
    assert len(previews) >= 2 and len(set(previews)) >= 2  # the preview changes as sampling goes on
    final = seen[-1][1]
    assert final["progress"]["fraction"] == 1.0 and len(final["images"]) == 1
    png = api.get(final["images"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert api.get(f"/api/v1/jobs/{final['id']}/preview.png").status_code == 200
    # The image's parameters come back from its bytes, ready to send again.
    recalled = api.post("/api/v1/params", content=png.content).json()["request"]
    assert recalled["prompt"] == "red apple" and recalled["seed"] == 4 and recalled["steps"] == 5
    again = api.post("/api/v1/generate", params={"wait": "true"}, json=recalled).json()
    assert base64.b64decode(again["images"][0]["png_base64"]) != b""
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(again["images"][0]["png_base64"]))))
    b = np.asarray(Image.open(io.BytesIO(png.content)))
    assert np.array_equal(a, b)
    listed = api.get("/api/v1/history").json()["images"]
    assert {i["name"] for i in listed} >= {final["images"][0]["name"], again["images"][0]["name"]}


def test_cancel_stops_a_running_job(api):
    job = api.post("/api/v1/generate", json={"prompt": "red apple", "steps": 50, "num_images": 2}).json()
    with api.stream("GET", f"/api/v1/jobs/{job['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["progress"]["step"] >= 2:
                break
    stopped = api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert stopped.status_code == 200
    final = events(api, job["id"])[-1]
    assert final[0] == "cancelled" and final[1]["state"] == "cancelled" and final[1]["images"] == []
    assert api.get("/api/v1/history").json()["images"] == []


def test_several_clients_at_once_all_get_their_images(api):
    answers: dict[int, httpx.Response] = {}

    def client(i: int) -> None:
        with httpx.Client(base_url=str(api.base_url), headers=AUTH, timeout=300) as own:
            answers[i] = own.post("/api/v1/generate", params={"wait": "true"}, json={"prompt": f"emoji {i}", "seed": 100 + i, "steps": 3})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # A client that never reads its stream does not hold up the others.
    slow = httpx.Client(base_url=str(api.base_url), headers=AUTH, timeout=300)
    first = api.post("/api/v1/generate", json={"prompt": "slow reader", "steps": 3}).json()
    stalled = slow.stream("GET", f"/api/v1/jobs/{first['id']}/events", params={"previews": "true"})
    stalled.__enter__()
    for t in threads:
        t.join(300)
    stalled.__exit__(None, None, None)
    slow.close()
    assert sorted(answers) == list(range(6))
    for i, answer in answers.items():
        body = answer.json()
        assert answer.status_code == 200 and body["state"] == "done"
        assert body["images"][0]["params"]["prompt"] == f"emoji {i}" and body["images"][0]["params"]["seed"] == 100 + i
    assert len({a.json()["images"][0]["name"] for a in answers.values()}) == 6


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        ("post", "/api/v1/generate", {"json": {"prompt": ""}}, 422, "prompt: is empty"),
        ("post", "/api/v1/generate", {"json": {"prompt": "x", "steps": 51}}, 422, "steps: 51 is more than the limit of 50"),
        ("post", "/api/v1/generate", {"json": {"prompt": "x", "guidance": "lots"}}, 422, "guidance: Input should be a valid number"),
        ("post", "/api/v1/generate", {"json": ["red apple"]}, 422, "body: Input should be a valid dictionary"),
        ("post", "/api/v1/generate", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 422, "body: not valid JSON"),
        ("post", "/api/v1/generate", {"json": {"prompt": "x", "model": "m"}}, 404, "model: no model 'm'"),
        ("get", "/api/v1/jobs/nope", {}, 404, "job: no job 'nope'"),
        ("post", "/api/v1/jobs/nope/cancel", {}, 404, "job: no job 'nope'"),
        ("get", "/api/v1/history/..%2F..%2Fetc%2Fpasswd", {}, 404, None),
        ("get", "/api/v1/history/nothing.png", {}, 404, "history: no image 'nothing.png'"),
        ("post", "/api/v1/params", {"content": b"not a png"}, 422, "body: not a readable PNG"),
        ("post", "/api/v1/generate", {"json": {"prompt": "x", "image": "A" * 300_000}}, 413, "body: 0.3 MB, more than the limit of 0.3 MB"),
    ],
)
def test_errors_are_one_json_line_with_the_right_status(api, method, path, kwargs, status, message):
    answer = getattr(api, method)(path, **kwargs)
    assert answer.status_code == status
    if message is not None:
        assert answer.json()["error"].startswith(message)
        assert "\n" not in answer.json()["error"]


def test_an_upload_over_the_limit_is_refused_by_name(api):
    big = base64.b64encode(b"\x89PNG" + bytes(120_000)).decode()
    answer = api.post("/api/v1/generate", json={"prompt": "x", "image": big})
    assert answer.status_code == 422 and answer.json()["error"].startswith("image: 0.1 MB, more than the limit of 0.1 MB")
    small = base64.b64encode(picture()).decode()
    assert api.post("/api/v1/generate", json={"prompt": "x", "image": small, "strength": 0.5}).status_code == 202


def test_credentials(api):
    url = str(api.base_url)
    assert httpx.get(f"{url}/api/v1/health").status_code == 401
    assert httpx.get(f"{url}/api/v1/health").headers["www-authenticate"].startswith("Basic")
    assert httpx.get(f"{url}/api/v1/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/api/v1/health", auth=("alice", "wrong")).status_code == 401
    assert httpx.get(f"{url}/api/v1/health", auth=("alice", "s3cret")).json()["status"] == "ok"
    assert httpx.get(f"{url}/api/v1/health", headers=AUTH).json()["api"] == "v1"
    schema = httpx.get(f"{url}/api/v1/openapi.json", headers=AUTH).json()
    assert {"/api/v1/generate", "/api/v1/jobs/{id}/events", "/api/v1/jobs/{id}/cancel"} <= set(schema["paths"])


def test_the_events_end_with_the_final_state_when_the_job_ends_during_a_snapshot(model_files, tmp_path):
    engine = make_engine(model_files, tmp_path)
    job = job_ending_at_first_snapshot(engine)
    with Server(create_app(engine, ui=False)) as url, httpx.Client(base_url=url, timeout=60) as client:
        seen = events(client, job.id)
    assert [kind for kind, _ in seen] == ["progress", "done"]
    assert seen[0][1]["state"] == "queued" and seen[-1][1]["state"] == "done"
