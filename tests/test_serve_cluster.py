"""Cluster mode for real: `vskip serve --address` on a two-node Ray cluster on loopback.

`ray start --head` and a second `ray start --address` (each --block, 1 CPU, node address
127.0.0.2, its own temp dir, no dashboard) are two Ray nodes on this machine; `vskip serve
--address` joins them with 2 replicas of 1 CPU each, so Ray places one replica on each node.
A request is answered, /health is seen from replicas on both nodes, then everything this test
started is stopped by its pid: `vskip serve` by SIGINT (it drains, deletes the application,
disconnects), the two `ray start --block` processes by SIGTERM (each stops the Ray processes
it started). Marked `cluster`; cost about 1-2 minutes on 2 cores (two nodes start, two
replicas load the model and compile their graphs).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from test_serve import (LIMITS, PLAN, _chat, _check_answer, _data_url, _free_port, _get, _post,  # noqa: F401
                        _Reference, model_dir, samples)

pytestmark = pytest.mark.cluster
# `ray start` through this interpreter: the nodes' workers (the replicas) then run this Python
# and import this checkout's vskip_compile, as the driver does.
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
NODE_IP = "127.0.0.2"


def _start(cmd: list[str], log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["RAY_AUTH_MODE"] = "disabled"  # no token to hand from the head to the other processes
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait(30)


def _wait_for(predicate, timeout: float, what: str, logs) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout} s; logs:\n" + "\n".join(_tail(p) for p in logs))


def _tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return f"--- {path}\n" + "".join(f.readlines()[-n:])


def test_vskip_serve_address_places_replicas_on_both_nodes(model_dir, samples, tmp_path):  # noqa: F811
    pytest.importorskip("ray.serve")
    plan_file = tmp_path / "plan.json"
    PLAN.save(plan_file)
    port, http = _free_port(), _free_port()
    # 127.0.0.2: a loopback address that Ray takes as given (it replaces 127.0.0.1 by the
    # machine's network address, which this test must not use); both nodes share it.
    address = f"{NODE_IP}:{port}"
    temp = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths live under it
    logs = [str(tmp_path / n) for n in ("head.log", "node.log", "serve.log")]
    common = ["--block", "--num-cpus", "1", "--node-ip-address", NODE_IP, "--temp-dir", temp,
              "--disable-usage-stats"]
    procs = []
    try:
        with open(logs[0], "w") as head_log, open(logs[1], "w") as node_log, open(logs[2], "w") as serve_log:
            procs.append(_start([*RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                                 *common], head_log))
            _wait_for(lambda: "Ray runtime started" in open(logs[0]).read(), 180, "the head node started", logs)
            procs.append(_start([*RAY, "start", "--address", address, *common], node_log))
            _wait_for(lambda: "Ray runtime started" in open(logs[1]).read(), 180, "the second node joined", logs)
            procs.append(_start([sys.executable, "-m", "vskip_compile", "serve", "--address", address,
                                 "--model", str(model_dir), "--plan", str(plan_file), "--engine", "eager",
                                 "--replicas", "2", "--replica-cpus", "1", "--max-batch-size", "2",
                                 "--max-tokens", str(LIMITS.max_tokens), "--host", NODE_IP, "--port", str(http)], serve_log))
            url = f"http://{NODE_IP}:{http}"  # Serve's proxy listens on its node's address
            _wait_for(lambda: "serving " in open(logs[2]).read() or procs[2].poll() is not None, 420,
                      "vskip serve was up", logs)
            assert procs[2].poll() is None, _tail(logs[2])

            path, question = samples[0]
            want = _Reference(model_dir)(samples[:1])[0]
            status, body = _post(url, _chat(_data_url(path), question), timeout=600)
            _check_answer(status, body, want)
            nodes, replicas = set(), set()
            for _ in range(40):  # the front picks a replica at random among the two
                health = _get(url, "/health")
                nodes.add(health["node"])
                replicas.add(health["replica"])
                if len(nodes) == 2:
                    break
            assert len(replicas) == 2 and len(nodes) == 2, (replicas, nodes)
    finally:  # what this test started, by pid: vskip serve first, then the two nodes
        if len(procs) == 3:
            _stop(procs[2], signal.SIGINT, 120)
        for proc in reversed(procs[:2]):
            _stop(proc, signal.SIGTERM, 60)
        shutil.rmtree(temp, ignore_errors=True)
