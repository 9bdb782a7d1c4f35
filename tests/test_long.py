"""Long inputs: a prompt of thousands of tokens prefilled in chunks through the KV pool equals the dense model; a long
prompt beside short ones in the server (their answers unchanged, the pool holding real lengths); a video over the
CPU budget capped with a notice; the vision tower in pieces equals it in one."""

import logging
import threading
import time
import urllib.request

import pytest
import torch

from qwen2vl import Qwen2VL
from qwen2vl.kv import BLOCK, KVPool, blocks_for
from tests import quant_oracle
from tests.oracle import flat_config, hf_logits, hf_model, hub_state
from tests.test_server import make_server

LONG = 4096


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny AWQ checkpoint written by the independent packer, and transformers holding its dequantized twin."""
    config = flat_config("awq-tiny")
    config["max_position_embeddings"] = 32768
    hf = hf_model(config, seed=7, attn="sdpa")
    path = tmp_path_factory.mktemp("awq-long")
    dense = quant_oracle.write_quantized(hub_state(hf, config), config, path, "awq", 4, 128, seed=7)
    return path, quant_oracle.dense_twin(config, dense, hf), config


def prompt_logits(model: Qwen2VL, ids: torch.Tensor) -> torch.Tensor:
    """The logits of every prompt position as the engine computes them: the prompt prefilled in the engine's chunks
    through its KV pool (the final norm's outputs caught per chunk), then the LM head."""
    hidden = []
    hook = model.model.model.norm.register_forward_hook(lambda mod, args, out: hidden.append(out))
    try:
        model.generate({"input_ids": ids}, max_new_tokens=1)
    finally:
        hook.remove()
    with torch.inference_mode():
        return model.model.lm_head(torch.cat(hidden, dim=1)).float()


@pytest.mark.parametrize("fast", [False, None], ids=["exact", "fast"])
def test_a_long_prompt_in_chunks_equals_the_dense_model(quantized, fast):
    """4096 tokens, prefilled in chunks (1024 alone) whose queries attend through block tables to every key before
    them: with fast=False (float32 keys and values) the logits of every position equal transformers' dense twin's
    within 1e-4, as at short lengths; with the fast plan, float16 keys and values (rounded to 2^-11 of each value)
    within 1e-2 of the logit scale, on top of the fast paths' tolerance of the plan's prefill dtype (measured here:
    5.5e-5 with float32 keys and values and int16 prefill, 5.1e-3 with float16 ones; this tiny model's large random
    activations amplify them: on the 2B shape float16 keep 99.7% of the argmax, BENCHMARKS.md)."""
    from tests.test_quant import FAST_LOGITS_TOL

    path, hf, config = quantized
    model = Qwen2VL.from_pretrained(path, progress=False, fast=fast)
    ids = torch.randint(10, config["vocab_size"], (1, LONG), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(hf, {"input_ids": ids})
    got = prompt_logits(model, ids)
    diff, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    print(f"{LONG} tokens, fast={fast}: max |logit diff| {diff:.2e} (scale {scale:.2f}), KV {model.plan.kv_format}")
    if fast is False:
        assert model.plan.kv_format == "float32" and diff <= 1e-4
    else:
        assert model.plan.kv_format == "float16"
        matmuls = FAST_LOGITS_TOL[model.plan.prefill_dtype] if model.plan.prefill_dtype != torch.float32 else 1e-4
        assert diff <= (matmuls + 1e-2) * scale


def test_prompt_chunks_attend_alike_natively_and_through_sdpa(quantized, monkeypatch):
    """The plan's two ways of attending a prompt chunk over the KV pool (the native kernel, or the keys gathered and
    SDPA, whichever it measured faster) give the same logits for 4096 tokens in chunks: float32 sums in other
    orders, which the fast plan's int16 prefill activations (rounded per group of 128) turn into level flips here and
    there: within 1e-3 of the logit scale (measured 1.4e-4; a wrong key or mask moves logits by whole units)."""
    from qwen2vl.cpu import plan as plan_module

    path, _, config = quantized
    measure = plan_module.measure
    ids = torch.randint(10, config["vocab_size"], (1, LONG), generator=torch.Generator().manual_seed(4))
    logits = {}
    for way, (native, sdpa) in {"native": (1.0, 2.0), "torch": (2.0, 1.0)}.items():
        monkeypatch.setattr(plan_module, "measure", lambda cfg, isa, n=native, s=sdpa: {
            **measure(cfg, isa), "chunk_attention_native": n, "chunk_attention_sdpa": s})
        model = Qwen2VL.from_pretrained(path, progress=False)
        if model.plan.isa is None:
            pytest.skip("no native kernels (QWEN2VL_NATIVE=0 or no compiler)")
        assert model.plan.chunk_attention == way
        logits[way] = prompt_logits(model, ids)
    scale = logits["native"].abs().max().item()
    assert (logits["native"] - logits["torch"]).abs().max().item() <= 1e-3 * scale


def test_a_long_request_beside_short_ones(model):
    """Four concurrent requests, one with a prompt of ~14k tokens and three short ones: the short answers equal their
    answers alone, none fails, and the KV pool holds their real lengths (per /metrics, while all four run), not four
    times the longest."""
    server = make_server(model)
    try:
        client = server.client()
        short = [[{"role": "user", "content": f"Question {i}: name a colour."}] for i in range(3)]
        long = [{"role": "user", "content": "a b c d " * 3500 + "Summarize."}]
        ask = lambda messages, n: client.chat.completions.create(model="tiny", messages=messages, max_tokens=n,
                                                                 temperature=0, extra_body={"min_tokens": n})
        solo = [ask(m, 24).choices[0].message.content for m in short]
        model.prefix_cache.clear()
        t = model.config.text
        per_block = KVPool.block_bytes(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, model.plan.kv_format)
        out, used = {}, []
        workers = [threading.Thread(target=lambda: out.__setitem__("long", ask(long, 64)))]
        workers += [threading.Thread(target=lambda i=i: out.__setitem__(i, ask(short[i], 24))) for i in range(3)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
                used.append(next(float(line.split()[-1]) for line in r.read().decode().splitlines()
                                 if line.startswith("qwen2vl_kv_cache_used_bytes")))
            time.sleep(0.05)
        for w in workers:
            w.join()
    finally:
        server.close()
    assert [out[i].choices[0].message.content for i in range(3)] == solo
    L = out["long"].usage.prompt_tokens
    assert L > 14000 and out["long"].usage.completion_tokens == 64
    shorts = [out[i].usage.prompt_tokens + 24 for i in range(3)]
    real = (blocks_for(L + 64) + sum(blocks_for(n) + 1 for n in shorts)) * per_block  # + 1: a block being filled
    assert 0 < max(used) <= real < 2 * blocks_for(L) * per_block


def test_the_vision_tower_in_pieces_equals_it_whole(model, monkeypatch):
    """A video's temporal slices attend only within themselves, so the tower run in pieces of a few slices (as a
    long video runs) gives the embeddings of one run, up to float32 sums of other matrix sizes."""
    from qwen2vl import model as model_module

    g = torch.Generator().manual_seed(4)
    grid = torch.tensor([[6, 4, 6], [1, 8, 8]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, generator=g)
    with torch.inference_mode():
        whole = model.model.encode_vision(pixels, grid)
        monkeypatch.setattr(model_module, "VISION_PIECE", 2 * 4 * 6)
        assert len(model_module.vision_pieces(grid, model_module.VISION_PIECE)) == 4
        pieces = model.model.encode_vision(pixels, grid)
    assert torch.allclose(pieces, whole, atol=1e-5, rtol=1e-5)


def test_a_long_video_is_capped_with_a_notice(assets, caplog):
    """A video file that sets no size keeps within the processor's video budget (a CPU default), with a one-line
    notice naming it and how to ask for more; a video that sets its own frames or pixels is left as asked."""
    from qwen2vl.processor import Processor

    proc = Processor.from_pretrained(assets / "qwen2-vl-2b-instruct", video_budget=1024)
    video = str(assets / "videos" / "cockatoo-yuv444-audio.mp4")
    conv = lambda **opts: [{"role": "user", "content": [{"type": "video", "video": video, **opts},
                                                        {"type": "text", "text": "What happens?"}]}]
    with caplog.at_level(logging.WARNING, logger="qwen2vl"):
        x = proc(conv())
    tokens = int(x.video_grid_thw.prod()) // 4
    assert tokens <= 1024 and len(caplog.records) == 1
    assert "conversation 0, message 0, item 0" in caplog.text and "video budget (1024 tokens)" in caplog.text
    assert "nframes" in caplog.text and "max_pixels" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwen2vl"):
        y = proc(conv(fps=1.0))
    assert int(y.video_grid_thw.prod()) // 4 > 1024 and not caplog.records
    assert BLOCK == 16
