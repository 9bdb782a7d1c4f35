"""The serving engine through the real server and the official `openai` client, and through the Python API:
sequences joining a running batch, batched == one at a time, cancellation, structured output (xgrammar), the
prefix cache with images, and /metrics. Tiny random-weight checkpoint with the real vocabulary."""

import base64
import io
import json
import threading

import jsonschema
import pytest
import torch
from PIL import Image

from qwen2vl.datatypes import ModelInputs
from qwen2vl.errors import InputError
from tests.test_server import make_server, wait_until

SCHEMA = {  # bounded: at most 12 + 3 x 8 characters of strings, two digits, one of three words
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "kind": {"enum": ["cat", "dog", "bird"]},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["name", "age", "kind", "tags"], "additionalProperties": False}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(model):
    s = make_server(model)
    yield s
    s.close()


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                         {"type": "text", "text": question}]}]


def concurrently(fn, n: int) -> list:
    """[fn(0), ..., fn(n - 1)], called from n threads at once."""
    out = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def photo(assets, name="astronaut.png", size=(224, 224)) -> Image.Image:
    return Image.open(assets / "images" / name).convert("RGB").resize(size)


# ---------------------------------------------------------------------------------------------------------------
# Continuous batching


def test_a_request_joins_a_running_generation(server):
    """A request sent while a 200-token generation streams gets its first tokens before that generation ends."""
    client, events = server.client(), []
    started = threading.Event()

    def long():
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=200,
            temperature=0, stream=True, extra_body={"min_tokens": 200})
        n = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                n += 1
                if n == 5:
                    started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                events.append(("long done", chunk.choices[0].finish_reason))

    t = threading.Thread(target=long)
    t.start()
    assert started.wait(60)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            events.append(("short first token", None))
            break
    stream.close()
    t.join(120)
    assert events[0] == ("short first token", None) and events[1] == ("long done", "length")


REQUESTS = [  # different sampling for each of 8 requests
    dict(temperature=0),
    dict(temperature=0.8, seed=1),
    dict(temperature=1.0, top_p=0.9, seed=2),
    dict(temperature=0.7, extra_body={"top_k": 20}, seed=3),
    dict(temperature=0, frequency_penalty=1.5),
    dict(temperature=0, extra_body={"repetition_penalty": 1.3}),
    dict(temperature=0.9, presence_penalty=1.0, seed=4, logprobs=True, top_logprobs=3),
    dict(temperature=0, stop=["e"], logprobs=True),
]


def test_concurrent_requests_equal_one_at_a_time(server):
    """8 concurrent requests with different sampling parameters give the text (and logprobs within 1e-4) they give
    one at a time."""
    client = server.client()

    def ask(i):
        r = client.chat.completions.create(model="tiny", max_tokens=24,
                                           messages=[{"role": "user", "content": f"Question {i}: what is {i}+{i}?"}],
                                           **REQUESTS[i])
        c = r.choices[0]
        return c.message.content, c.finish_reason, [t.logprob for t in c.logprobs.content] if c.logprobs else None

    alone = [ask(i) for i in range(8)]
    together = concurrently(ask, 8)
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a[:2] == b[:2], f"request {i} ({REQUESTS[i]})"
        if a[2] is not None:
            assert max(abs(x - y) for x, y in zip(a[2], b[2])) <= 1e-4
    assert alone[7][1] == "stop" and "e" not in alone[7][0]


def test_cancelling_one_stops_only_that_one(model, server):
    """Four streams decode together; one client leaves: its sequence ends as aborted, the others finish whole and
    equal their answers alone."""
    client, engine = server.client(), server.server.config.app.state.engine
    prompts = [f"Story {i}" for i in range(4)]
    ask = lambda p, **kw: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                                         temperature=0, extra_body={"min_tokens": 40},
                                                         max_tokens=40, **kw)
    want = [ask(p).choices[0].message.content for p in prompts]
    got, leaving = [None] * 4, []

    def stream(i):
        s = ask(prompts[i], stream=True)
        parts = []
        for chunk in s:
            parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if i == 0 and len(parts) == 3:
                leaving.extend(engine.rows + list(engine.waiting))
                s.close()  # the client goes away mid-answer
                return
        got[i] = "".join(parts)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got[1:] == want[1:]
    [gone] = [s for s in leaving if s.finish_reason == "abort"]
    assert len(gone.tokens) < 40


