"""Generation: greedy parity with transformers' generate, batch == single, cached decode == full recompute, the
vision-embedding cache, and the chat API."""

import pytest
import torch

from qwen2vl import Qwen2VL
from tests.oracle import TINY, build_inputs, tiny_checkpoint
from tests.oracle_inputs import hf_processor, oracle_inputs

STEPS = 32
CASES = {
    "text": [[("text", 11)]],
    "one-image": [[("text", 5), ("image", (1, 4, 6)), ("text", 7)]],
    "two-images": [[("text", 3), ("image", (1, 6, 4)), ("text", 2), ("image", (1, 2, 8)), ("text", 4)]],
    "video": [[("text", 4), ("video", (2, 4, 4)), ("text", 5)]],
}


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    hf, path, config = tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=7)
    return hf, Qwen2VL.from_pretrained(path, progress=False), config


@pytest.fixture(scope="module")
def real_vocab(assets, tmp_path_factory):
    """A tiny random model with the real tokenizer, chat template and special-token ids."""
    hf, path, _ = tiny_checkpoint("gqa3-untied", tmp_path_factory.mktemp("real-vocab"), seed=11,
                                  real_vocab_from=assets / "qwen2-vl-2b-instruct")
    return hf, Qwen2VL.from_pretrained(path, progress=False), path


def hf_greedy(hf, inputs, steps=STEPS):
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(pair, case):
    hf, ours, config = pair
    inputs = build_inputs(CASES[case], config["vocab_size"], seed=3)
    ref = hf_greedy(hf, inputs)
    got = ours.generate({k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, max_new_tokens=STEPS,
                        temperature=0, min_new_tokens=STEPS)
    assert got == ref


def test_greedy_multi_turn_matches_transformers(real_vocab, assets):
    hf, ours, path = real_vocab
    img = lambda n: {"type": "image", "image": str(assets / "images" / n), "max_pixels": 64 * 28 * 28}
    conv = [{"role": "user", "content": [img("cat.png"), {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A cat on a bench."},
            {"role": "user", "content": [img("chart-pew.png"), {"type": "text", "text": "And this one?"}]}]
    ref = hf_greedy(hf, oracle_inputs(hf_processor(path), conv))
    got = ours.generate(ours.processor(conv), max_new_tokens=STEPS, temperature=0, min_new_tokens=STEPS)
    assert got == ref


def test_batch_equals_single(real_vocab, assets):
    """4 conversations with different image sizes and prompt lengths, batched (left-padded) vs one by one.

    Tie-aware (as vLLM's check_logprobs_close): if the runs part ways at a step where the single run's top-2
    logprobs lie within 1e-5, that sample stops being compared there. The count of such ties is asserted to be
    small and reported."""
    hf, ours, _ = real_vocab
    img = lambda n, px: {"type": "image", "image": str(assets / "images" / n), "max_pixels": px * 28 * 28}
    batch = [
        [{"role": "user", "content": [img("cat.png", 64), {"type": "text", "text": "Describe."}]}],
        [{"role": "user", "content": [img("receipt.jpg", 160), {"type": "text", "text": "What is the total on this "
                                                                              "receipt, and where was it printed?"}]}],
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": [img("chart-pew.png", 32), img("sign-scenetext.jpg", 100),
                                      {"type": "text", "text": "Compare the two."}]}],
        [{"role": "user", "content": "No image here; just count to ten."}],
    ]
    kw = dict(max_new_tokens=24, temperature=0, min_new_tokens=24, logprobs=True, top_logprobs=2)
    batched = ours.chat(batch, **kw)
    ties = 0
    for conv, b in zip(batch, batched):
        s = ours.chat(conv, **kw)
        for k, (tb, ts) in enumerate(zip(b.token_ids, s.token_ids)):
            if tb != ts:
                (_, l1), (_, l2) = s.top_logprobs[k]
                assert l1 - l2 < 1e-5, f"diverged at step {k} without a tie ({l1 - l2:.2e})"
                ties += 1
                break
        else:
            assert b.token_ids == s.token_ids
    assert ties <= 1, f"{ties} tie-broken divergences"
    print(f"batch == single: {len(batch)} conversations, {ties} tie-broken divergences")


def test_cached_decode_equals_full_recompute(pair):
    """The log-probabilities of every step (prefill, then decode steps from the KV cache, two rows batched) equal
    those of model.logits over the whole sequence: the chosen token's and the top 20."""
    from qwen2vl.datatypes import ModelInputs

    hf, ours, config = pair
    inputs = {k: v for k, v in build_inputs([[("text", 3), ("image", (1, 4, 6)), ("text", 4)],
                                             [("text", 9), ("video", (2, 2, 4)), ("text", 2)]],
                                            config["vocab_size"], seed=5).items() if k != "mm_token_type_ids"}
    ours.prefix_cache.clear()
    params = ours.sampling(max_new_tokens=8, min_new_tokens=8, temperature=0, logprobs=True, top_logprobs=20)
    runs = ours.submit(ModelInputs.of(inputs), params)
    ours.engine.run([seq for seq, _ in runs])
    x = ModelInputs.of(inputs)
    for (seq, deltas), row in zip(runs, x.rows(2, config["image_token_id"], config["video_token_id"])):
        assert len(deltas) == 8
        new = torch.tensor([seq.tokens])
        full = ModelInputs(torch.cat([row.input_ids, new], 1), None, row.pixel_values, row.image_grid_thw,
                           row.pixel_values_videos, row.video_grid_thw)
        ref = torch.log_softmax(ours.logits(full)[0], -1)
        L = row.input_ids.shape[1]
        for k, d in enumerate(deltas):  # step k predicts token k from position L + k - 1
            want, ids = ref[L + k - 1].topk(20)
            got = torch.tensor([v for _, v in d.top_logprobs])
            assert (got - want).abs().max() <= 1e-4, f"row {seq.row} step {k}"
            assert abs(d.logprob - ref[L + k - 1, d.token]) <= 1e-4


def test_vision_cache_skips_the_encoder_on_a_second_turn(real_vocab, assets):
    hf, ours, _ = real_vocab
    calls = []
    hook = ours.model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[1].tolist()))
    ours.vision_cache.entries.clear()
    image = {"type": "image", "image": str(assets / "images" / "astronaut.png"), "max_pixels": 64 * 28 * 28}
    turn1 = [{"role": "user", "content": [image, {"type": "text", "text": "Who is this?"}]}]
    try:
        first = ours.chat(turn1, max_new_tokens=6, temperature=0)
        assert len(calls) == 1
        turn2 = turn1 + [{"role": "assistant", "content": first.text},
                         {"role": "user", "content": "What is behind them?"}]
        second = ours.chat(turn2, max_new_tokens=6, temperature=0)
        assert len(calls) == 1, "the vision encoder ran again for an image it had seen"
        ours.vision_cache.entries.clear()  # the same question without the caches gives identical tokens
        ours.prefix_cache.clear()
        fresh = ours.chat(turn2, max_new_tokens=6, temperature=0)
        assert len(calls) == 2 and fresh.token_ids == second.token_ids
        # the same image twice in one batch runs the encoder once for it
        calls.clear()
        ours.vision_cache.entries.clear()
        ours.prefix_cache.clear()
        ours.chat([turn1, turn1], max_new_tokens=2, temperature=0)
        assert calls == [[[1, 16, 16]]]
    finally:
        hook.remove()


