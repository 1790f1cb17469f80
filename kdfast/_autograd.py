"""Fake kernels and autograd for the compiled ops (imported only when the extension is loaded).

softmax_kl computes the gradient in the same pass as the loss, for the upstream gradient that the
caller predicts (row_weight: the reduction's factor per row). backward then only rescales rows whose
real upstream gradient differs from the prediction, in place, which is free in the usual
`loss.backward()`. A second backward through the same graph (retain_graph=True) recomputes.
"""
import torch

_ops = torch.ops.kdfast


@torch.library.register_fake("kdfast::softmax_kl")
def _softmax_kl_fake(student, teacher, inv_temperature, row_weight, grad_student, grad_teacher):
    rows = student.shape[0]
    kl = row_weight.new_empty((rows,))
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return kl, gs, gt


@torch.library.register_fake("kdfast::scale_rows_")
def _scale_rows_fake(grad, ratio):
    return None


def _softmax_kl_setup(ctx, inputs, output):
    student, teacher, inv_t, row_weight, grad_student, grad_teacher = inputs
    _, gs, gt = output
    ctx.inv_t = inv_t
    ctx.want = (grad_student, grad_teacher)
    ctx.save_for_backward(student, teacher, row_weight)
    # Held outside saved_tensors: backward hands them out (and may scale them in place) once.
    ctx.fused_grads = (gs, gt)
    ctx.mark_non_differentiable(gs, gt)
    ctx.set_materialize_grads(False)  # no zero tensors of the logits' size for the unused outputs


def _softmax_kl_backward(ctx, g_kl, g_gs, g_gt):
    if torch.is_grad_enabled():
        raise RuntimeError("kdfast.softmax_kl_div: double backward (create_graph=True) is not "
                           "supported; use kdfast.set_backend('reference') for higher-order gradients")
    student, teacher, row_weight = ctx.saved_tensors
    want_s, want_t = ctx.want
    if g_kl is None:
        g_kl = torch.zeros_like(row_weight)
    g_kl = g_kl.to(row_weight.dtype)
    fused = ctx.fused_grads
    ctx.fused_grads = None
    if fused is None:  # the fused gradients were handed out already: recompute for this g_kl
        _, gs, gt = _ops.softmax_kl(student, teacher, ctx.inv_t, g_kl.contiguous(), want_s, want_t)
    else:
        gs, gt = fused
        ratio = torch.where(row_weight != 0, g_kl / row_weight, torch.ones_like(row_weight))
        for g, want in ((gs, want_s), (gt, want_t)):
            if want:
                _ops.scale_rows_(g, ratio)
    return (gs if want_s else None, gt if want_t else None, None, None, None, None)


torch.library.register_autograd("kdfast::softmax_kl", _softmax_kl_backward,
                                setup_context=_softmax_kl_setup)