# ---------------------------------------------------------------------------------------------------------------
# Structured output


def test_json_schema_output_validates_every_time(server):
    """Constrained by the bounded schema, random weights give JSON that validates, greedy and sampled, batched
    (8 at once) and streamed; unconstrained, the same requests never do."""
    client = server.client()
    questions = [f"Describe pet {i} as JSON." for i in range(8)]

    def ask(i, constrained=True, stream=False):
        kw = dict(model="tiny", messages=[{"role": "user", "content": questions[i]}], max_tokens=96,
                  **({"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": i}))
        if constrained:
            kw["response_format"] = JSON_FORMAT
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        return client.chat.completions.create(**kw).choices[0].message.content

    outputs = concurrently(ask, 8) + [ask(i, stream=True) for i in range(4)]
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False) or "\\" in text
    for i in range(4):
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(ask(i, constrained=False)), SCHEMA)


def test_json_object_and_the_python_constraints(model):
    r = model.chat([{"role": "user", "content": "Give JSON."}], max_new_tokens=64, temperature=0,
                   json_schema=SCHEMA)
    jsonschema.validate(json.loads(r.text), SCHEMA)
    r = model.chat([{"role": "user", "content": "A date?"}], max_new_tokens=16, temperature=0.9, seed=5,
                   regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]")
    assert len(r.text) == 10 and r.text[:2] == "20" and r.text[4] == r.text[7] == "-" and r.finish_reason == "stop"
    choices = ["yes", "no", "maybe not"]
    texts = {model.chat([{"role": "user", "content": f"Q{i}?"}], max_new_tokens=8, temperature=1.0, seed=i,
                        choice=choices).text for i in range(6)}
    assert texts <= set(choices)
    with pytest.raises(Exception, match="one output constraint"):
        model.chat([{"role": "user", "content": "x"}], regex="a", choice=["b"])


def test_json_object_and_whitespace(model, server):
    """json_object gives a JSON object; the grammars allow no free whitespace (small models loop on it)."""
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON?"}],
                                                max_tokens=48, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    from qwen2vl.grammar import Constraint

    for constraint in (Constraint(json_schema=SCHEMA), Constraint(json_object=True)):
        m = model._grammars.matcher(model.compile(constraint)).m
        assert m.accept_string("{") and not m.accept_string(" ") and not m.accept_string("\n")


def test_a_schema_that_cannot_compile_is_a_400(server):
    status, body = server.post(json.dumps({
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
    }).encode())
    assert status == 400 and "bogus" in body["error"]["message"] and "schema" in body["error"]["message"]
    assert body["error"]["param"] == "response_format"
    status, body = server.post(json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                           "response_format": {"type": "json_schema"}}).encode())
    assert status == 400 and "json_schema.schema" in body["error"]["message"]


def test_the_token_bitmask_spans_the_logits(model):
    """The grammar's vocabulary is the logits' width (151936 here), not the tokenizer's length (151657)."""
    model.compile(None)
    from qwen2vl.grammar import Constraint

    model.compile(Constraint(json_object=True))
    assert model._grammars.vocab_size == model.config.text.vocab_size == 151936
    assert len(model.processor.tokenizer.tk.get_vocab(with_added_tokens=True)) < 151936


# ---------------------------------------------------------------------------------------------------------------
# Prefix cache


def prefill_counter(model):
    counted = []
    hook = model.model.model.register_forward_hook(lambda mod, args, out: counted.append(args[0].shape[1]))
    return counted, hook


