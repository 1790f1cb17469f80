"""The pairwise_distances op (and its backward op) against torchdistill's pdist, batched and per
group, and torch.library.opcheck. Accuracy far from a cluster, scale invariance and non-default eps:
tests/ops/test_rkd.py (the same kernels compute rkd's distance term)."""
import pytest
import torch

import kdfast

from bench.relation import td_pdist  # torchdistill's pdist, written out once for bench and tests
from conftest import needs_native


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_pairwise_distances(squared, normalize, backend):
    x = torch.randn(7, 5, dtype=torch.float64)
    want = td_pdist(x, squared=squared)
    if normalize:
        want = want / want[want > 0].mean()
    torch.testing.assert_close(kdfast.pairwise_distances(x, squared=squared, normalize=normalize), want,
                               rtol=1e-10, atol=1e-12)
    xb = torch.randn(3, 7, 5, dtype=torch.float64)
    got = kdfast.pairwise_distances(xb, squared=squared, normalize=normalize)
    assert got.shape == (3, 7, 7)
    for b in range(3):
        torch.testing.assert_close(got[b], kdfast.pairwise_distances(xb[b], squared=squared, normalize=normalize),
                                   rtol=1e-12, atol=1e-14)
    assert (got.diagonal(dim1=-2, dim2=-1) == 0).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_pairwise_distances_ops(dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(2, 5, 3, dtype=dtype)
    for squared, normalize in ((False, True), (True, False)):
        torch.library.opcheck(torch.ops.kdfast.pairwise_distances.default, (x, squared, normalize, 1e-12))
        torch.library.opcheck(torch.ops.kdfast.pairwise_distances_backward.default,
                              (torch.randn(2, 5, 5, dtype=acc), x, squared, normalize, 1e-12))
