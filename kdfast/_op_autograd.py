"""Autograd registered on the ops themselves (torch.library.register_autograd), for the ops whose
gradient needs no buffer handed over from forward: torch.ops.kdfast.pairwise_distances and its
backward op are differentiable on their own, to any order.

The forward-and-gradient ops (softmax_kl, feature_match, rkd) write their gradient in forward; the
autograd that hands that buffer over is FusedLossFunction (kdfast/_fused_autograd.py), the way the
loss functions call them. They get no registration here: a Python autograd kernel would run on
every call of the op, also inside FusedLossFunction, and cost more than the op itself on small
losses.
"""
import torch

from kdfast import reference

_ops = torch.ops.kdfast


def _pairwise_setup(ctx, inputs, output):
    x, squared, normalize, eps = inputs
    ctx.save_for_backward(x)
    ctx.args = (squared, normalize, eps)


def _pairwise_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    # Under create_graph=True the backward op records its own node (registered below), so the
    # gradient can be differentiated again.
    return _ops.pairwise_distances_backward(grad, x, *ctx.args), None, None, None


torch.library.register_autograd("kdfast::pairwise_distances", _pairwise_backward, setup_context=_pairwise_setup)


def _pairwise_backward_setup(ctx, inputs, output):
    grad, x, squared, normalize, eps = inputs
    ctx.save_for_backward(grad, x)
    ctx.args = (squared, normalize, eps)


def _pairwise_backward_backward(ctx, v):
    """pairwise_distances_backward(grad, x) = J(x)^T grad, J the Jacobian of the distances: its
    vector-Jacobian products are J(x) v (for grad) and the second derivative of <grad, d(x)> along
    v (for x). The fused backward kernel has no derivative of its own, so both come from the
    reference formulation, which autograd differentiates (to any order: create_graph is passed on)."""
    grad, x = ctx.saved_tensors
    need_grad, need_x = ctx.needs_input_grad[:2]
    squared, normalize, eps = ctx.args
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        xr = x if create and x.requires_grad else x.detach().requires_grad_()
        gr = grad if create and grad.requires_grad else grad.detach().requires_grad_()
        d = reference.pairwise_distances(xr, squared=squared, normalize=normalize, eps=eps)
        (gx,) = torch.autograd.grad(d, xr, gr.to(d.dtype), create_graph=True)
        inputs = [t for t, need in ((gr, need_grad), (xr, need_x)) if need]
        found = iter(torch.autograd.grad(gx, inputs, v.to(gx.dtype), create_graph=create, allow_unused=True))
    return (next(found) if need_grad else None, next(found) if need_x else None, None, None, None)


torch.library.register_autograd("kdfast::pairwise_distances_backward", _pairwise_backward_backward,
                                setup_context=_pairwise_backward_setup)
