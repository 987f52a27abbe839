"""A data stage joins the Ray cluster named by RAY_ADDRESS (a head started with `ray start`, as on a
real cluster), writes the same shards as one process, and leaves the cluster running."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_stage_joins_the_cluster_of_ray_address(data, tmp_path):
    from tests.stages.test_train import free_port

    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway local cluster; a real one shares its token
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        address, lines = None, []
        deadline = time.monotonic() + 120
        while address is None and time.monotonic() < deadline:
            line = head.stdout.readline()
            assert line or head.poll() is None, "".join(lines)
            lines.append(line)
            found = re.search(r"ray start --address='([^']+)'", line)
            address = found.group(1) if found else None
        assert address, "".join(lines)
        params = yaml.safe_load(Path(data["root"] / "params.yaml").read_text())
        params["shard"] |= {"distributor": "ray", "ray": {"unit": 7}}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
        args = ["--params", str(tmp_path / "p.yaml"), "--data", str(data["raw"]), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json")]
        result = subprocess.run([sys.executable, "-m", "stages", "shard", *args], env={**env, "RAY_ADDRESS": address},
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"ray: the cluster at {address} with 2 CPUs" in result.stderr
        assert tree(tmp_path / "out") == tree(data["shards"])
        assert head.poll() is None  # the stage left the cluster it joined running
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        # `ray start` records its cluster for later `ray.init()` calls on the machine; forget ours
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if address and current.is_file() and current.read_text().strip() == address:
            current.unlink()
