"""The autograd layer: every torch.ops.kdfast op with a derivative differentiable on its own
(kdfast/_op_autograd.py: gradcheck in float64, to third order for the pairwise ops, opcheck with
inputs that require grad), and the buffer-ownership rules of the fused losses
(kdfast/_fused_autograd.py [B1]-[B7])."""
import pytest
import torch

import kdfast

from conftest import needs_native, same_bits

pytestmark = needs_native

PAIRWISE_FLAGS = [(False, True), (True, False), (False, False), (True, True)]
FLAG_IDS = ["dist_psi", "sq", "dist", "sq_psi"]


def _points(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("squared,normalize", PAIRWISE_FLAGS, ids=FLAG_IDS)
def test_gradcheck_pairwise_distances_op(squared, normalize):
    x = _points(2, 5, 3).requires_grad_()

    def op(x):
        return torch.ops.kdfast.pairwise_distances(x, squared, normalize, 1e-12)
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))


@pytest.mark.parametrize("squared,normalize", PAIRWISE_FLAGS, ids=FLAG_IDS)
def test_gradcheck_pairwise_distances_backward_op(squared, normalize):
    """The backward op is linear in grad and nonlinear in x: both derivatives, and one more order."""
    g, x = _points(2, 5, 5, seed=1).requires_grad_(), _points(2, 5, 3).requires_grad_()

    def op(g, x):
        return torch.ops.kdfast.pairwise_distances_backward(g, x, squared, normalize, 1e-12)
    assert torch.autograd.gradcheck(op, (g, x))
    assert torch.autograd.gradgradcheck(op, (g, x))


