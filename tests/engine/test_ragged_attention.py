"""The ragged-batch attention (decode tokens and prefill chunks of several sequences in one flat batch, each
over its own KV cache row): the Triton kernel and the torch fallback against a naive float64 softmax, on
caches whose positions outside the valid prefixes hold stale values or NaN. With CUDA the kernel runs on the
device; without, under Triton's CPU interpreter (so shapes stay small)."""

from dataclasses import dataclass

import pytest
import torch

from server.engine.kernels.attention import (
    MIN_SPLIT_POSITIONS,
    SEARCH,
    AttentionConfig,
    OutputShrink,
    choose_config,
    launch,
)
from server.engine.kernels.attention import ragged_attention as triton_attention
from server.engine.ragged_attention import ragged_attention as torch_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Small tiles so that the interpreter's short sequences still span several query blocks and KV tiles.
SMALL = AttentionConfig(block_m=16, block_n=16, splits=1)
SPLIT = AttentionConfig(block_m=32, block_n=16, splits=4)  # flash-decoding path: partials, then the merge


@dataclass
class Step:
    q: torch.Tensor  # [N, Hq, D]; tokens past the last sequence are NaN
    k_cache: torch.Tensor  # [R, Hkv, S, D]
    v_cache: torch.Tensor
    query_start: torch.Tensor  # [num_seqs + 1] int32
    seq_rows: torch.Tensor  # [num_seqs] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    scale: float

    def args(self) -> tuple:
        return self.q, self.k_cache, self.v_cache, self.query_start, self.seq_rows, self.seq_lens, self.scale


def make_step(
    seqs: list[tuple[int, int]],
    q_heads: int,
    kv_heads: int,
    head_d: int,
    dtype: torch.dtype = torch.float32,
    stale: float | None = None,
    pad_tokens: int = 3,
    max_len: int = 48,
) -> Step:
    """seqs: (new tokens, KV length after the step) per sequence; (0, 0) is a padding sequence, on the dummy
    row. Cache rows are shuffled (sequence s is not row s) and there is a spare row besides the dummy one.
    Positions outside the valid prefixes hold `stale` (NaN, inf) or, by default, large random values that
    would visibly change any output that read them."""
    torch.manual_seed(0)
    rows = len(seqs) + 2  # a spare row and the dummy row, the last
    shape = (rows, kv_heads, max_len, head_d)
    if stale is None:
        k_cache, v_cache = torch.randn(shape) * 100, torch.randn(shape) * 100
    else:
        k_cache, v_cache = torch.full(shape, stale), torch.full(shape, stale)
    order = torch.randperm(rows - 1).tolist()
    seq_rows = [rows - 1 if q_len == 0 else order[s] for s, (q_len, _) in enumerate(seqs)]
    for row, (_, seq_len) in zip(seq_rows, seqs, strict=True):
        k_cache[row, :, :seq_len] = torch.randn(kv_heads, seq_len, head_d)
        v_cache[row, :, :seq_len] = torch.randn(kv_heads, seq_len, head_d)
    query_start = [0]
    for q_len, _ in seqs:
        query_start.append(query_start[-1] + q_len)
    q = torch.randn(query_start[-1] + pad_tokens, q_heads, head_d)
    q[query_start[-1] :] = float("nan")  # the bucket's padding tokens: never read
    as_int = {"dtype": torch.int32, "device": DEVICE}
    return Step(
        q.to(DEVICE, dtype),
        k_cache.to(DEVICE, dtype),
        v_cache.to(DEVICE, dtype),
        torch.tensor(query_start, **as_int),
        torch.tensor(seq_rows, **as_int),
        torch.tensor([seq_len for _, seq_len in seqs], **as_int),
        head_d**-0.5,
    )


