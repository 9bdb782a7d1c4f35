"""`qwen2vl batch` as a user runs it (the real command, in a subprocess) on the tiny random-weight checkpoint: bodies
equal to the server's for the same requests, error lines for lines that are not requests, and a job killed with
SIGKILL and run again ends with the file an uninterrupted run writes."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from qwen2vl import MediaPolicy, Qwen2VL
from tests.test_server import make_server

URL = "/v1/chat/completions"


def data_uri(assets, name: str, size: int) -> str:
    buf = io.BytesIO()
    Image.open(assets / "images" / name).convert("RGB").resize((size, size)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def requests(assets) -> list[str]:
    """20 input lines: 14 with images or text, a video, one bad image, two malformed lines, a duplicate custom_id,
    and one long answer (so that a kill lands mid-job)."""
    images = [data_uri(assets, name, 56 * (1 + i % 3)) for i, name in
              enumerate(["astronaut.png", "cat.png", "receipt.jpg", "chart-pew.png", "screenshot-webpage.png"])]
    line = lambda cid, body: json.dumps({"custom_id": cid, "method": "POST", "url": URL, "body": body})
    ask = lambda content, **kw: {"model": "tiny", "messages": [{"role": "user", "content": content}],
                                 "max_tokens": 6, "temperature": 0, **kw}
    out = []
    for i in range(14):
        content = [{"type": "image_url", "image_url": {"url": images[i % 5]}}, {"type": "text", "text": f"Q{i}?"}] \
            if i % 4 else f"Text question {i}?"
        out.append(line(f"req-{i}", ask(content)))
    out.insert(3, '{"custom_id": "broken", "method": "POST", "url": ')
    out.insert(9, "this is not json")
    video = str(assets / "videos" / "carphone-qcif.mp4")
    out.append(line("video", ask([{"type": "video_url", "video_url": {"url": video}, "nframes": 4},
                                  {"type": "text", "text": "What happens?"}])))
    out.append(line("bad-image", ask([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                      {"type": "text", "text": "?"}])))
    out.append(line("req-5", ask("a second req-5")))
    out.append(line("long", ask("Tell a long story.", max_tokens=300, min_tokens=300)))
    assert len(out) == 20
    return out


def batch(checkpoint, assets, source, target, ray=None, **popen):
    cmd = [sys.executable, "-m", "qwen2vl.cli", "batch", "--model", str(checkpoint), str(source), str(target),
           "--served-model-name", "tiny", "--max-batch", "2", "--allowed-local-media-path", str(assets / "videos")]
    return subprocess.Popen(cmd + (["--ray", ray] if ray else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def kill_after(job: subprocess.Popen, target, lines: int) -> list[dict]:
    """SIGKILL the job (its whole process group) once it has written `lines` result lines; the lines it wrote."""
    deadline = time.monotonic() + 600
    while (not target.exists() or len(target.read_text().splitlines()) < lines) and time.monotonic() < deadline:
        assert job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    written = rows(target)
    assert lines <= len(written) < 20
    return written


def rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def without_run_state(body: dict) -> dict:
    """A response body without what differs from run to run by design: its timestamp, and how many prompt tokens
    the prefix cache happened to hold (which depends on what ran before, and when)."""
    body = json.loads(json.dumps(body))
    body.pop("created", None)
    (body.get("usage") or {}).pop("prompt_tokens_details", None)
    return body


def comparable(row: dict) -> str:
    row = dict(row, response=row["response"] and dict(row["response"], body=without_run_state(row["response"]["body"])))
    return json.dumps(row, sort_keys=True)


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    (d / "in.jsonl").write_text("\n".join(requests(assets)) + "\n")
    p = batch(checkpoint, assets, d / "in.jsonl", d / "out.jsonl")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return d, err


def test_results_equal_the_servers(uninterrupted, checkpoint, assets):
    d, err = uninterrupted
    assert "batch" in err and "remaining=0" in err  # the progress bar
    out = {(r["custom_id"], (r["error"] or {}).get("line")): r for r in rows(d / "out.jsonl")}
    assert len(out) == 20
    lines = (d / "in.jsonl").read_text().splitlines()
    errors = {r["error"]["line"]: r["error"]["code"] for r in out.values() if r["error"]}
    assert errors == {4: "invalid_json", 10: "invalid_json", 19: "duplicate_custom_id"}
    model = Qwen2VL.from_pretrained(checkpoint, progress=False)
    s = make_server(model, policy=MediaPolicy(allow_local=True, local_roots=(assets / "videos",),
                                              allow_remote=False))
    try:
        for number, text in enumerate(lines, 1):
            if number in errors:
                continue
            item = json.loads(text)
            status, body = s.post(json.dumps(item["body"]).encode())
            got = out[(item["custom_id"], None)]["response"]
            assert got["status_code"] == status, item["custom_id"]
            mine, servers = without_run_state(got["body"]), without_run_state(body)
            assert mine.pop("id", None) != servers.pop("id", None) or status != 200  # a random id unless given one
            assert mine == servers, item["custom_id"]
    finally:
        s.close()
    assert out[("bad-image", None)]["response"]["status_code"] == 400
    assert out[("video", None)]["response"]["body"]["usage"]["video_tokens"] > 0


def test_a_killed_job_resumes_to_the_same_file(uninterrupted, checkpoint, assets, tmp_path):
    """SIGKILL partway, a torn last line (as a power loss leaves), then the same command again: every custom_id
    once, and the file an uninterrupted run writes (line order aside)."""
    d, _ = uninterrupted
    source, target = d / "in.jsonl", tmp_path / "out.jsonl"
    written = kill_after(batch(checkpoint, assets, source, target, start_new_session=True), target, 8)
    with open(target, "a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "req-1')  # a write cut short
    p = batch(checkpoint, assets, source, target)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert f"{len(written)} already in" in err
    final = rows(target)
    assert final[:len(written)] == written  # nothing done twice
    assert sorted(map(comparable, final)) == sorted(map(comparable, rows(d / "out.jsonl")))
    ids = [r["custom_id"] for r in final if not r["error"]]
    assert len(ids) == len(set(ids)) == 17


def test_a_job_that_cannot_run_exits_non_zero(checkpoint, assets, tmp_path):
    p = batch(checkpoint, assets, tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "cannot read the batch input" in err and not (tmp_path / "out.jsonl").exists()
    (tmp_path / "in.jsonl").write_text(json.dumps({"custom_id": "a", "url": URL, "body": {"messages": []}}) + "\n")
    p = batch(tmp_path / "no-model", assets, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "qwen2vl: error" in err