def test_pairwise_backward_op_matches_reference_second_order():
    """d/dx and d/dgrad of the backward op against autograd through the reference."""
    g0, x0, v = _points(3, 6, 6, seed=2), _points(3, 6, 4, seed=3), _points(3, 6, 4, seed=4)
    g, x = g0.clone().requires_grad_(), x0.clone().requires_grad_()
    out = torch.ops.kdfast.pairwise_distances_backward(g, x, False, True, 1e-12)
    got = torch.autograd.grad(out, (g, x), v)
    gr, xr = g0.clone().requires_grad_(), x0.clone().requires_grad_()
    d = kdfast.reference.pairwise_distances(xr)
    (gx,) = torch.autograd.grad(d, xr, gr, create_graph=True)
    torch.testing.assert_close(out, gx.detach(), rtol=1e-10, atol=1e-12)
    want = torch.autograd.grad(gx, (gr, xr), v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_pairwise_ops_requiring_grad(dtype):
    """opcheck with inputs that require grad, so that its autograd-registration check applies."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(2, 5, 3, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 5, 5, dtype=acc, requires_grad=True)
    for squared, normalize in PAIRWISE_FLAGS:
        torch.library.opcheck(torch.ops.kdfast.pairwise_distances.default, (x, squared, normalize, 1e-12))
        torch.library.opcheck(torch.ops.kdfast.pairwise_distances_backward.default, (g, x, squared, normalize, 1e-12))


# the forward-and-gradient ops: (loss per row / group, grad_student, grad_teacher); the weight of a
# row is 0 in each case (softmax_kl and feature_match return loss 0 there, rkd its loss)
def _row_weight():
    return torch.tensor([1.0, 0.0, -2.5], dtype=torch.float64)


FORWARD_AND_GRADIENT_OPS = {
    "softmax_kl": lambda s, t, flags=(False, False): torch.ops.kdfast.softmax_kl(s, t, 0.5, 0, 0.0, _row_weight(), *flags),
    "feature_match_sq": lambda s, t, flags=(False, False): torch.ops.kdfast.feature_match(
        s, t, False, 1e-8, _row_weight(), *flags),
    "feature_match_cos": lambda s, t, flags=(False, False): torch.ops.kdfast.feature_match(
        s, t, True, 1e-8, _row_weight(), *flags),
}
RKD_WEIGHTS = [(1.0, 0.0), (0.0, 1.0), (25.0, 50.0)]


@pytest.mark.parametrize("name", list(FORWARD_AND_GRADIENT_OPS))
def test_gradcheck_row_ops(name):
    """The loss rows of softmax_kl / feature_match, differentiated on their own, to second order;
    their gradient outputs are not differentiable (marked so, never a silent zero)."""
    op = FORWARD_AND_GRADIENT_OPS[name]
    s, t = _points(3, 7, seed=5).requires_grad_(), _points(3, 7, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: op(s, t)[0], (s, t))
    assert torch.autograd.gradgradcheck(lambda s, t: op(s, t)[0], (s, t))
    loss, gs, gt = op(s, t, (True, True))
    assert loss.requires_grad and not gs.requires_grad and not gt.requires_grad


@pytest.mark.parametrize("dw,aw", RKD_WEIGHTS, ids=["distance", "angle", "both"])
def test_gradcheck_rkd_op(dw, aw):
    s, t = _points(2, 6, 3, seed=7).requires_grad_(), _points(2, 6, 4, seed=8).requires_grad_()
    w = torch.tensor([0.5, 0.0], dtype=torch.float64)  # a group of weight 0 still has its loss

    def op(s, t):
        return torch.ops.kdfast.rkd(s, t, dw, aw, 0.7, False, 1e-12, w, False, False)[0]
    assert torch.autograd.gradcheck(op, (s, t))
    with pytest.raises(RuntimeError, match="(?i)double backward|create_graph"):
        torch.autograd.grad(op(s, t).sum(), s, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_forward_and_gradient_ops_requiring_grad(dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s, t = torch.randn(3, 9, dtype=dtype, requires_grad=True), torch.randn(3, 9, dtype=dtype, requires_grad=True)
    w = torch.tensor([1.0, 0.0, 0.5], dtype=acc)
    for flags in ((False, False), (True, True)):
        torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, (s, t, 0.5, 0, 0.0, w, *flags))
        for cosine in (False, True):
            torch.library.opcheck(torch.ops.kdfast.feature_match.default, (s, t, cosine, 1e-8, w, *flags))
        a, b = torch.randn(2, 5, 3, dtype=dtype, requires_grad=True), torch.randn(2, 5, 4, dtype=dtype)
        torch.library.opcheck(torch.ops.kdfast.rkd.default, (a, b, 25.0, 50.0, 1.0, False, 1e-12, w[:2], *flags))


# ----------------------------------------------------------------------------- buffer ownership


class _GradientAddresses(torch.utils._python_dispatch.TorchDispatchMode):
    """The addresses of the gradients every fused op dispatched inside the block wrote (addresses
    only: a reference kept here would make AccumulateGrad copy the buffer)."""

    def __init__(self):
        super().__init__()
        self.addresses = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "kdfast" and func._opname in ("softmax_kl", "feature_match", "rkd"):
            self.addresses.append((out[1].data_ptr(), out[2].data_ptr()))
        return out


LOSSES = {
    "kd_loss": lambda s, t: kdfast.kd_loss(s, t),
    "cosine_loss": lambda s, t: kdfast.cosine_loss(s, t),
    "rkd_loss": lambda s, t: kdfast.rkd_loss(s, t),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_buffer_is_handed_over_without_a_copy(name):
    """[B1], [B2]: the gradient the forward's op wrote becomes .grad itself."""
    s, t = torch.randn(8, 40, requires_grad=True), torch.randn(8, 40, requires_grad=True)
    with _GradientAddresses() as seen:
        loss = LOSSES[name](s, t)
    loss.backward()
    assert seen.addresses == [(s.grad.data_ptr(), t.grad.data_ptr())]


@pytest.mark.parametrize("name", list(LOSSES))
def test_second_backward_recomputes_and_never_reads_the_handed_over_buffer(name):
    """[B2], [B4]: after the handover the buffer is .grad; changing it (as an optimizer step or
    zero_grad(set_to_none=False) does) must not change what a second backward returns."""
    s, t = torch.randn(8, 40, requires_grad=True), torch.randn(8, 40)
    loss = LOSSES[name](s, t)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    s.grad.fill_(123.0)  # the handed-over buffer, changed in place
    (g2,) = torch.autograd.grad(loss, s, retain_graph=True)
    assert same_bits(g2, first)
    (g3,) = torch.autograd.grad(loss * -0.5, s)  # a third pass, another upstream factor
    torch.testing.assert_close(g3, first * -0.5, rtol=1e-6, atol=0)