def test_a_second_question_about_an_image_reuses_its_prefill(model, server, assets):
    """Same image, new question: the image's tokens are reported cached, the prefill computes only the rest, and the
    logits equal an uncached run's within 1e-4."""
    client = server.client()
    model.prefix_cache.clear()
    image = photo(assets)
    first = client.chat.completions.create(model="tiny", messages=image_message(image, "What is this?"),
                                           max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    counted, hook = prefill_counter(model)
    try:
        second = client.chat.completions.create(model="tiny", messages=image_message(image, "And the colours?"),
                                                max_tokens=1, temperature=0)
    finally:
        hook.remove()
    image_tokens = second.usage.model_extra["image_tokens"]
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert image_tokens == 64 and cached >= image_tokens
    assert sum(counted) == second.usage.prompt_tokens - cached  # only the new tokens went through the decoder

    conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "And the colours?"}]}]
    logits = []
    hook = model.model.lm_head.register_forward_hook(lambda mod, args, out: logits.append(out.float()))
    try:
        cached_run = model.chat(conversation, max_new_tokens=1, temperature=0)  # cached through the server's turn
        model.prefix_cache.clear()
        model.vision_cache.entries.clear()
        fresh = model.chat(conversation, max_new_tokens=1, temperature=0)
    finally:
        hook.remove()
    assert cached_run.usage.cached_tokens == cached and fresh.usage.cached_tokens == 0
    assert (logits[0] - logits[1]).abs().max() <= 1e-4


def test_two_images_of_one_size_never_share_blocks(model, assets):
    """Different images with identical size (so identical token ids): the second finds only the blocks before its
    image, and its logits equal its uncached run's."""
    model.prefix_cache.clear()
    a, b = photo(assets, "astronaut.png"), photo(assets, "cat.png")
    system = {"role": "system", "content": "You look closely at pictures and answer in one short sentence."}
    conv = lambda img: [system, {"role": "user", "content": [{"type": "image", "image": img},
                                                             {"type": "text", "text": "What is this?"}]}]
    x = model.processor(conv(a))
    assert torch.equal(x.input_ids, model.processor(conv(b)).input_ids)
    image_start = int((x.input_ids[0] == model.config.image_token_id).nonzero()[0])
    logits = []
    hook = model.model.lm_head.register_forward_hook(lambda mod, args, out: logits.append(out.float()))
    try:
        model.chat(conv(a), max_new_tokens=1, temperature=0)
        second = model.chat(conv(b), max_new_tokens=1, temperature=0)
        model.prefix_cache.clear()
        alone = model.chat(conv(b), max_new_tokens=1, temperature=0)
    finally:
        hook.remove()
    assert second.usage.cached_tokens == image_start // 16 * 16 > 0 and alone.usage.cached_tokens == 0
    assert (logits[1] - logits[2]).abs().max() <= 1e-4