def naive_attention(step: Step, sliding_window: int | None) -> torch.Tensor:
    """Token by token and head by head, in float64, reading only the positions each token sees."""
    q, k_cache, v_cache = step.q.double(), step.k_cache.double(), step.v_cache.double()
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros_like(q)
    starts, rows, lens = step.query_start.tolist(), step.seq_rows.tolist(), step.seq_lens.tolist()
    for s, (row, seq_len) in enumerate(zip(rows, lens, strict=True)):
        q_len = starts[s + 1] - starts[s]
        for j in range(q_len):
            token, pos = starts[s] + j, seq_len - q_len + j
            seen = [k for k in range(pos + 1) if sliding_window is None or pos - k < sliding_window]
            for h in range(q.shape[1]):
                keys, values = k_cache[row, h // group, seen], v_cache[row, h // group, seen]  # [L, D]
                weights = torch.softmax(keys @ q[token, h] * step.scale, 0)
                out[token, h] = weights @ values
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    # bf16: the inputs are the same, but the kernel rounds the softmax weights to bf16 for the P @ V product
    # and the output to bf16 (2**-8 relative): a few roundings of O(1) values.
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


def check(step: Step, sliding_window: int | None, configs: list[AttentionConfig | None]) -> None:
    """The fallback against the naive reference, then the kernel in each configuration (None: the one it
    picks) against both. Padding tokens' outputs are zero in a new output."""
    tokens = int(step.query_start[-1])
    expected = naive_attention(step, sliding_window)[:tokens]
    tol = tolerance(step.q.dtype)
    fallback = torch_attention(*step.args(), sliding_window)
    assert fallback.dtype == step.q.dtype
    assert torch.allclose(fallback[:tokens].double(), expected, **tol)
    assert torch.all(fallback[tokens:] == 0)
    for config in configs:
        if config is None:
            got = triton_attention(*step.args(), sliding_window)
        else:
            got = launch(*step.args(), sliding_window, None, config)
        assert got.dtype == step.q.dtype
        assert torch.isfinite(got).all(), config
        assert torch.allclose(got[:tokens].double(), expected, **tol), config
        assert torch.allclose(got[:tokens].float(), fallback[:tokens].float(), **tol), config
        assert torch.all(got[tokens:] == 0), config


# (new tokens, KV length): decodes over 1..40 positions, prefills of a first chunk (KV length = new tokens)
# and of a later chunk (earlier context), zero-token padding sequences in the middle and at the end.
MIXED = [(1, 1), (1, 40), (0, 0), (7, 7), (5, 25), (1, 17), (18, 18), (0, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_gqa(dtype) -> None:
    step = make_step(MIXED, q_heads=4, kv_heads=2, head_d=32, dtype=dtype)
    check(step, None, [SMALL, SPLIT, None] if dtype == torch.float32 else [SMALL, SPLIT])


def test_multi_head_attention() -> None:
    step = make_step([(1, 33), (9, 9), (3, 20), (1, 2)], q_heads=2, kv_heads=2, head_d=16)
    check(step, None, [SMALL, SPLIT])


def test_more_sequences_than_one_search_load() -> None:
    """Past SEARCH sequences each program counts the sequence starts in several loads: the owners of blocks in
    the first, a later and the last load's sequences (zero-token ones among them) all found."""
    seqs = [(0, 0) if s % 37 == 36 else (1 + (s % 3 == 0) * 2, 5 + s % 11) for s in range(SEARCH.value + 20)]
    step = make_step(seqs, q_heads=2, kv_heads=1, head_d=16, max_len=16)
    check(step, None, [SMALL])


def test_sliding_window() -> None:
    """A window of 8: decodes and chunks past it (their first tiles partly or wholly outside), one within."""
    step = make_step([(1, 30), (12, 12), (6, 26), (1, 5)], q_heads=4, kv_heads=2, head_d=16)
    check(step, 8, [SMALL, SPLIT])


def test_odd_group_and_head_dim() -> None:
    """3 query heads per KV head (BLOCK_M rows that are not a whole number of tokens) and D = 24 (padded)."""
    step = make_step([(1, 12), (6, 20), (0, 0), (2, 2)], q_heads=6, kv_heads=2, head_d=24)
    check(step, None, [SMALL])


@pytest.mark.parametrize("stale", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_stale_positions_are_never_read(stale) -> None:
    """NaN (or inf) everywhere but the valid prefixes, the dummy and spare rows wholly: a single read of one,
    even weighted by 0, would turn outputs NaN."""
    step = make_step(MIXED, q_heads=4, kv_heads=2, head_d=16, stale=stale)
    check(step, None, [SMALL, SPLIT])
    check(step, 8, [SMALL])


def test_given_output_is_written_in_place() -> None:
    step = make_step([(1, 9), (4, 4)], q_heads=2, kv_heads=1, head_d=16, pad_tokens=2)
    expected = naive_attention(step, None)[:5]
    for attention in (torch_attention, triton_attention):
        out = torch.full_like(step.q, 7.0)
        assert attention(*step.args(), None, out) is out
        assert torch.allclose(out[:5].double(), expected, atol=2e-5, rtol=2e-5)
        assert torch.all(out[5:] == 7)  # padding tokens untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_makes_the_outputs_lora_shrink(dtype) -> None:
    """The merge kernel's shrink of the output it writes (o_proj's, OutputShrink): summed over its chunks (one a
    head), each token's output as written @ its slot's A rows up to its rank; rows of rank 0 and padding tokens
    zero; the output itself unchanged."""
    step = make_step(MIXED, q_heads=4, kv_heads=2, head_d=32, dtype=dtype)
    tokens, n = int(step.query_start[-1]), step.q.shape[0]
    torch.manual_seed(1)
    a = torch.randn(5, 8, 4 * 32).to(DEVICE, dtype)  # [S+1, R, Hq * D]: four slots and the empty one
    slots = torch.randint(0, 5, (n,), device=DEVICE)
    ranks = torch.tensor([8, 3, 0, 8, 1, 5, 8, 2, 8, 8, 4, 8, 6, 8, 7, 8], dtype=torch.int32)[slots.cpu()].to(DEVICE)
    shrink = OutputShrink.of(a, slots, ranks, q_heads=4)
    assert shrink.partial.shape == (1, n, 4, 16)
    shrink.partial.fill_(float("nan"))  # every chunk of every row written, none past the heads read
    plain = launch(*step.args(), None, None, SPLIT)
    got = launch(*step.args(), None, None, SPLIT, shrink)
    assert torch.equal(got, plain)
    shrunk = shrink.partial[0, :, :4].sum(1)  # [N, R_PAD]
    flat = got.reshape(n, -1).float()
    for row in range(n):
        rank = int(ranks[row])
        expected = torch.zeros(16)
        if row < tokens:
            expected[:rank] = (a[slots[row], :rank].float() @ flat[row]).cpu()
        assert torch.allclose(shrunk[row].cpu(), expected, atol=1e-4, rtol=1e-4), row
    with pytest.raises(ValueError, match="merge kernel"):
        launch(*step.args(), None, None, SMALL, shrink)


def test_config_depends_on_static_shapes_only() -> None:
    """Decode buckets split long KV ranges when they have few sequences, as far as the span lets each split have
    MIN_SPLIT_POSITIONS; prefill buckets take wide blocks."""
    cpu = torch.device("cpu")
    assert choose_config(1, 1, 32, 8, cpu, 4096).splits == 16  # 8 programs: far from filling the GPU
    assert choose_config(1, 1, 32, 8, cpu, 4 * MIN_SPLIT_POSITIONS).splits == 4  # but no split of fewer positions
    assert choose_config(1, 1, 32, 8, cpu, MIN_SPLIT_POSITIONS - 1).splits == 1
    assert choose_config(8, 8, 32, 8, cpu, 4096).splits == 4  # 64 programs: two an SM after 4 splits
    assert choose_config(32, 32, 32, 8, cpu, 4096).splits == 1
    assert choose_config(512, 512, 32, 8, cpu, 4096) == AttentionConfig(block_m=16, block_n=64, splits=1)
    assert choose_config(1024, 2, 32, 8, cpu, 4096).block_m == 64
    assert choose_config(768, 257, 32, 8, cpu, 4096).block_m == 64  # 256 decodes and a 512-token chunk


@pytest.mark.gpu
def test_cuda_graph_replays_other_batches_of_the_bucket() -> None:
    """Captured once for a bucket (tokens, sequences), replayed with other lengths, rows and splits of the
    tokens: no host sync, no shape from the data."""
    q_heads, kv_heads, head_d, tokens, num_seqs = 32, 8, 128, 640, 8
    k_cache = torch.randn(num_seqs + 1, kv_heads, 2048, head_d, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(tokens, q_heads, head_d, device=DEVICE, dtype=torch.bfloat16)
    query_start = torch.zeros(num_seqs + 1, dtype=torch.int32, device=DEVICE)
    seq_rows = torch.zeros(num_seqs, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.ones(num_seqs, dtype=torch.int32, device=DEVICE)
    out = torch.zeros_like(q)
    args = (q, k_cache, v_cache, query_start, seq_rows, seq_lens, head_d**-0.5)
    triton_attention(*args, None, out)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_attention(*args, None, out)
    batches = [
        ([1, 1, 1, 1, 1, 512, 100, 0], [2000, 7, 1, 300, 1024, 512, 1100, 0]),  # decodes and chunks
        ([1] * 8, [2048, 1, 5, 1999, 64, 65, 128, 700]),  # decodes only
        ([600, 0, 0, 0, 0, 0, 0, 0], [1600, 0, 0, 0, 0, 0, 0, 0]),  # one chunk, the rest padding
    ]
    for q_lens, lens in batches:
        q.normal_()
        query_start.copy_(torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()]))
        seq_rows.copy_(torch.randperm(num_seqs))
        seq_lens.copy_(torch.tensor(lens))
        out.zero_()
        graph.replay()
        expected = torch_attention(*args)
        assert torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
