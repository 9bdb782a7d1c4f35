"""Sampler with hand-computed distributions, seeds, stop strings split across tokens, and streaming detokenization."""

import math
import random

import pytest
import torch

from qwen2vl.sampling import Sampler, SamplingParams

P = [0.5, 0.3, 0.15, 0.05]


def probs_after(params: SamplingParams, probs=P, seen=(), counts=None) -> list[float]:
    s = Sampler([params], [list(seen)], len(probs))
    if counts is not None:
        s.counts[0] = torch.tensor(counts, dtype=torch.float32)
    x = s.process(torch.tensor([probs]).log())
    return torch.softmax(x, -1)[0].tolist()


def close(a, b, tol=1e-6):
    return all(abs(x - y) < tol for x, y in zip(a, b))


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(top_k=2), [0.625, 0.375, 0, 0]),
    (SamplingParams(top_p=0.7), [0.625, 0.375, 0, 0]),  # smallest set with mass >= 0.7: {0.5, 0.3}
    (SamplingParams(top_p=0.5), [1, 0, 0, 0]),  # 0.5 alone already reaches 0.5
    (SamplingParams(top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (SamplingParams(min_p=0.5), [0.625, 0.375, 0, 0]),  # keep p >= 0.5 * 0.5
    (SamplingParams(min_p=0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (SamplingParams(temperature=2.0), [math.sqrt(p) / sum(math.sqrt(q) for q in P) for p in P]),
    (SamplingParams(temperature=0.5), [p * p / sum(q * q for q in P) for p in P]),
    (SamplingParams(top_k=3, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
])
def test_filters(params, expected):
    assert close(probs_after(params), expected)


def test_repetition_penalty_follows_transformers():
    s = Sampler([SamplingParams(repetition_penalty=2.0, temperature=0)], [[0, 3]], 4)
    x = s.process(torch.tensor([[2.0, 1.0, 0.5, -1.0]]))
    assert x[0].tolist() == [1.0, 1.0, 0.5, -2.0]  # seen positive logits halve, seen negative ones double


def test_presence_and_frequency_penalties():
    s = Sampler([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, temperature=0)], [[]], 4)
    s.counts[0] = torch.tensor([2.0, 0.0, 1.0, 0.0])
    x = s.process(torch.tensor([[2.0, 1.0, 0.5, -1.0]]))
    assert x[0].tolist() == [2.0 - 0.5 - 0.5, 1.0, 0.5 - 0.5 - 0.25, -1.0]


def test_min_new_tokens_masks_stop_tokens():
    s = Sampler([SamplingParams(temperature=0, stop_token_ids=[2], min_new_tokens=2)], [[]], 4)
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.5]])
    assert s(logits).tolist() == [1] and s(logits).tolist() == [1] and s(logits).tolist() == [2]


def test_rows_keep_their_own_parameters():
    s = Sampler([SamplingParams(temperature=0), SamplingParams(top_k=2, seed=0), SamplingParams(top_p=0.5, seed=1)],
                [[], [], []], 4)
    x = torch.softmax(s.process(torch.tensor([P, P, P]).log()), -1)
    assert close(x[0], P) and close(x[1], [0.625, 0.375, 0, 0]) and close(x[2], [1, 0, 0, 0])
    s.keep(torch.tensor([2]))
    assert s.params[0].top_p == 0.5 and s.seen.shape[0] == 1


def test_sampled_frequencies_follow_the_distribution():
    s = Sampler([SamplingParams(top_p=0.81, seed=0)], [[]], 4)
    n = 8000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[s(torch.tensor([P]).log())[0]] += 1
    assert close((counts / n).tolist(), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], tol=0.02)
    assert counts[3] == 0


def test_seed_reproducibility():
    def draw(seed):
        s = Sampler([SamplingParams(temperature=1.0, seed=seed)], [[]], 50)
        logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(9))
        return [s(logits).item() for _ in range(30)]

    assert draw(5) == draw(5) and draw(5) != draw(6)


def test_invalid_parameters():
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=2),
                dict(max_new_tokens=0)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        SamplingParams().updated(temprature=0.5)


# ---------------------------------------------------------------------------------------------------------------
# Streaming text


@pytest.fixture(scope="module")
def tokenizer(assets):
    from qwen2vl.chat import Tokenizer

    return Tokenizer.from_pretrained(assets / "qwen2-vl-2b-instruct")


def run(tokenizer, ids, stop=()):
    from qwen2vl.chat import TextStream

    s = TextStream(tokenizer, stop)
    deltas = [s.add(i) for i in ids]
    deltas.append(s.finish())
    return deltas, s


def test_stream_property_random_tokens(tokenizer):
    """Random token sequences, many of them single bytes of multi-byte characters: the concatenated deltas equal
    the decode of all the tokens."""
    rng = random.Random(0)
    byte_tokens = [tokenizer.token_id(t) for t in ["ä", "½", "ł", "å", "¥", "ð", "Ł", "Į"]]  # bytes >= 0x80
    for trial in range(300):
        n = rng.randint(1, 40)
        ids = [rng.choice(byte_tokens) if rng.random() < 0.3 else rng.randrange(151643) for _ in range(n)]
        deltas, _ = run(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_stream_cjk_and_emoji_token_by_token(tokenizer):
    text = "天气很好 ☀️🌍 — naïve café, 東京タワー! 👩‍👩‍👧"
    ids = tokenizer.encode(text)
    deltas, _ = run(tokenizer, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len([d for d in deltas if d]) > 3  # it really streams


def test_stop_string_split_across_tokens(tokenizer):
    ids = tokenizer.encode("The answer is 42") + tokenizer.encode("<") + tokenizer.encode("/ans") + \
        tokenizer.encode("wer> and more text")
    deltas, s = run(tokenizer, ids, stop=["</answer>"])
    assert s.stopped and "".join(deltas) == "The answer is 42"
    assert all("<" not in d for d in deltas)  # the stop string's start was held back, never shown


def test_held_back_text_is_released_when_it_is_not_a_stop(tokenizer):
    ids = tokenizer.encode("a </ans") + tokenizer.encode("wer but not the end")
    deltas, s = run(tokenizer, ids, stop=["</answer>"])
    assert not s.stopped and "".join(deltas) == "a </answer but not the end"


@pytest.mark.parametrize("penalty", [1e-30, 1e-300, 1e30, float("inf")])
def test_extreme_repetition_penalties_still_sample(penalty):
    """Found by the API fuzzer: a repetition penalty of 1e-300 turned seen logits into inf and the softmax into NaN
    (a 500 from the server). Every row still gets a token from its own vocabulary."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    logits[:, 3] = 0.0  # 0 * inf = nan under an infinite penalty
    params = [SamplingParams(temperature=0.7, seed=1, repetition_penalty=penalty),
              SamplingParams(temperature=0, repetition_penalty=penalty)]
    sampler = Sampler(params, [[1, 2, 3, 4], [3, 5]], 50)
    tokens = sampler(logits)
    assert tokens.shape == (2,) and all(0 <= t < 50 for t in tokens.tolist())
