"""Fake kernels for the compiled ops, and the autograd Function around the fused softmax-KL
(imported only when the extension is loaded).

torch.ops.kdfast.softmax_kl is a forward-and-gradient primitive: it returns each row's KL and,
when asked, row_weight[r] * dKL_r/d(input) computed in the same pass over the logits (the way
Liger-Kernel's fused losses do). SoftmaxKLFunction predicts row_weight as the gradient that the
reduction will send back, so in the usual `loss.backward()` its backward has nothing to do but hand
the gradient over; when the upstream gradient differs, it rescales rows of its private buffer in
place, and a second backward through the same graph (retain_graph=True) recomputes.
"""
import torch

_ops = torch.ops.kdfast


@torch.library.register_fake("kdfast::softmax_kl")
def _softmax_kl_fake(student, teacher, inv_temperature, row_weight, grad_student, grad_teacher):
    torch._check(student.dim() == 2 and student.shape == teacher.shape)
    kl = row_weight.new_empty((student.shape[0],))
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return kl, gs, gt


@torch.library.register_fake("kdfast::scale_rows_")
def _scale_rows_fake(grad, ratio):
    return None


class SoftmaxKLFunction(torch.autograd.Function):
    """kl_rows = softmax_kl(student, teacher) with the gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, student, teacher, inv_t, row_weight):
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kl, gs, gt = _ops.softmax_kl(student, teacher, inv_t, row_weight, want_s, want_t)
        ctx.inv_t, ctx.want = inv_t, (want_s, want_t)
        ctx.set_materialize_grads(False)
        if torch.compiler.is_compiling():
            # Graphs get a functional backward: everything goes through save_for_backward.
            ctx.save_for_backward(student, teacher, row_weight, gs, gt)
            ctx.fused = None
        else:
            # The buffers stay private to this node, so backward may scale them in place and hand
            # them over without a copy (AccumulateGrad then adopts the buffer as .grad).
            ctx.save_for_backward(student, teacher, row_weight)
            ctx.fused = [gs, gt]
        return kl

    @staticmethod
    def backward(ctx, g_kl):
        if torch.is_grad_enabled():
            raise RuntimeError("kdfast softmax-KL: double backward (create_graph=True) is not supported; "
                               "use kdfast.set_backend('reference') for higher-order gradients")
        want_s, want_t = ctx.want
        if g_kl is None:
            return None, None, None, None
        saved = ctx.saved_tensors
        student, teacher, row_weight = saved[:3]
        g_kl = g_kl.to(row_weight.dtype)
        ratio = torch.where(row_weight != 0, g_kl / row_weight, torch.ones_like(row_weight))
        if len(saved) == 5:  # traced: out-of-place
            gs, gt = saved[3], saved[4]
            gs = gs * ratio.to(gs.dtype).unsqueeze(-1) if want_s else None
            gt = gt * ratio.to(gt.dtype).unsqueeze(-1) if want_t else None
            return gs, gt, None, None
        if ctx.fused is None:  # handed out already: a second backward through this graph
            _, gs, gt = _ops.softmax_kl(student, teacher, ctx.inv_t, g_kl.contiguous(), want_s, want_t)
        else:
            gs, gt = ctx.fused
            ctx.fused = None
            for g, want in ((gs, want_s), (gt, want_t)):
                if want:
                    _ops.scale_rows_(g, ratio)
        return (gs if want_s else None), (gt if want_t else None), None, None
