"""Autograd registered on the ops themselves (torch.library.register_autograd), so that every
torch.ops.kdfast op with a derivative is differentiable on its own:

- pairwise_distances and its backward op, to any order (second and higher orders through the
  reference formulation).
- softmax_kl, feature_match, sparse_kl and rkd: their first output, the loss of each row (group), is
  differentiable with respect to student and teacher; backward calls the op again with the
  upstream gradient as row weights. Their gradient outputs are marked non-differentiable, and so is
  the loss with respect to the row weights, which only select rows (softmax_kl, feature_match and
  sparse_kl return 0 for a row of weight 0; rkd computes every group's loss); sparse_kl's ids ride
  among the parameters. create_graph=True goes through the reference row formulas (an error for
  rkd, which has none).
- scale_rows_, an in-place helper of the fused autograd, has none (torch.library registers no
  autograd for mutating ops).

The loss functions do not use the registrations of the forward-and-gradient ops: their autograd is
FusedLossFunction (kdfast/_fused_autograd.py), which hands over the gradient the forward already
wrote and calls the ops below the autograd layer (the Python autograd kernel registered here would
cost more than a small op).
"""
import torch

from kdfast import reference
from kdfast._fused_autograd import below_autograd, differentiable_grads, recompute_grads

_ops = torch.ops.kdfast


def _register_forward_and_gradient_op(name, n_params, weight_selects_rows):
    """Autograd for op(student, teacher, *params (n_params), weight, grad_student, grad_teacher,
    [grad_scale]) -> (loss per row, grad_student, grad_teacher), with respect to student and teacher."""
    op = getattr(_ops, name)

    def setup_context(ctx, inputs, output):
        student, teacher, weight = inputs[0], inputs[1], inputs[2 + n_params]
        ctx.params, ctx.n_inputs = tuple(inputs[2:2 + n_params]), len(inputs)
        ctx.save_for_backward(student, teacher, weight)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _grad_gs, _grad_gt):
        want = tuple(ctx.needs_input_grad[:2])
        nones = (None,) * (ctx.n_inputs - 2)
        if grad_loss is None or not any(want):
            return (None, None) + nones
        student, teacher, weight = ctx.saved_tensors
        if weight_selects_rows:  # a row of weight 0 has loss 0 whatever its inputs
            grad_loss = torch.where(weight != 0, grad_loss, 0)
        if torch.is_grad_enabled():  # create_graph=True: through the reference rows
            ones = torch.ones_like(weight)
            gs, gt = differentiable_grads(op, student, teacher, ones, ctx.params, grad_loss, want)
        else:
            rows = torch.ones_like(weight)
            if weight_selects_rows:
                rows = torch.where(weight != 0, rows, 0)
            gs, gt = recompute_grads(op, student, teacher, ctx.params, rows, grad_loss.to(weight.dtype), want,
                                     branch_free=True)
        return (gs if want[0] else None, gt if want[1] else None) + nones

    torch.library.register_autograd(f"kdfast::{name}", backward, setup_context=setup_context)


_register_forward_and_gradient_op("softmax_kl", 3, weight_selects_rows=True)  # (inv_temperature, divergence, mix)
_register_forward_and_gradient_op("feature_match", 2, weight_selects_rows=True)  # (cosine, eps)
_register_forward_and_gradient_op("sparse_kl", 3, weight_selects_rows=True)  # (indices, inv_temperature, tail)
_register_forward_and_gradient_op("rkd", 5, weight_selects_rows=False)  # (dw, aw, delta, squared, eps)


def _pairwise_setup(ctx, inputs, output):
    x, squared, normalize, eps = inputs
    ctx.save_for_backward(x)
    ctx.args = (squared, normalize, eps)


def _pairwise_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    # Under create_graph=True the backward op records its own node (registered below), so the
    # gradient can be differentiated again; else it runs below that layer, at no cost.
    backward_op = _ops.pairwise_distances_backward
    if torch.is_grad_enabled():
        return backward_op(grad, x, *ctx.args), None, None, None
    return below_autograd(backward_op, grad, x, *ctx.args), None, None, None


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
