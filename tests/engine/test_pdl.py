"""CUDA (sm_90+) only: a decoder layer's kernels launched as programmatic dependents (pdl.py) start while the
kernel before them runs, and still read what it wrote. A norm with its LoRA shrink, an NF4 kernel, then the gated
activation with its shrink, as an MLP runs them, back to back in a CUDA graph on fresh inputs, must give what they
give with the GPU idle between launches."""

import pytest
import torch
from enginekit import nf4_layer
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from server.engine.kernels import pdl
from server.engine.kernels.activation import silu_mul_shrink
from server.engine.kernels.epilogue import LoraEpilogue
from server.engine.kernels.nf4_mma import nf4_mma
from server.engine.kernels.nf4_wide import nf4_wide_finished
from server.engine.kernels.rmsnorm import FusedRMSNorm

pytestmark = pytest.mark.gpu
K, RANK, SLOTS = 4096, 16, 4


# 1 row: nf4_mma (its LoRA epilogue reads the shrink's sums, slots and ranks); 40 rows: nf4_wide, one part of K
# over a gate/up-wide weight (it finishes the projection: the same sums launch to launch)
@pytest.mark.parametrize(("rows", "n"), [(1, 6144), (40, 28672)])
def test_each_kernel_reads_what_the_kernel_before_it_wrote(rows: int, n: int) -> None:
    if not pdl.supported(torch.cuda.current_device()):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    torch.manual_seed(0)
    layer, _ = nf4_layer(n, K, True, False, "cuda")
    norm = FusedRMSNorm(LlamaRMSNorm(K).cuda().bfloat16())
    store_a = (torch.randn(SLOTS + 1, RANK, K, device="cuda") / 8).bfloat16()
    store_b = (torch.randn(SLOTS + 1, RANK, n, device="cuda") / 8).bfloat16()
    down_a = (torch.randn(SLOTS + 1, RANK, n // 2, device="cuda") / 8).bfloat16()
    slot = torch.arange(rows, device="cuda") % (SLOTS + 1)
    ranks = torch.full((rows,), RANK, dtype=torch.int32, device="cuda")
    weight = [(layer.weight, layer.weight.quant_state, None)]

    def mlp(x: torch.Tensor, idle: bool) -> list[torch.Tensor]:
        def then() -> None:
            if idle:
                torch.cuda.synchronize()

        normed, (partial, chunks) = norm.forward_and_shrink(x, store_a, slot, ranks, 1)
        then()
        if rows == 1:
            epilogue = LoraEpilogue(partial[0], chunks, store_b, slot, ranks)
            y = nf4_mma(normed, layer.weight, layer.weight.quant_state, None, epilogue)
        else:
            y = nf4_wide_finished(normed, weight, LoraEpilogue(partial, chunks, store_b, slot, ranks))
            assert y is not None, "the launch takes K in one part"
        then()
        activated, (down_partial, down_chunks) = silu_mul_shrink(y[:, : n // 2], y[:, n // 2 :], down_a, slot, ranks)
        return [y, activated, down_partial[:, :, :down_chunks]]  # chunks past those: not written

    # In a CUDA graph, as the engine's decode steps run, the inputs' kernels run back to back on the GPU, each
    # input's outputs landing in memory the last one's had: a kernel reading its input early reads the last input's
    xs = [torch.randn(rows, K, device="cuda").bfloat16() * (i + 1) for i in range(16)]
    mlp(xs[0], idle=True)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = [mlp(x, idle=False) for x in xs]
    graph.replay()
    expected = [mlp(x, idle=True) for x in xs]
    assert all(torch.equal(a, b) for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True))