def test_chat_results_and_streaming(real_vocab, assets):
    hf, ours, _ = real_vocab
    conv = [{"role": "user", "content": [{"type": "image", "image": str(assets / "images" / "cat.png"),
                                          "max_pixels": 64 * 28 * 28}, {"type": "text", "text": "Hi"}]}]
    r = ours.chat(conv, max_new_tokens=10, temperature=0, min_new_tokens=10)
    assert r.finish_reason == "length" and len(r.token_ids) == 10
    assert r.text == ours.processor.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    x = ours.processor(conv)
    assert r.usage.prompt_tokens == x.input_ids.shape[1] and r.usage.completion_tokens == 10
    assert r.usage.image_tokens == int(x.image_grid_thw.prod()) // 4 and r.usage.video_tokens == 0
    stream = ours.chat(conv, stream=True, max_new_tokens=10, temperature=0, min_new_tokens=10)
    deltas = list(stream)
    assert "".join(deltas) == r.text and stream.result.token_ids == r.token_ids
    # a stop string ends the answer and is not part of it
    if len(r.text) > 4:
        stop = r.text[2:5]
        cut = ours.chat(conv, max_new_tokens=10, temperature=0, min_new_tokens=10, stop=[stop])
        assert cut.finish_reason == "stop" and cut.text == r.text[:r.text.index(stop)]


def test_seeded_sampling_is_reproducible(real_vocab, assets):
    hf, ours, _ = real_vocab
    conv = [{"role": "user", "content": "Tell me a story."}]
    a = ours.chat(conv, max_new_tokens=12, temperature=1.0, seed=123)
    b = ours.chat(conv, max_new_tokens=12, temperature=1.0, seed=123)
    c = ours.chat(conv, max_new_tokens=12, temperature=1.0, seed=124)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_checkpoint_generation_defaults(real_vocab):
    hf, ours, _ = real_vocab
    d = ours.defaults  # generation_config.json: do_sample with top_k 1 (in effect greedy), eos [151645, 151643]
    assert d.top_k == 1 and d.greedy and d.stop_token_ids == [151645, 151643]
    p = ours.sampling(temperature=0.7)
    assert p.temperature == 0.7 and p.top_k == 0 and p.top_p == 1.0 and not p.greedy
    assert p.stop_token_ids == [151645, 151643]


def test_finished_rows_leave_the_batch(pair):
    """Rows with different max_new_tokens: a finished row leaves the batch (decode steps run only on the rows still
    going: 13 row-steps for 3, 8 and 5 tokens), and every row's tokens equal its run alone."""
    from qwen2vl.datatypes import ModelInputs

    hf, ours, config = pair
    inputs = ModelInputs.of({k: v for k, v in build_inputs([[("text", 5), ("image", (1, 4, 4)), ("text", 2)],
                                                            [("text", 9)], [("text", 3), ("text", 4)]],
                                                           config["vocab_size"], seed=2).items()
                             if k != "mm_token_type_ids"})
    lengths = [3, 8, 5]
    widths = []  # rows of each decode step (one new position per row)
    hook = ours.model.model.register_forward_hook(
        lambda mod, args, out: widths.append(args[0].shape[0]) if args[0].shape[1] == 1 else None)
    try:
        ours.prefix_cache.clear()
        runs = [ours.submit(inputs.rows(2, config["image_token_id"], config["video_token_id"])[b],
                            ours.sampling(max_new_tokens=n, temperature=0))[0] for b, n in enumerate(lengths)]
        ours.engine.run([seq for seq, _ in runs])
    finally:
        hook.remove()
    out = [seq.tokens for seq, _ in runs]
    assert [len(o) for o in out] == lengths
    assert sum(widths) == sum(n - 1 for n in lengths) and widths[-1] == 1
    for b, n in enumerate(lengths):
        alone = inputs.rows(2, config["image_token_id"], config["video_token_id"])[b]
        assert ours.generate(alone, max_new_tokens=n, temperature=0) == [out[b]]
