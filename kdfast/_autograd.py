"""Fake kernels for the compiled ops, and the autograd Function around the fused softmax-KL
(imported only when the extension is loaded).

torch.ops.kdfast.softmax_kl is a forward-and-gradient primitive: it returns each row's KL and,
when asked, row_weight[r] * dKL_r/d(input) computed in the same pass over the logits (the way
Liger-Kernel's fused losses do). FusedLossFunction returns the weighted losses row_weight[r] * KL_r,
whose gradient is then exactly the op's buffer times the upstream gradient of each row: 1 in the
usual `loss.sum().backward()`, so its backward has nothing to do but hand the buffer over (on
CUDA, where reading the factor would sync, after one scale_rows_ launch that skips rows whose factor
is 1). When the upstream gradient differs, it
rescales rows of its private buffer in place, and a second backward through the same graph
(retain_graph=True) recomputes. Few launches matter: small losses are bound by them.
"""
import math

import torch

from kdfast import reference

_ops = torch.ops.kdfast


@torch.library.register_fake("kdfast::softmax_kl")
def _softmax_kl_fake(student, teacher, inv_temperature, row_weight, grad_student, grad_teacher, grad_scale=1.0):
    torch._check(student.dim() == 2 and student.shape == teacher.shape)
    kl = row_weight.new_empty((student.shape[0],))
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return kl, gs, gt


@torch.library.register_fake("kdfast::feature_match")
def _feature_match_fake(student, teacher, cosine, eps, row_weight, grad_student, grad_teacher, grad_scale=1.0):
    return _softmax_kl_fake(student, teacher, 1.0, row_weight, grad_student, grad_teacher)


@torch.library.register_fake("kdfast::scale_rows_")
def _scale_rows_fake(grad, ratio):
    return None


@torch.library.register_fake("kdfast::rkd")
def _rkd_fake(student, teacher, distance_weight, angle_weight, delta, squared, eps, group_weight, grad_student,
              grad_teacher):
    return _relation_fake(student, teacher, group_weight, grad_student, grad_teacher)


def _relation_fake(student, teacher, group_weight, grad_student, grad_teacher):
    torch._check(student.dim() == 3 and teacher.dim() == 3)
    loss = group_weight.new_empty((student.shape[0],))
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return loss, gs, gt


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("kdfast::pairwise_distances")
def _pairwise_fake(x, squared, normalize, eps):
    torch._check(x.dim() == 3)
    return x.new_empty((x.shape[0], x.shape[1], x.shape[1]), dtype=_acc_dtype(x.dtype))


@torch.library.register_fake("kdfast::pairwise_distances_backward")
def _pairwise_backward_fake(grad, x, squared, normalize, eps):
    return torch.empty_like(x)


def _pairwise_setup(ctx, inputs, output):
    x, squared, normalize, eps = inputs
    ctx.save_for_backward(x)
    ctx.args = (squared, normalize, eps)


def _pairwise_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled() and (x.requires_grad or grad.requires_grad):
        # create_graph=True: the fused backward op has no derivative of its own, so the gradient
        # is recomputed through the reference formulation, which autograd can differentiate again.
        squared, normalize, eps = ctx.args
        with torch.enable_grad():
            xr = x if x.requires_grad else x.detach().requires_grad_()
            d = reference.pairwise_distances(xr, squared=squared, normalize=normalize, eps=eps)
            (gx,) = torch.autograd.grad(d, xr, grad.to(d.dtype), create_graph=True)
        return gx, None, None, None
    return _ops.pairwise_distances_backward(grad, x, *ctx.args), None, None, None


torch.library.register_autograd("kdfast::pairwise_distances", _pairwise_backward, setup_context=_pairwise_setup)


