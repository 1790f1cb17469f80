"""Autograd of the fused forward-and-gradient losses: FusedLossFunction and fused_loss.

The ops torch.ops.kdfast.softmax_kl, feature_match, sparse_kl and rkd compute, in one pass over their inputs,
each row's (or group's) loss and, when asked, the gradient of sum_r weight[r] * loss_r with respect
to each input (the way Liger-Kernel's fused losses do). FusedLossFunction returns weight * losses,
whose gradient is exactly the op's gradient buffer times the upstream gradient `ratio` of each
row: 1 in the usual `loss.backward()`, so backward usually has nothing to do but hand the buffer
over. Few launches matter: small losses are bound by them. The ops on their own (without this
Function) are differentiable too, through kdfast/_op_autograd.py; this Function calls them below
that layer (below_autograd).

Buffer ownership (the rules the code below follows; it cites them as [B1] .. [B7])
------------------------------------------------------------------------------------
[B1] Birth. In eager mode the forward's op allocates fresh gradient buffers: no other reference
     to them exists. The node keeps them in the plain attribute ctx.buffers, not in
     save_for_backward: saved tensors may be neither modified in place nor given away.
[B2] Handover. The first backward that runs without grad mode takes the buffers (ctx.buffers is
     None from then on) and owns them: it may scale their rows in place (scale_rows_) and returns
     them as the gradients. AccumulateGrad then adopts such a tensor as .grad without a copy (or
     adds it to an existing .grad). After that nothing in kdfast refers to them.
[B3] The factor. The buffers hold the gradient at a factor fixed in forward: 1, or on the CPU
     (softmax_kl and feature_match, not float16, not while compiling) the upstream factor
     predicted by kdfast/_grad_scale_prediction.py. Backward reads the upstream gradient there
     when it is uniform (an expanded scalar: no pass): equal to that factor, the buffers are
     handed over as they are. A wrong prediction is recomputed at factor 1 first, so that the
     result has the bits of a step that predicted nothing; then the rows are rescaled in place.
     float16 is never rescaled (too little range: GradScaler's 65536 overflows, small values
     underflow): an upstream gradient other than 1 recomputes, as in [B4].
[B4] Second backward (retain_graph=True), or buffers not usable: recompute from the saved inputs
     at ratio * weight. A handed-over buffer is never read again: it is .grad now, and the
     optimizer or the user may have changed it.
[B5] create_graph=True (grad mode on in backward): the buffers carry no graph and are dropped; the
     gradient is recomputed through plain-PyTorch row formulas, which autograd can differentiate
     again. The relation op (rkd) has none: an error that says what to do.
[B6] torch.compile: graphs need a functional backward, so the buffers go through
     save_for_backward and are scaled out of place (a new tensor); nothing is handed over.
[B7] Deferred: float16 on CUDA, where reading the upstream factor would cost a host sync and the
     buffer could not be rescaled ([B3]), computes no gradient in forward; backward computes it
     at ratio * weight, as in [B4].
"""
import torch

from kdfast import reference
from kdfast._grad_scale_prediction import PREDICTOR, uniform_factor
from kdfast._validation import SPARSE_TAILS, compute_dtype

_ops = torch.ops.kdfast

# The ops that take a grad_scale, i.e. whose gradient the forward can write at a predicted factor.
_SCALABLE = (_ops.softmax_kl, _ops.feature_match)


