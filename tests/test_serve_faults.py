"""No request lost: a replica killed with requests in flight, and a graceful shutdown.

Two replicas (eager engine) of the model test_serve.py serves, on their own local Ray
instance (127.0.0.1). Requests of several lengths are in flight on both replicas when one
replica actor is ray.kill'ed: every request still gets its right answer (the HTTP front sends
the killed replica's requests again to the other one; at least one is seen to need a second
attempt), none fails. Then drain: requests in flight finish (200) while a new one gets 503
with Retry-After. Cost: about 1.5-3 minutes on 2 cores (two replicas compile their graphs).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest

from vskip_compile.serve import use_loopback

use_loopback()

from test_serve import (LIMITS, MAX_TOKENS, PLAN, _chat, _check_answer, _data_url, _free_port, _post,  # noqa: E402
                        _Reference, model_dir, samples)  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_replicas(model_dir):  # noqa: F811 - the fixture imported above
    pytest.importorskip("ray.serve")
    from vskip_compile.serve.app import ServeOptions, init_local_ray, start, stop

    try:
        init_local_ray(num_cpus=2, attempts=2, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - see test_serve.service: the machine, not this code
        pytest.skip(f"a local Ray instance did not start here: {type(e).__name__}: {e}")
    options = ServeOptions(model_dir=str(model_dir), plan=PLAN.to_dict(), engine="eager", replicas=2, replica_cpus=1,
                           max_batch_size=2, batch_wait_s=0.2, retry_s=300, drain_s=300, limits=LIMITS)
    try:
        yield start(options, host="127.0.0.1", port=_free_port())
    finally:
        stop()


def _send(url: str, bodies: list[dict], results: dict, offset: int = 0) -> list[threading.Thread]:
    def send(i, body):
        results[offset + i] = _post(url, body, timeout=600)

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    return threads


def test_a_killed_replica_loses_no_request(two_replicas, model_dir, samples):  # noqa: F811
    from vskip_compile.serve.app import kill_replica, replica_actors

    reference = _Reference(model_dir)
    want = reference(samples)
    order = [i % len(samples) for i in range(12)]
    results: dict = {}
    threads = _send(two_replicas, [_chat(_data_url(samples[i][0]), samples[i][1]) for i in order], results)
    time.sleep(4)  # both replicas hold requests (their first batches compile for seconds)
    victim = replica_actors()[0]
    kill_replica(victim)
    for t in threads:
        t.join(timeout=900)
    for k, i in enumerate(order):
        _check_answer(*results[k], want[i])
    attempts = [results[k][1]["usage"]["vskip"]["attempts"] for k in range(len(order))]
    assert max(attempts) >= 2, attempts  # the killed replica's requests were sent again
    assert victim not in replica_actors()


def test_drain_answers_requests_in_flight_and_refuses_new_ones(two_replicas, samples):  # noqa: F811
    from vskip_compile.serve.app import drain

    results: dict = {}
    bodies = [_chat(_data_url(p), q, max_tokens=MAX_TOKENS) for p, q in samples]
    threads = _send(two_replicas, bodies, results)
    time.sleep(0.5)
    left: list = []
    drainer = threading.Thread(target=lambda: left.append(drain(300)))
    drainer.start()
    time.sleep(0.5)
    req = urllib.request.Request(two_replicas + "/v1/chat/completions", data=_json(bodies[0]),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)  # noqa: S310 - loopback only
    assert e.value.code == 503 and int(e.value.headers["Retry-After"]) >= 1
    for t in threads + [drainer]:
        t.join(timeout=900)
    assert [results[i][0] for i in range(len(bodies))] == [200] * len(bodies), results
    assert left == [0]


def _json(body: dict) -> bytes:
    import json

    return json.dumps(body).encode()
