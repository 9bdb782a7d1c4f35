"""The KV pool (qwen2vl/kv.py): blocks taken, shared, cached and evicted by reference; storage formats against their
definitions; attention through block tables against plain attention over dense keys (torch's SDPA on tensors this
test builds itself), and the native kernels against that reference at every ISA level."""

import pytest
import torch

from qwen2vl import kv
from qwen2vl.kv import BLOCK, BlockTable, KVPool, KVView, PoolFull, block_keys


def pool_of(blocks: int, fmt: str = "float32", layers: int = 2, heads: int = 2, dim: int = 16) -> KVPool:
    return KVPool(layers, heads, dim, blocks * KVPool.block_bytes(layers, heads, dim, fmt), fmt)


# ---------------------------------------------------------------------------------------------------------------
# Blocks by reference


def test_blocks_are_taken_lowest_first_and_come_back():
    pool = pool_of(4)
    assert pool.num_blocks == 4 and pool.available == 4
    assert pool.reserve(3) and pool.available == 1 and not pool.reserve(2)
    table = BlockTable([], reserved=3)
    table.grow(pool, 2 * BLOCK + 1)
    assert table.blocks == [0, 1, 2] and table.reserved == 0 and pool.reserved == 0
    with pytest.raises(RuntimeError, match="outgrew"):
        table.grow(pool, 3 * BLOCK + 1)
    table.free(pool)
    assert pool.available == 4 and pool.bytes == 0 and pool.free == [0, 1, 2, 3]


def test_a_request_larger_than_the_pool_is_refused():
    pool = pool_of(4)
    with pytest.raises(PoolFull, match="needs 5 KV blocks"):
        pool.reserve(5)


def test_keyed_blocks_are_shared_cached_and_evicted_least_recent_first():
    pool = pool_of(3)
    ids = list(range(3 * BLOCK))
    keys = block_keys(ids, [])
    assert pool.reserve(3)
    a = BlockTable([], reserved=3)
    a.grow(pool, 3 * BLOCK)
    pool.register(a.blocks, keys)
    # a second sequence finds the blocks while the first still holds them: the same blocks, referenced twice
    shared = pool.lookup(keys, 2 * BLOCK + 5)
    assert shared == a.blocks[:2] and pool.refs[:3] == [2, 2, 1]
    a.free(pool)
    assert list(pool.idle) == [2] and pool.used_bytes == 2 * pool.block_bytes(2, 2, 16, "float32")
    pool.release(shared)
    assert list(pool.idle) == [2, 1, 0]  # a prefix outlives its continuations
    assert pool.hit_tokens == 2 * BLOCK
    # taking room evicts the least recent idle block first, forgetting its key
    assert pool.reserve(1)
    assert pool.take() == 2 and keys[2] not in pool.block_of and pool.lookup(keys, 3 * BLOCK) == [0, 1]
    pool.clear()  # idle blocks are forgotten; blocks in use are not
    assert pool.key_of.keys() == {0, 1} and pool.refs[:3] == [1, 1, 1]


def test_a_key_held_by_another_block_keeps_that_one():
    pool = pool_of(2)
    keys = block_keys(list(range(BLOCK)), [])
    pool.reserve(2)
    first, second = pool.take(), pool.take()
    pool.register([first], keys)
    pool.register([second], keys)
    pool.release([first, second])
    assert pool.block_of[keys[0]] == first and second in pool.free


def test_block_keys_chain_the_prefix_and_the_images():
    ids = list(range(5 * BLOCK))
    keys = block_keys(ids, [])
    other = block_keys(ids, [(20, 40, b"\x01" * 32)])  # an image in block 1 changes blocks 1.. but not block 0
    assert len(keys) == 5 and other[0] == keys[0] and all(o != k for o, k in zip(other[1:], keys[1:]))
    changed = ids.copy()
    changed[BLOCK * 3] += 1
    assert block_keys(changed, [])[:3] == keys[:3] and block_keys(changed, [])[3] != keys[3]


# ---------------------------------------------------------------------------------------------------------------
# Storage


@pytest.mark.parametrize("fmt", ["float32", "float16", "uint8"])
def test_stored_keys_and_values_read_back_as_their_format_defines(fmt):
    g = torch.Generator().manual_seed(0)
    pool = pool_of(8, fmt, dim=32)
    blocks = torch.tensor([5, 2, 7])
    table = BlockTable(blocks.tolist(), 0, 0)
    k, v = torch.randn(1, 40, 2, 32, generator=g) * 3, torch.randn(1, 40, 2, 32, generator=g)
    view = KVView(pool, torch.tensor([table.blocks], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), 40)
    view.write(1, k, v)
    gk, gv = pool.gather(1, blocks, 40)  # (Hkv, S, D)
    want_k, want_v = k[0].transpose(0, 1), v[0].transpose(0, 1)
    if fmt == "float32":
        assert torch.equal(gk, want_k) and torch.equal(gv, want_v)
    elif fmt == "float16":
        assert torch.equal(gk, want_k.half().float()) and torch.equal(gv, want_v.half().float())
    else:  # per token and head: levels of (max - min) / 255, an error of at most half a step
        for got, want in ((gk, want_k), (gv, want_v)):
            step = (want.amax(-1, keepdim=True) - want.amin(-1, keepdim=True)) / 255
            assert ((got - want).abs() <= step * 0.5 + 1e-6).all()