def test_turns_of_a_chat_reuse_the_conversation(model, assets):
    """Turn 2 resends turn 1 with its answer: the prompt, the image and the answer's tokens come from the cache."""
    model.prefix_cache.clear()
    turn1 = [{"role": "user", "content": [{"type": "image", "image": photo(assets)},
                                          {"type": "text", "text": "Describe it."}]}]
    first = model.chat(turn1, max_new_tokens=20, min_new_tokens=20, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More."}]
    second = model.chat(turn2, max_new_tokens=2, temperature=0)
    assert second.usage.cached_tokens >= (first.usage.prompt_tokens // 16) * 16
    assert second.usage.cached_tokens <= second.usage.prompt_tokens - 1


def test_a_follow_up_reads_the_same_blocks(model):
    """A second question after a long prompt takes the prompt's blocks by reference: its block table begins with the
    very blocks the first request filled (no keys or values copied), and they are reported as cached tokens."""
    model.prefix_cache.clear()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1000, 100000, (1, 700), generator=g)
    first = torch.cat([ids, torch.tensor([[11, 12, 13]])], 1)
    second = torch.cat([ids, torch.tensor([[21, 22]])], 1)
    tables = []
    engine = model.engine
    join = engine.batch.join
    engine.batch.join = lambda seq, table, *a: (tables.append(list(table.blocks)), join(seq, table, *a))[1]
    try:
        model.generate({"input_ids": first}, max_new_tokens=2, temperature=0)
        [(seq, _)] = model.submit(ModelInputs.of({"input_ids": second}), model.sampling(max_new_tokens=2,
                                                                                         temperature=0))
        engine.run([seq])
    finally:
        del engine.batch.join
    assert seq.cached_tokens == 700 // 16 * 16
    assert tables[1][:700 // 16] == tables[0][:700 // 16]


def test_a_request_that_does_not_fit_waits_for_room(checkpoint):
    """A pool with room for one of two long requests: the second waits (it does not fail), starts when the first
    leaves, and both answers equal their solo answers."""
    from qwen2vl import Qwen2VL
    from qwen2vl.generate import EngineSettings
    from qwen2vl.kv import KVPool

    probe = Qwen2VL.from_pretrained(checkpoint, progress=False)
    t = probe.config.text
    per_block = KVPool.block_bytes(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, probe.plan.kv_format)
    small = Qwen2VL.from_pretrained(checkpoint, progress=False, engine=EngineSettings(kv_cache_bytes=60 * per_block))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1000, 100000, (1, 600), generator=g) for _ in range(2)]  # 38 + 2 blocks each
    solo = [probe.generate({"input_ids": p}, max_new_tokens=20, min_new_tokens=20, temperature=0)[0] for p in prompts]
    params = small.sampling(max_new_tokens=20, min_new_tokens=20, temperature=0)
    runs = [small.submit(ModelInputs.of({"input_ids": p}), params)[0] for p in prompts]
    waited = []
    while not all(seq.done for seq, _ in runs):
        small.engine.step()
        waited.append(len(small.engine.waiting))
        assert small.engine.pool.used_bytes <= 60 * per_block
    assert max(waited) == 1 and [seq.tokens for seq, _ in runs] == solo
    assert [seq.finish_reason for seq, _ in runs] == ["length", "length"]
    with pytest.raises(InputError, match="raise --kv-cache-bytes"):  # larger than the whole pool: refused at once
        small.generate({"input_ids": torch.randint(1000, 100000, (1, 1200), generator=g)}, max_new_tokens=4)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_in_prometheus_format(server, assets):
    from prometheus_client.parser import text_string_to_metric_families

    client = server.client()
    for q in ("One?", "Two?"):
        client.chat.completions.create(model="tiny", messages=image_message(photo(assets), q), max_tokens=4,
                                       temperature=0)
    import urllib.request

    def scrape() -> dict:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return {f.name: f for f in text_string_to_metric_families(r.read().decode())}

    families = scrape()
    value = lambda name, suffix="": next(s.value for s in families[name].samples if s.name == name + suffix)
    engine = server.server.config.app.state.engine
    wait_until(lambda: not engine.busy)  # a client has its answer a moment before its row leaves the batch
    families = scrape()
    assert value("qwen2vl_requests_running") == 0 and value("qwen2vl_requests_waiting") == 0
    assert value("qwen2vl_generation_tokens", "_total") >= 8
    assert value("qwen2vl_time_to_first_token_seconds", "_count") >= 2
    assert value("qwen2vl_time_per_output_token_seconds", "_count") >= 6
    assert 0 < value("qwen2vl_prefix_cache_hit_rate") < 1
    assert value("qwen2vl_kv_cache_bytes") > 0 and value("qwen2vl_generation_tokens_per_second") >= 0


def test_a_failing_sequence_fails_alone(model, server, monkeypatch):
    """A request whose generation raises (here its text stream, on its third token) gets a 500 with an OpenAI error
    body; the requests decoding beside it finish with the answers they give alone."""
    import qwen2vl.generate

    class Failing(qwen2vl.generate.TextStream):
        def add(self, token):
            if "FAIL-HERE" in self.stop and len(self.ids) == 2:
                raise RuntimeError("injected failure")
            return super().add(token)

    client = server.client()
    ask = lambda i, **kw: client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=24, temperature=0,
        extra_body={"min_tokens": 24}, **kw).choices[0].message.content
    alone = [ask(i) for i in range(3)]
    monkeypatch.setattr(qwen2vl.generate, "TextStream", Failing)
    failed = {}

    def run(i):
        if i < 3:
            return ask(i)
        status, body = server.post(json.dumps({"messages": [{"role": "user", "content": "Story 9"}],
                                               "max_tokens": 24, "stop": ["FAIL-HERE"]}).encode())
        failed.update(status=status, body=body)

    together = concurrently(run, 4)
    assert together[:3] == alone
    assert failed["status"] == 500 and "injected failure" in failed["body"]["error"]["message"]
    assert failed["body"]["error"]["type"] == "server_error"
    engine = server.server.config.app.state.engine
    wait_until(lambda: not engine.rows)  # the last answer can arrive before the engine drops the rows
    assert not engine.rows