class FusedLossFunction(torch.autograd.Function):
    """Autograd for the forward-and-gradient ops (softmax_kl, feature_match, rkd).

    op(student, teacher, *params, weight, grad_student, grad_teacher) returns (per-row or per-group
    losses, grad_student, grad_teacher) with gradients of sum(weight * losses). The Function
    returns weight * losses. See the module docstring for who owns the gradient buffers.
    """

    @staticmethod
    def forward(ctx, op, student, teacher, weight, *params):
        want_s, want_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.op, ctx.params, ctx.want = op, params, (want_s, want_t)
        ctx.set_materialize_grads(False)
        ctx.buffers = ctx.key = ctx.pred = None
        if student.dtype == torch.float16 and student.device.type != "cpu":  # [B7]
            losses, _, _ = below_autograd(op, student, teacher, *params, weight, False, False)
            ctx.save_for_backward(student, teacher, weight)
            return _weighted(losses, weight)
        compiling = torch.compiler.is_compiling()
        if op in _SCALABLE and not compiling and student.device.type == "cpu" and student.dtype != torch.float16:
            ctx.key = (op, params, student.dtype)  # [B3] backward reads the upstream factor
            ctx.pred = PREDICTOR.predict(ctx.key)
        scale = () if ctx.pred is None else (ctx.pred,)
        losses, gs, gt = below_autograd(op, student, teacher, *params, weight, want_s, want_t, *scale)
        if compiling:  # [B6]
            ctx.save_for_backward(student, teacher, weight, gs, gt)
        else:  # [B1]
            ctx.save_for_backward(student, teacher, weight)
            ctx.buffers = (gs, gt)
        return _weighted(losses, weight)

    @staticmethod
    def backward(ctx, ratio):
        # ratio: the upstream gradient of each weighted loss, i.e. the factor between the gradient
        # wanted and the buffer the op wrote (often an expanded scalar: stride 0, no copy made).
        want_s, want_t = ctx.want
        nones = (None,) * len(ctx.params)
        if ratio is None:
            return (None, None, None, None) + nones
        buffers, ctx.buffers = ctx.buffers, None  # [B2] taken at most once
        grads = None
        if torch.is_grad_enabled():  # [B5]
            student, teacher, weight = ctx.saved_tensors[:3]
            grads = differentiable_grads(ctx.op, student, teacher, weight, ctx.params, ratio, ctx.want)
        elif buffers is not None:  # [B2], [B3]
            grads = _hand_over(ctx, buffers, ratio)
        if grads is None:
            saved = ctx.saved_tensors
            student, teacher, weight = saved[:3]
            ratio = ratio.to(weight.dtype)
            if len(saved) == 5:  # [B6] out of place
                grads = (_scaled(saved[3], ratio) if want_s else None, _scaled(saved[4], ratio) if want_t else None)
            else:  # [B4], [B7]
                grads = recompute_grads(ctx.op, student, teacher, ctx.params, weight, ratio, ctx.want)
        gs, gt = grads
        return (None, gs if want_s else None, gt if want_t else None, None) + nones


def _hand_over(ctx, buffers, ratio):
    """This node's own gradient buffers made into the gradients for `ratio`, in place ([B2],
    [B3]); None where float16 would need a rescale."""
    gs, gt = buffers
    ratio = ratio.to(compute_dtype(gs))
    if ctx.key is not None:
        factor = uniform_factor(ratio)
        PREDICTOR.observe(ctx.key, factor)
        if factor == (1.0 if ctx.pred is None else ctx.pred):
            return gs, gt  # computed at this factor: nothing to scale
        if ctx.pred is not None:
            # a wrong guess: recompute at factor 1, so that the rescale below gives the bits of a
            # step that made no guess (results never depend on earlier steps)
            student, teacher, weight = ctx.saved_tensors
            _, gs, gt = below_autograd(ctx.op, student, teacher, *ctx.params, weight, *ctx.want)
    if gs.dtype == torch.float16 and not bool((ratio == 1).all()):
        return None
    if _teacher_overflowed(ctx, gt, ratio):
        return None
    for g, want in zip((gs, gt), ctx.want):
        if want and g.numel():
            _ops.scale_rows_(g if g.dim() == 2 else g.view(g.shape[0], -1), ratio)
    return gs, gt


def recompute_grads(op, student, teacher, params, weight, upstream, want, branch_free=False):
    """op's gradients of sum(upstream * weight * losses), computed at the row weights upstream * weight.

    The ops skip a row of weight 0 (a masked row: 0 gradients whatever its inputs). A row left at
    0 by its upstream gradient alone is not masked: PyTorch's gradient there is 0 times the row's
    gradient, NaN where that is not finite. Such rows are computed at their weight and scaled by 0
    in place (scale_rows_, whose rows of factor 1 return at once), decided on the device: a GPU
    never waits for the host; the CPU skips the step when no row is lost. branch_free: no branch on
    the values, for backwards that may be traced (the ops' registered autograd, under opcheck or
    AOT dispatch)."""
    w = (upstream * weight).contiguous()
    if op not in ROW_SELECTING:
        return below_autograd(op, student, teacher, *params, w, *want)[1:]
    lost = (w == 0) & (weight != 0)
    if branch_free or torch.compiler.is_compiling():  # no data-dependent branch: every row, out of place
        _, gs, gt = below_autograd(op, student, teacher, *params, torch.where(lost, weight, w), *want)
        keep = torch.where(lost, 0, torch.ones_like(w))
        return tuple(g * keep.to(g.dtype).view((-1,) + (1,) * (g.dim() - 1)) if wanted else g
                     for g, wanted in zip((gs, gt), want))
    if w.device.type == "cpu" and not bool(lost.any()):  # (free on the CPU; a sync on a GPU)
        return below_autograd(op, student, teacher, *params, w, *want)[1:]
    _, gs, gt = below_autograd(op, student, teacher, *params, torch.where(lost, weight, w), *want)
    keep = (~lost).to(w.dtype)
    for g, wanted in zip((gs, gt), want):
        if wanted and g.numel():
            _ops.scale_rows_(g.view(lost.numel(), -1), keep)
    return gs, gt


