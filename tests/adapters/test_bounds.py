"""all_finite: the finiteness check on every adapter load's path (the store's tensors, the engine's packs)."""

import pytest
import torch

from adapters.bounds import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [1, 7, 33, 4096, 16 * 4096 + 5])
def test_one_nan_or_infinity_anywhere_is_found(dtype: torch.dtype, size: int) -> None:
    clean = torch.randn(size).to(dtype)
    assert all_finite(clean) and all_finite(clean.view(1, -1).T)
    for at in sorted({0, size // 2, size - 1}):
        for bad in (float("nan"), float("inf"), float("-inf")):
            tensor = clean.clone()
            tensor[at] = bad
            assert not all_finite(tensor), (at, bad)
            assert not all_finite(tensor.view(1, -1).T), (at, bad)  # strided as a transposed B


def test_an_empty_tensor_is_finite_and_the_largest_values_are() -> None:
    assert all_finite(torch.empty(0, 4))
    assert all_finite(torch.tensor([torch.finfo(torch.bfloat16).max, torch.finfo(torch.bfloat16).min]))