# ---------------------------------------------------------------------------------------------------------------
# Attention through block tables


def filled_pool(fmt: str, lengths: list[int], n: int, seed: int = 0, heads: int = 2, dim: int = 64):
    """A pool whose rows hold `lengths[b] + n` keys in scattered blocks: (pool, tables, dense k, dense v), the dense
    keys and values as stored (read back through `gather`, so in the format's precision)."""
    g = torch.Generator().manual_seed(seed)
    pool = pool_of(sum(kv.blocks_for(L + n) for L in lengths) + 8, fmt, layers=2, heads=heads, dim=dim)
    order = torch.randperm(pool.num_blocks, generator=g).tolist()
    T = max(kv.blocks_for(L + n) for L in lengths)
    tables = torch.zeros(len(lengths), T, dtype=torch.int32)
    dense = []
    for b, L in enumerate(lengths):
        nb = kv.blocks_for(L + n)
        tables[b, :nb] = torch.tensor(order[:nb], dtype=torch.int32)
        order = order[nb:]
        k = torch.randn(1, L + n, heads, dim, generator=g) * 2
        v = torch.randn(1, L + n, heads, dim, generator=g)
        KVView(pool, tables[b:b + 1], torch.tensor([0], dtype=torch.int32), L + n).write(1, k, v)
        dense.append(pool.gather(1, tables[b, :nb].long(), L + n))
    return pool, tables, dense


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (n, H, D) as the last n of S positions, causal, over k, v (Hkv, S, D): plain softmax(q k^T / sqrt(D)) v."""
    n, H, D = q.shape
    S, G = k.shape[1], H // k.shape[0]
    k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)  # (H, S, D)
    scores = torch.einsum("nhd,hsd->hns", q.double(), k.double()) / D ** 0.5
    mask = torch.arange(S)[None, :] > torch.arange(S - n, S)[:, None]
    p = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hns,hsd->nhd", p, v.double()).reshape(n, H * D).float()


@pytest.mark.parametrize("fmt", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("n", [1, 9])
def test_reference_attention_equals_dense_attention(fmt, n):
    lengths = [3, 40, 16]
    pool, tables, dense = filled_pool(fmt, lengths, n)
    q = torch.randn(len(lengths), n, 6, 64, generator=torch.Generator().manual_seed(1))
    view = KVView(pool, tables, torch.tensor(lengths, dtype=torch.int32), n)
    out = kv.attend(q, view, 1)
    for b, (k, v) in enumerate(dense):
        assert torch.allclose(out[b], dense_attention(q[b], k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("n, lengths", [(1, [0, 15, 16, 17, 300]), (1, [2000]), (37, [0]), (37, [100]),
                                        (300, [33])])
def test_native_paged_attention_equals_the_reference(native, fmt, n, lengths):
    """The native kernels (decode: one query per row, parts of the keys combined; prompt: keys unpacked from the
    blocks into the flash loop) against the dense attention, in float32 sums of another order: <= 1e-5 of scale."""
    pool, tables, dense = filled_pool(fmt, lengths, n, seed=len(lengths) + n)
    q = torch.randn(len(lengths), n, 6, 64, generator=torch.Generator().manual_seed(2))
    view = KVView(pool, tables, torch.tensor(lengths, dtype=torch.int32), n)
    got = native.attention_paged(q, pool, 1, view.tables, view.starts)
    for b, (k, v) in enumerate(dense):
        ref = dense_attention(q[b], k, v)
        assert (got[b] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_native_attention_reads_strided_queries(native):
    """Queries as the fused q/k/v projection leaves them: every row's heads strided past the k and v heads."""
    pool, tables, dense = filled_pool("float16", [20], 7)
    qkv = torch.randn(1, 7, 10, 64)
    q = qkv[:, :, :6]
    got = native.attention_paged(q, pool, 1, tables, torch.tensor([20], dtype=torch.int32))
    assert torch.allclose(got[0], dense_attention(q[0], *dense[0]), atol=1e-5)


@pytest.mark.parametrize("fmt", ["float32", "float16", "uint8"])
def test_native_store_writes_what_torch_writes(native, fmt):
    """The decode layer's store (kernels.c kv_store) gives the bytes KVPool.store gives: float16 rounded to nearest
    even (subnormals, overflow to inf included), uint8 levels and scales per token and head."""
    g = torch.Generator().manual_seed(3)
    ours, theirs = pool_of(4, fmt, dim=64), pool_of(4, fmt, dim=64)
    k = torch.randn(BLOCK, 2, 64, generator=g) * torch.logspace(-9, 5, 64)[torch.randperm(64, generator=g)]
    v = torch.randn(BLOCK, 2, 64, generator=g)
    if fmt == "float16":
        k[0, 0, :4] = torch.tensor([65519.0, 65520.0, -1e6, 2.0 ** -25])  # the largest half, overflow, half-way
    for t in range(BLOCK):
        native.kv_write(ours, 1, 3, t, k[t].contiguous(), v[t].contiguous())
    theirs.store(1, torch.full((BLOCK,), 3), torch.arange(BLOCK), k, v)
    assert torch.equal(ours.k[1, :, 3], theirs.k[1, :, 3]) and torch.equal(ours.v[1, :, 3], theirs.v[1, :, 3])
    if fmt == "uint8":
        assert torch.allclose(ours.scales[:, 1, :, 3], theirs.scales[:, 1, :, 3], rtol=1e-6, atol=0)