def _teacher_overflowed(ctx, gt, ratio):
    """Whether sparse_kl's teacher gradient, written in forward at upstream 1, holds an inf that a
    smaller upstream factor would bring back into range: a teacher log-prob gradient has the row
    KL's size, which may exceed FLT_MAX where ratio * it does not. Then backward recomputes at
    ratio * weight ([B4]). CPU only (on CUDA the check would cost a host sync); K entries per row,
    so the check is cheap next to the student's V."""
    if ctx.op is not _ops.sparse_kl or not ctx.want[1] or gt.device.type != "cpu" or not gt.numel():
        return False
    return bool(torch.isinf(gt).any()) and not bool((ratio.abs() >= 1).all())


def below_autograd(op, *args):
    """op(*args) below the autograd registered on it (kdfast/_op_autograd.py), for callers that are
    the autograd themselves (this Function, the registered backwards) and record nothing: that
    layer's Python would cost more than the op on small losses. (Traced graphs call the op as it is.)"""
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _scaled(g, ratio):
    return g * ratio.to(g.dtype).view((-1,) + (1,) * (g.dim() - 1))


def _divergence_rows(student, teacher, inv_temperature, divergence, mix):
    return reference.divergence_rows(student, teacher, 1.0 / inv_temperature, reference.DIVERGENCES[divergence], mix)


def _feature_rows(student, teacher, cosine, eps):
    acc = compute_dtype(student)
    s, t = student.to(acc), teacher.to(acc)
    if cosine:
        return 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=eps)
    return ((s - t) ** 2).sum(-1)


def _sparse_rows(student, teacher_logprobs, indices, inv_temperature, tail):
    return reference.sparse_kl_rows(student, teacher_logprobs, indices, 1.0 / inv_temperature,
                                    SPARSE_TAILS[tail])


# Per-row losses in plain PyTorch, for create_graph=True ([B5]): the fused ops' gradients carry no
# graph, so a higher-order gradient is recomputed through these, which autograd can differentiate.
# The ops that give a row of weight 0 no gradient at all (a mask), whatever its inputs.
ROW_SELECTING = (_ops.softmax_kl, _ops.feature_match, _ops.sparse_kl)

ROW_REFERENCE = {_ops.softmax_kl: _divergence_rows, _ops.feature_match: _feature_rows, _ops.sparse_kl: _sparse_rows}


def differentiable_grads(op, student, teacher, weight, params, ratio, want):
    """The gradients of sum(ratio * weight * loss rows) through the reference row formulas, with a
    graph (create_graph=True); None for an input not in want."""
    rows = ROW_REFERENCE.get(op)
    if rows is None:
        raise RuntimeError("kdfast: double backward (create_graph=True) through a fused relation loss is not "
                           "supported; use kdfast.set_backend('reference') for higher-order gradients")
    inputs = [x if x.requires_grad else x.detach().requires_grad_() for x in (student, teacher)]
    with torch.enable_grad():
        out = rows(*inputs, *params) * weight
        wanted = [x for x, w in zip(inputs, want) if w]
        grads = iter(torch.autograd.grad(out, wanted, ratio.to(out.dtype), create_graph=True))
    return tuple(next(grads) if w else None for w in want)


def _weighted(losses, weight):
    """weight * losses in weight's dtype, in one op: softmax_kl's rows are float64 (a KL of float
    logits may exceed FLT_MAX where the weighted row, T^2 / N KL, does not)."""
    if losses.dtype == weight.dtype:
        return losses * weight
    if torch.compiler.is_compiling():
        return (losses * weight).to(weight.dtype)
    return torch.mul(losses, weight, out=torch.empty_like(weight))


def fused_loss(op, student, teacher, weight, *params):
    """weight * op's per-row / per-group losses, differentiable; without grad mode
    (torch.no_grad, eval loops) no gradient is computed at all. (Function.apply cannot tell: its
    needs_input_grad follows requires_grad even under no_grad.)"""
    if torch.is_grad_enabled():
        return FusedLossFunction.apply(op, student, teacher, weight, *params)
    return _weighted(below_autograd(op, student, teacher, *params, weight, False, False)[0], weight)