class FusedLossFunction(torch.autograd.Function):
    """Autograd for the forward-and-gradient ops (softmax_kl, feature_match, rkd).

    op(student, teacher, *params, weight, grad_student, grad_teacher) returns (per-row or per-group
    losses, grad_student, grad_teacher) with gradients of sum(weight * losses). The Function
    returns weight * losses.
    """

    @staticmethod
    def forward(ctx, op, student, teacher, weight, *params):
        want_s, want_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.op, ctx.params, ctx.want = op, params, (want_s, want_t)
        ctx.set_materialize_grads(False)
        # float16 has too little range to hold a gradient computed at one scale and rescaled later
        # (GradScaler's 65536 overflows, small values underflow). On CUDA, where checking the
        # upstream gradient would cost a host sync, float16 computes its gradient in backward.
        ctx.defer = student.dtype == torch.float16 and student.device.type != "cpu"
        if ctx.defer:
            losses, _, _ = op(student, teacher, *params, weight, False, False)
            ctx.save_for_backward(student, teacher, weight)
            ctx.fused = None
            return losses * weight
        compiling = torch.compiler.is_compiling()
        # The gradient is computed at the upstream factor this configuration received on its
        # last steps (see _UPSTREAM), e.g. the alpha of `ce + alpha * kd`: backward then has no
        # pass left to make over the buffer.
        ctx.key = ctx.pred = None
        if op in _SCALABLE and not compiling and student.device.type == "cpu" and student.dtype != torch.float16:
            ctx.key = (op, params, student.dtype)
            ctx.pred = _predicted_upstream(ctx.key)
        scale = () if ctx.pred is None else (ctx.pred,)
        losses, gs, gt = op(student, teacher, *params, weight, want_s, want_t, *scale)
        if compiling:
            # Graphs get a functional backward: everything goes through save_for_backward.
            ctx.save_for_backward(student, teacher, weight, gs, gt)
            ctx.fused = None
        else:
            # The buffers stay private to this node, so backward may scale them in place and hand
            # them over without a copy (AccumulateGrad then adopts the buffer as .grad).
            ctx.save_for_backward(student, teacher, weight)
            ctx.fused = [gs, gt]
        return losses * weight

    @staticmethod
    def backward(ctx, ratio):
        # ratio: the upstream gradient of each weighted loss, i.e. the factor between the gradient
        # wanted and the buffer the op wrote (often an expanded scalar: stride 0, no copy made).
        want_s, want_t = ctx.want
        nones = (None,) * len(ctx.params)
        if ratio is None:
            return (None, None, None, None) + nones
        fused, ctx.fused = ctx.fused, None
        if fused is not None and not torch.is_grad_enabled():
            gs, gt = fused
            ratio = ratio.to(gs.dtype if gs.dtype == torch.float64 else torch.float32)
            if ctx.key is not None:
                uniform = _observe_upstream(ctx.key, ratio)
                # the gradient was computed at this factor (1 unless predicted): nothing to scale
                if uniform == (1.0 if ctx.pred is None else ctx.pred):
                    return (None, gs if want_s else None, gt if want_t else None, None) + nones
                if ctx.pred is not None:
                    # a wrong guess: recompute at factor 1, so that the rescale below gives the
                    # bits of a step that made no guess (results never depend on earlier steps)
                    student, teacher, weight = ctx.saved_tensors[:3]
                    _, gs, gt = ctx.op(student, teacher, *ctx.params, weight, want_s, want_t)
            # float16 has too little range for a rescale (see forward): recompute unless ratio is 1
            if gs.dtype != torch.float16 or bool((ratio == 1).all()):
                for g, want in ((gs, want_s), (gt, want_t)):
                    if want and g.numel():
                        _ops.scale_rows_(g if g.dim() == 2 else g.view(g.shape[0], -1), ratio)
                return (None, gs if want_s else None, gt if want_t else None, None) + nones
        saved = ctx.saved_tensors
        student, teacher, weight = saved[:3]
        if torch.is_grad_enabled():
            gs, gt = _differentiable_grads(ctx.op, student, teacher, weight, ctx.params, ratio, ctx.want)
            return (None, gs, gt, None) + nones
        ratio = ratio.to(weight.dtype)
        if len(saved) == 5:  # traced: out-of-place
            gs, gt = saved[3], saved[4]
            gs = _scaled(gs, ratio) if want_s else None
            gt = _scaled(gt, ratio) if want_t else None
        else:
            # handed out already (a second backward through this graph), deferred, or float16
            # with an upstream gradient other than the one predicted: compute it for this gradient
            _, gs, gt = ctx.op(student, teacher, *ctx.params, (ratio * weight).contiguous(), want_s, want_t)
        return (None, gs if want_s else None, gt if want_t else None, None) + nones


