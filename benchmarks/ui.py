"""Comparison: what a user of ``imager ui`` waits, against the inference path it wraps.

The server is the real one, ``imager ui`` in its own process (the page, the API, the queue; model
files of the workspace, params.yaml's sampling settings), driven over HTTP by this process the
way a script or the page drives it: ``POST /api/v1/generate`` then the job's server-sent events.
The baseline is the same request through the library in this process, with nothing around it:
:func:`~imager.inference.cascade.encode_prompts`, :meth:`Cascade.generate` (its ``on_denoise``
marks the first x̂0 and the start of the SR stage) and the PNG written, as ``imager generate``
does. The two alternate round by round, the same prompt and seed in each round.

- first preview: click to the first x̂0 on the client (server: the first event with a preview;
  baseline: the first denoiser call returning);
- base image: click to the end of the base stage (the first SR step);
- final image: click to the 64 px PNG on the client (server: the image fetched);
- throughput: requests per minute with ``clients`` concurrent clients, each sending its requests
  one after another, vs the same number of images made one after another by the library;
- memory: the server's resident set with one model loaded, after the runs, vs a process that
  loads the same cascade and encoder and makes one image (``imager generate``'s footprint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import median
from benchmarks.report import Comparison

log = logging.getLogger(__name__)
PROMPTS = ("red apple", "smiling face with sunglasses", "blue car", "green tree", "yellow star", "grinning cat")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(cmd: list[str], cwd: Path, health: str, log_path: Path, timeout: float):
    """A server started by ``cmd``, once ``health`` answers 200 within ``timeout`` s; yields its
    process and stops it on exit. Its output goes to ``log_path``: a pipe nobody reads would stall
    the server once full, and the log's tail is the error when it exits early."""
    import httpx

    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[2]} exited: {log_path.read_text(encoding='utf-8')[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(health, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[2]} did not answer within {timeout:.0f} s")
                time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def ui_server(base: Path, sr: Path, params: Path, history: Path):
    """``imager ui`` in a subprocess on a free loopback port; yields (url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "stages.app", "ui", "--port", str(port), "--no-mlflow", "--history", str(history),
           "--params", str(params), "--base", str(base), "--sr", str(sr), "--device", "cpu"]  # fmt: skip
    history.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with served(cmd, REPO, f"{url}/api/v1/health", history.parent / "server.log", timeout=300) as proc:
        yield url, proc


def server_request(client, prompt: str, seed: int) -> dict[str, float]:
    """Seconds from the POST to the first preview, the SR stage and the fetched PNG, through an
    open ``httpx.Client`` (a page or a script keeps its connection)."""
    marks: dict[str, float] = {}
    start = time.perf_counter()
    job = client.post("/api/v1/generate", json={"prompt": prompt, "seed": seed}).json()
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events") as events:
        for line in events.iter_lines():
            if not line.startswith("data: "):
                continue
            state = json.loads(line[6:])
            now = time.perf_counter() - start
            if state["preview_count"] >= 1:
                marks.setdefault("first_preview", now)
            if state["progress"]["stage"] in ("sr", "saving", "done"):
                marks.setdefault("base_image", now)
    if state["state"] != "done":
        raise RuntimeError(f"the server's job ended {state['state']}: {state.get('error')}")
    client.get(state["images"][0]["url"]).raise_for_status()
    marks["final_image"] = time.perf_counter() - start
    return marks


class Direct:
    """The baseline: the library in this process, as ``imager generate`` calls it."""

    def __init__(self, base: Path, sr: Path, p: Any, out: Path):
        from imager.inference import Cascade
        from imager.text import load_text_encoder

        self.cascade = Cascade.load(base, sr, device="cpu")
        self.encoder = load_text_encoder(p.embed)
        self.sampling = p.evaluate.sampling(p.sampler)
        self.out = out
        out.mkdir(parents=True, exist_ok=True)

    def request(self, prompt: str, seed: int) -> dict[str, float]:
        from imager.inference.cascade import encode_negative, encode_prompts
        from imager.inference.images import to_hwc
        from imager.inference.metadata import save_png

        marks: dict[str, float] = {}
        start = time.perf_counter()

        def on_denoise(stage: str, x0) -> None:
            now = time.perf_counter() - start
            marks.setdefault("first_preview", now)
            if stage == "sr":
                marks.setdefault("base_image", now)

        cond, _ = encode_prompts(self.encoder, [prompt])
        negative = encode_negative(self.encoder, [""])
        cfg = self.sampling.model_copy(update={"seed": seed, "batch_size": 1})
        low, high = self.cascade.generate(cond, cfg, negative=negative, on_denoise=on_denoise)
        save_png(self.out / f"{seed}.png", to_hwc(high if high is not None else low).numpy()[0], {"prompt": prompt, "seed": seed})
        marks["final_image"] = time.perf_counter() - start
        return marks


FOOTPRINT = """
import sys
from imager.config import load
from imager.inference import Cascade
from imager.inference.cascade import encode_negative, encode_prompts
from imager.text import load_text_encoder
p = load(sys.argv[1])
cascade = Cascade.load(sys.argv[2], sys.argv[3], device="cpu")
encoder = load_text_encoder(p.embed)
cascade.generate(encode_prompts(encoder, ["red apple"])[0], p.evaluate.sampling(p.sampler).model_copy(update={"batch_size": 1}),
                 negative=encode_negative(encoder, [""]))
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS:")][0])
"""


def bench_ui(base: Path, sr: Path, params_path: Path, *, repeats: int, warmup: int, clients: int, per_client: int, tmp: Path) -> list[Comparison]:
    """The five rows of the comparison (see the module's docstring)."""
    import httpx
    from tqdm.auto import tqdm

    from imager.config import load

    p = load(params_path)
    direct = Direct(base, sr, p, tmp / "direct")
    times: dict[str, dict[str, list[float]]] = {"server": {}, "direct": {}}
    with ui_server(base, sr, params_path, tmp / "history") as (url, proc), httpx.Client(base_url=url, timeout=600) as page:
        for round_ in tqdm(range(warmup + repeats), desc="ui latency", unit="round", leave=False):
            prompt, seed = PROMPTS[round_ % len(PROMPTS)], 1000 + round_
            for side in ("server", "direct"):
                marks = server_request(page, prompt, seed) if side == "server" else direct.request(prompt, seed)
                if round_ >= warmup:
                    for key, value in marks.items():
                        times[side].setdefault(key, []).append(value)
        total = clients * per_client
        done: list[float] = []

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as own:
                for k in range(per_client):
                    server_request(own, PROMPTS[(i + k) % len(PROMPTS)], 2000 + i * per_client + k)
                    done.append(time.perf_counter())

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        server_per_min = 60 * len(done) / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(total):
            direct.request(PROMPTS[i % len(PROMPTS)], 3000 + i)
        direct_per_min = 60 * total / (time.perf_counter() - start)
        server_mib = _rss_mib(proc.pid)
    out = subprocess.run([sys.executable, "-c", FOOTPRINT, str(params_path), str(base), str(sr)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"the footprint process failed: {out.stderr[-2000:]}")
    generate_mib = int(out.stdout.strip().splitlines()[-1]) / 1024
    sampling = direct.sampling
    setting = f"{sampling.sampler}, {sampling.base.steps}+{sampling.sr.steps} steps"
    med = {side: {k: median(v) for k, v in marks.items()} for side, marks in times.items()}
    details = {"seconds": times, "median_seconds": med, "rounds": repeats, "warmup": warmup, "sampling": setting}
    rows = [
        Comparison("ui_first_preview", "Web app: click to first preview", "s", "imager ui (HTTP + events)", med["server"]["first_preview"],
                   "library call (first x̂0)", med["direct"]["first_preview"], details=details),
        Comparison("ui_base_image", f"Web app: click to the base image ({setting})", "s", "imager ui", med["server"]["base_image"],
                   "library call", med["direct"]["base_image"]),
        Comparison("ui_final_image", "Web app: click to the 64 px image", "s", "imager ui (PNG fetched)", med["server"]["final_image"],
                   "library call (PNG written)", med["direct"]["final_image"]),
        Comparison("ui_throughput", f"Web app: requests per minute, {clients} concurrent clients", "requests/min", f"imager ui, {total} requests",
                   server_per_min, "library, one after another", direct_per_min, details={"clients": clients, "requests": total}),
        Comparison("ui_memory", "Web app: server memory with one model loaded", "MiB", "imager ui (resident set)", server_mib,
                   "imager generate's process", generate_mib),
    ]  # fmt: skip
    return rows
