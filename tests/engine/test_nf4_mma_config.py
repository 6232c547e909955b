"""nf4_mma's launch configurations, checked without a GPU: the shared memory each asks for against what a CTA may
have on the GPUs it runs on, and the fallbacks where it does not fit."""

import pytest

from server.engine.kernels.nf4_mma import _STATIC_BYTES, btile_bytes, fit_shared, pick_config, pick_launch, staged_bytes

H200 = 232448  # shared memory a CTA may have (bytes): H100/H200
A100 = 166912
RTX = 101376  # sm_86 / sm_89
# Llama-3-8B's four launches a layer: (n, k)
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 32])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_the_picked_configurations_fit_the_h200_with_their_b_rows_at_rank_16(rows, n, k) -> None:
    row_tiles, warps, group, stages, _, lut_entry = pick_config(n, k, rows)
    warps, group, x_tiles = pick_launch(k, rows, row_tiles, warps, group)
    btile = btile_bytes(rows, 16, row_tiles)
    assert fit_shared(warps, group, row_tiles, x_tiles, stages, lut_entry, btile, H200) == (
        warps, stages, lut_entry, btile)  # fmt: skip
    assert staged_bytes(warps, group, row_tiles, x_tiles, stages, lut_entry) + btile + _STATIC_BYTES <= H200


@pytest.mark.parametrize("optin", [H200, A100, RTX])
@pytest.mark.parametrize("rows", [1, 8, 16, 32, 64])
@pytest.mark.parametrize("rank", [16, 32, 64])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_every_launch_fits_what_a_cta_may_have(optin, rows, rank, n, k) -> None:
    """On smaller GPUs too, at any rank: the B rows leave shared memory first, then the 64 KB table and stages."""
    row_tiles, warps, group, stages, _, lut_entry = pick_config(n, k, rows)
    warps, group, x_tiles = pick_launch(k, rows, row_tiles, warps, group)
    btile = btile_bytes(rows, rank, row_tiles)
    fitted = fit_shared(warps, group, row_tiles, x_tiles, stages, lut_entry, btile, optin)
    fit_warps, fit_stages, fit_lut, fit_btile = fitted
    assert staged_bytes(fit_warps, group, row_tiles, x_tiles, fit_stages, fit_lut) + fit_btile + _STATIC_BYTES <= optin
    assert fit_btile in (0, btile) and fit_warps <= warps and fit_stages <= stages
    if fit_btile == 0 and btile:  # the B rows left because the rest alone would not fit beside them
        assert staged_bytes(warps, group, row_tiles, x_tiles, stages, lut_entry) + btile + _STATIC_BYTES > optin


def test_a_launch_that_cannot_fit_says_so() -> None:
    with pytest.raises(ValueError, match="shared memory"):
        fit_shared(16, 4, 2, 8, 3, 256, 0, 48 * 1024)


def test_the_warps_split_k_in_groups_that_divide_it() -> None:
    """K = 576 (9 blocks: the embedded model's hidden size) takes single blocks over 8 warps, unevenly; 64 rows keep
    the warps' partial sums within 40 KB."""
    assert pick_launch(576, 1, 1, 8, 4) == (8, 1, 1)
    assert pick_launch(4096, 1, 1, 8, 4) == (8, 4, 1)
    assert pick_launch(4096, 64, 2, 8, 2) == (4, 2, 8)
    with pytest.raises(ValueError, match="block"):
        pick_launch(32, 1, 1, 8, 4)