# The uniform upstream gradient (an expanded scalar) each CPU row-op configuration (op, params,
# dtype) received last, and whether the step before received the same: (value, repeated). In a
# training loop `alpha * kd` sends alpha every step; once it repeats, the forward computes the
# gradient at it (the op's grad_scale, fused into its stores with the bits of a separate pass), so
# backward has nothing to rescale: at 2048 x 32000 fp32 that pass cost 12 ms of a 39 ms step.
_UPSTREAM = {}
_SCALABLE = (_ops.softmax_kl, _ops.feature_match)


def _predicted_upstream(key):
    value, repeated = _UPSTREAM.get(key, (1.0, False))
    # only factors that scale a gradient harmlessly (0 would read as "skip the row")
    if repeated and value != 1.0 and math.isfinite(value) and 2.0 ** -20 <= abs(value) <= 2.0 ** 20:
        return value
    return None


def _observe_upstream(key, ratio):
    """Record a CPU upstream gradient under key; its value if it is uniform, else None."""
    if ratio.numel() == 0 or (ratio.numel() > 1 and ratio.stride(0) != 0):
        _UPSTREAM.pop(key, None)
        return None
    value = float(ratio[0])
    _UPSTREAM[key] = (value, _UPSTREAM.get(key, (None, False))[0] == value)
    return value


def _kl_rows(student, teacher, inv_temperature):
    return reference.kl_rows(student, teacher, 1.0 / inv_temperature)


def _feature_rows(student, teacher, cosine, eps):
    acc = _acc_dtype(student.dtype)
    s, t = student.to(acc), teacher.to(acc)
    if cosine:
        return 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=eps)
    return ((s - t) ** 2).sum(-1)


# Per-row losses in plain PyTorch, for create_graph=True: the fused ops have no derivative of their
# own, so a higher-order gradient is recomputed through these, which autograd can differentiate.
_ROW_REFERENCE = {_ops.softmax_kl: _kl_rows, _ops.feature_match: _feature_rows}


def _differentiable_grads(op, student, teacher, weight, params, ratio, want):
    rows = _ROW_REFERENCE.get(op)
    if rows is None:
        raise RuntimeError("kdfast: double backward (create_graph=True) through a fused relation loss is not "
                           "supported; use kdfast.set_backend('reference') for higher-order gradients")
    inputs = [x if x.requires_grad else x.detach().requires_grad_() for x in (student, teacher)]
    with torch.enable_grad():
        out = rows(*inputs, *params) * weight
        wanted = [x for x, w in zip(inputs, want) if w]
        grads = iter(torch.autograd.grad(out, wanted, ratio.to(out.dtype), create_graph=True))
    return tuple(next(grads) if w else None for w in want)


def fused_loss(op, student, teacher, weight, *params):
    """weight * op's per-row / per-group losses, differentiable; without grad mode
    (torch.no_grad, eval loops) no gradient is computed at all. (Function.apply cannot tell: its
    needs_input_grad follows requires_grad even under no_grad.)"""
    if torch.is_grad_enabled():
        return FusedLossFunction.apply(op, student, teacher, weight, *params)
    return op(student, teacher, *params, weight, False, False)[0] * weight


def _scaled(g, ratio):
    return g * ratio.to(g.dtype).view((-1,) + (1,) * (g.dim() - 1))
