"""Scale-out on a real local Ray cluster of two nodes (`ray start --head` and a second `ray start --address`, both on
127.0.0.1, one CPU each), started and stopped here: `qwen2vl batch --ray` writes what the local job writes, also when
killed and resumed, and `qwen2vl serve --ray --replicas 2` answers the openai client from both replicas."""

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests import test_batch
from tests.test_batch import batch, comparable, kill_after, rows

uninterrupted = test_batch.uninterrupted  # a fixture this module's tests use too

pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'qwen2vl[ray]'); .ci/run installs it")
RAY = str(Path(sys.executable).with_name("ray"))
# Ray 2.59+ authenticates with a token on local clusters: one given to every process here, so that nodes and drivers
# agree whatever ~/.ray/auth_token holds from other runs.
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    start = lambda *args: subprocess.run([RAY, "start", *args, *common], env=ENV, capture_output=True, text=True)
    head = start("--head", f"--port={port}", "--include-dashboard=false")
    assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
    try:
        worker = start(f"--address={address}")
        assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
        deadline = time.monotonic() + 120
        while True:  # the second node registers shortly after its `ray start` returns
            status = subprocess.run([RAY, "status", f"--address={address}"], env=ENV, capture_output=True, text=True)
            if status.stdout.count(" node_") == 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status.stdout.count(" node_") == 2, status.stdout
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True)


def test_batch_on_ray_equals_the_local_job(cluster, uninterrupted, checkpoint, assets, tmp_path):
    d, _ = uninterrupted
    p = batch(checkpoint, assets, d / "in.jsonl", tmp_path / "out.jsonl", ray=cluster, env=ENV)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    assert sorted(map(comparable, rows(tmp_path / "out.jsonl"))) == sorted(map(comparable, rows(d / "out.jsonl")))


def test_batch_on_ray_resumes_after_a_kill(cluster, uninterrupted, checkpoint, assets, tmp_path):
    d, _ = uninterrupted
    target = tmp_path / "out.jsonl"
    written = kill_after(batch(checkpoint, assets, d / "in.jsonl", target, ray=cluster, env=ENV,
                               start_new_session=True), target, 5)
    p = batch(checkpoint, assets, d / "in.jsonl", target, ray=cluster, env=ENV)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    final = rows(target)
    assert final[:len(written)] == written
    assert sorted(map(comparable, final)) == sorted(map(comparable, rows(d / "out.jsonl")))


def test_serve_on_ray_answers_from_both_replicas(cluster, checkpoint, tmp_path):
    from openai import OpenAI

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # a file, not a pipe nobody reads: Ray Serve logs a lot
    server = subprocess.Popen([sys.executable, "-m", "qwen2vl.cli", "serve", "--model", str(checkpoint),
                               "--served-model-name", "tiny", "--ray", cluster, "--replicas", "2", "--port",
                               str(port)], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + 300, None
        while health is None and time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    health = r.headers["X-Qwen2VL-Replica"]
            except OSError:
                time.sleep(0.5)
        assert health
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        replicas, texts = [], []

        def ask(i):
            r = client.chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=8, temperature=0)
            replicas.append(r.headers["X-Qwen2VL-Replica"])
            texts.append((i, r.parse().choices[0].message.content))

        # Ray Serve routes to the less busy replica, so concurrent requests reach both once its proxy knows of both;
        # rounds go on until they have (the proxy can learn of the second replica a little after the first answers).
        deadline = time.monotonic() + 180
        while len(set(replicas)) < 2 and time.monotonic() < deadline:
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert len(set(replicas)) == 2, replicas
        answers = dict(texts)
        assert all(answers[i] for i in range(6))
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Question 0"}],
                                                max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answers[0]
    finally:
        server.terminate()
        server.wait(60)
        log.close()
