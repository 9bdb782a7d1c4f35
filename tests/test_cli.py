"""The command line on a tiny checkpoint: `qwen2vl run` (text and --json) and `qwen2vl chat` driven through stdin,
checked against model.chat; errors are one clear line."""

import json
import subprocess
import sys

import pytest

from qwen2vl import Qwen2VL
from tests.oracle import tiny_checkpoint

ARGS = ["--max-tokens", "8", "--temperature", "0", "--max-pixels", str(64 * 28 * 28)]


@pytest.fixture(scope="module")
def checkpoint(assets, tmp_path_factory):
    _, path, _ = tiny_checkpoint("gqa3-untied", tmp_path_factory.mktemp("cli-model"), seed=31,
                                 real_vocab_from=assets / "qwen2-vl-2b-instruct")
    return path


def qwen2vl(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen2vl.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def answer(model, conversation):
    return model.chat(conversation, max_new_tokens=8, temperature=0, max_pixels=64 * 28 * 28)


def test_run_streams_the_answer(checkpoint, assets):
    image = str(assets / "images" / "cat.png")
    r = qwen2vl("run", "--model", str(checkpoint), "--image", image, *ARGS, "What animal is this?")
    assert r.returncode == 0, r.stderr
    model = Qwen2VL.from_pretrained(checkpoint, progress=False)
    want = answer(model, [{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "What animal is this?"}]}])
    assert r.stdout == want.text + "\n"
    assert "loading" in r.stderr


def test_run_json(checkpoint, assets):
    r = qwen2vl("run", "--model", str(checkpoint), "--image", str(assets / "images" / "chart-pew.png"), *ARGS,
                "--json", "Read the chart.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "finish_reason", "usage", "timings"}
    assert out["usage"]["completion_tokens"] <= 8 and out["usage"]["image_tokens"] > 0
    assert out["timings"]["total_s"] > 0 and out["timings"]["first_token_s"] <= out["timings"]["total_s"]


def test_chat_keeps_history_and_attachments(checkpoint, assets):
    image = str(assets / "images" / "cat.png")
    r = qwen2vl("chat", "--model", str(checkpoint), *ARGS,
                stdin=f"/image {image}\nWhat is this?\nAnd its color?\n/quit\n")
    assert r.returncode == 0, r.stderr
    model = Qwen2VL.from_pretrained(checkpoint, progress=False)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "What is this?"}]}]
    a1 = answer(model, turn1).text
    a2 = answer(model, turn1 + [{"role": "assistant", "content": a1},
                                {"role": "user", "content": "And its color?"}]).text
    assert r.stdout == f">>> >>> {a1}\n>>> {a2}\n>>> "  # a prompt per input line: /image, two questions, /quit
    assert "attached to your next message" in r.stderr


def test_errors_are_one_clear_line(checkpoint, tmp_path):
    r = qwen2vl("run", "--model", str(checkpoint), "--image", str(tmp_path / "missing.png"), *ARGS, "Hi")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("qwen2vl: error: conversation 0, message 0, item 0")
    assert "missing.png" in r.stderr and "Traceback" not in r.stderr
    r = qwen2vl("run", "--model", str(tmp_path / "nowhere"), "Hi")
    assert r.returncode == 1 and "not a checkpoint directory" in r.stderr
