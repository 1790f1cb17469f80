"""fused_linear_distill_loss: the distillation loss from hidden states and LM heads, in chunks of
tokens, never holding (tokens x V) logits.

Per chunk of tokens: both heads' logits with ATen's GEMM (torch.addmm), softcapped in place when
asked; the fused softmax_kl op writes the soft loss and its logit gradient in one pass; the hard
cross-entropy adds softmax - onehot into that gradient; the softcap's chain factor; then at once
grad_hidden[chunk] = g W and grad_W += g^T h (and the teacher's when it requires grad). So for
reduction "mean" and "sum" the forward computes every gradient and backward only scales them by
the upstream scalar: the cost is the four products of the GEMM floor plus one streaming pass.
reduction="none" has a per-token upstream gradient, unknown in forward: its forward computes the
losses alone and backward runs the chunks again with those weights (two more GEMMs, the logits).
The per-chunk loss and logit-gradient step is a head object (LocalHead here; kdfast.distributed's
runs it on vocabulary slices of column-parallel heads), the rest of the loop is shared.
"""
import torch

from kdfast import _backend, _fused_linear_args, _ops, _tuning as tuning, _validation as v, reference

if _ops.LOADED:
    from kdfast._fused_autograd import below_autograd

__all__ = ["fused_linear_distill_loss"]


def default_chunk_size(tokens, vocab, device="cpu"):
    """Tokens per chunk: each (chunk x V) buffer (logits of either side, the gradient) holds about
    FUSED_LINEAR_CHUNK_ELEMS[device type] elements, so that peak memory stays O(chunk x V) whatever
    the batch while each GEMM still has a few hundred rows at LLM vocabularies."""
    elems = tuning.FUSED_LINEAR_CHUNK_ELEMS.get(torch.device(device).type, tuning.FUSED_LINEAR_CHUNK_ELEMS_DEFAULT)
    return max(1, min(tokens, elems // vocab))


def _logits(h, w, b, cap, buf):
    """The chunk's logits written into buf[:rows] (one buffer for all chunks: fresh memory costs a
    page fault per page on first touch, DESIGN.md section 4)."""
    z = buf[:h.shape[0]]
    if b is None:
        torch.mm(h, w.t(), out=z)
    else:
        torch.addmm(b, h, w.t(), out=z)
    if cap is not None:
        z.div_(cap).tanh_().mul_(cap)
    return z


def _chain_softcap_(g, z, cap):
    """g *= d(c tanh(x / c))/dx = 1 - (z / c)^2, from the capped logits z (overwritten)."""
    g.mul_(z.div_(cap).square_().neg_().add_(1))


def _add_hard_(g, z, labels, keep, hw, acc):
    """Cross-entropy of the logits z per row (float acc; ignored rows read label 0), and
    g += hw * (softmax(z) - onehot) when g is given (hw is 0 on ignored rows). One (chunk x V)
    temporary: the log-softmax, turned into the softmax in place."""
    safe = torch.where(keep, labels, torch.zeros((), dtype=labels.dtype, device=labels.device)).unsqueeze(1)
    ls = torch.log_softmax(z, -1, dtype=acc)
    ce = -ls.gather(1, safe).squeeze(1)
    if g is not None:
        ls.exp_().mul_(hw.unsqueeze(1))
        ls.scatter_add_(1, safe, -hw.unsqueeze(1))
        g.add_(ls)
    return ce


class LocalHead:
    """The per-chunk step of _chunks on one device: the fused softmax_kl op (soft term and its
    logit gradients) and the hard cross-entropy on the chunk's full-vocabulary logits.
    kdfast.distributed subclasses it for vocabulary slices."""

    def __call__(self, zs, zt, sl, w, labels, o, want_s, want_t, acc):
        """(per-token losses soft_weight * D + hard_weight * CE (acc), the logit gradients of
        sum(w * losses) for the student and the teacher (None where not wanted)) of the chunk sl;
        zt is None when soft_weight is 0. Before the softcaps' chain factors."""
        gs = gt = None
        if zt is not None:
            common = torch.promote_types(zs.dtype, zt.dtype)
            rows, gs, gt = below_autograd(torch.ops.kdfast.softmax_kl, zs.to(common), zt.to(common),
                                          1.0 / o.temperature, o.divergence, o.mix, w * o.soft_weight, want_s, want_t)
            losses = rows * o.soft_weight
            gs = gs.to(zs.dtype) if want_s else None
            gt = gt.to(zt.dtype) if want_t else None
        else:
            losses = torch.zeros(zs.shape[0], dtype=acc, device=zs.device)
            gs = torch.zeros_like(zs) if want_s else None
        if o.hard_weight != 0:
            lab = labels[sl]
            keep = lab != o.ignore_index
            ce = _add_hard_(gs, zs, lab, keep, w * o.hard_weight, acc)
            losses += o.hard_weight * torch.where(keep, ce, torch.zeros((), dtype=acc, device=ce.device))
        return losses, gs, gt

    def reduce_grads(self, grads):
        """The six input gradients in backward, before they are returned (the distributed head sums
        the hidden states' over its group here)."""
        return grads


def _chunks(hs, Ws, bs, ht, Wt, bt, labels, weights, o, want, head):
    """Per-token losses soft_weight * D + hard_weight * CE (float acc, unweighted; tokens of weight
    0 give 0 soft loss) and, for each input in want (hs, Ws, bs, ht, Wt, bt), the gradient of
    sum(weights * losses), or None. head: the per-chunk step (LocalHead)."""
    N, V = hs.shape[0], Ws.shape[0]
    acc = v.compute_dtype(hs, ht)
    want_s, want_t = any(want[:3]), any(want[3:])
    soft = o.soft_weight != 0
    want_t = want_t and soft

    def grad_buffers(h, w, b, flags, written):
        fh, fw, fb = flags
        # fp32 accumulation of the weight and bias gradients across chunks for 16-bit weights
        wacc = v.compute_dtype(w)
        return ((torch.empty_like(h) if written else torch.zeros_like(h)) if fh else None,
                torch.zeros(w.shape, dtype=wacc, device=w.device) if fw else None,
                torch.zeros(w.shape[0], dtype=wacc, device=w.device) if fb else None)

    gs_out = grad_buffers(hs, Ws, bs, want[:3], True)
    gt_out = grad_buffers(ht, Wt, bt, want[3:], want_t)  # soft_weight 0: the teacher's gradients are 0
    losses = torch.zeros(N, dtype=acc, device=hs.device)
    C = min(o.chunk_size or default_chunk_size(N, V, hs.device), max(N, 1))
    zs_buf = torch.empty((C, V), dtype=hs.dtype, device=hs.device)
    zt_buf = torch.empty((C, V), dtype=ht.dtype, device=ht.device) if soft else None
    for start in range(0, N, C):
        sl = slice(start, min(N, start + C))
        zs = _logits(hs[sl], Ws, bs, o.student_softcap, zs_buf)
        zt = _logits(ht[sl], Wt, bt, o.teacher_softcap, zt_buf) if soft else None
        losses[sl], gs, gt = head(zs, zt, sl, weights[sl], labels, o, want_s, want_t, acc)
        if gt is not None:
            if o.teacher_softcap is not None:
                _chain_softcap_(gt, zt, o.teacher_softcap)
            _backprop(gt, ht[sl], Wt, gt_out, sl)
        if gs is not None:
            if o.student_softcap is not None:
                _chain_softcap_(gs, zs, o.student_softcap)
            _backprop(gs, hs[sl], Ws, gs_out, sl)
    grads = []
    for (gh, gw, gb), (h, W, b) in ((gs_out, (hs, Ws, bs)), (gt_out, (ht, Wt, bt))):
        grads += [gh, None if gw is None else gw.to(W.dtype), None if gb is None else gb.to(b.dtype)]
    return losses, grads


def _backprop(g, h, W, out, sl):
    """grad_hidden[sl] = g W, grad_W += g^T h, grad_b += g summed over the chunk's tokens."""
    gh, gw, gb = out
    if gh is not None:
        torch.mm(g, W, out=gh[sl])
    if gw is not None:
        if gw.dtype == g.dtype:
            gw.addmm_(g.t(), h)
        else:  # 16-bit: the chunk's product rounded once, the running sum kept in fp32
            gw.add_(torch.mm(g.t(), h))
    if gb is not None:
        gb.add_(g.sum(0, dtype=gb.dtype))


class FusedLinearDistillFunction(torch.autograd.Function):
    """Autograd of the chunked head. forward(hs, Ws, bs, ht, Wt, bt, labels, weights, o, head) returns
    sum(weights * losses) (reduction mean/sum: weights hold the reduction's factor, 0 for ignored
    tokens) or the per-token losses (reduction none: weights are 1 for counted tokens, else 0)."""

    @staticmethod
    def forward(ctx, hs, Ws, bs, ht, Wt, bt, labels, weights, o, head):
        ctx.o, ctx.head, ctx.want = o, head, tuple(ctx.needs_input_grad[:6])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hs, Ws, bs, ht, Wt, bt, labels, weights)
        ctx.grads = None
        if o.reduction == "none":
            return _chunks(hs, Ws, bs, ht, Wt, bt, labels, weights, o, (False,) * 6, head)[0]
        losses, ctx.grads = _chunks(hs, Ws, bs, ht, Wt, bt, labels, weights, o, ctx.want, head)
        return (losses * weights).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream):
        if upstream is None:
            return (None,) * 10
        grads, ctx.grads = ctx.grads, None  # handed over at most once: they become .grad
        hs, Ws, bs, ht, Wt, bt, labels, weights = ctx.saved_tensors
        if ctx.o.reduction == "none":
            w = (upstream.to(weights.dtype) * weights).contiguous()
            grads = _chunks(hs, Ws, bs, ht, Wt, bt, labels, w, ctx.o, ctx.want, ctx.head)[1]
        elif grads is None:  # a second backward (retain_graph=True): computed again at this scalar
            w = upstream.to(weights.dtype) * weights
            grads = _chunks(hs, Ws, bs, ht, Wt, bt, labels, w, ctx.o, ctx.want, ctx.head)[1]
        elif upstream.device.type != "cpu" or float(upstream) != 1.0:
            for g in grads:
                if g is not None:
                    g.mul_(upstream.to(g.dtype))
        return (*ctx.head.reduce_grads(grads), None, None, None, None)


def run_chunked(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, o,
                head):
    """The loss of validated inputs (Options o) through the chunks with the per-chunk step head:
    the reduction's token weights, autograd when an input requires grad, the result's shape and dtype."""
    lead = student_hidden.shape[:-1]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous()
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).contiguous()
    acc = v.compute_dtype(hs, ht)
    N = hs.shape[0]
    if labels is None:
        keep, labels2, count = torch.ones(N, dtype=acc, device=hs.device), None, float(N)
    else:
        labels2 = labels.reshape(-1).long()
        keep = (labels2 != o.ignore_index).to(acc)
        count = keep.sum()
    if o.reduction == "mean":
        weights = keep / (count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1.0))
    else:
        weights = keep
    tensors = (hs, student_weight, student_bias, ht, teacher_weight, teacher_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out = FusedLinearDistillFunction.apply(*tensors, labels2, weights, o, head)
    else:
        losses = _chunks(*tensors, labels2, weights, o, (False,) * 6, head)[0]
        out = losses if o.reduction == "none" else (losses * weights).sum()
    out = out.reshape(lead) if o.reduction == "none" else out
    return out.to(v.result_dtype(student_hidden, teacher_hidden))


def fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                              teacher_bias=None, divergence="kl", beta=0.5, alpha=0.1, temperature=1.0, labels=None,
                              ignore_index=-100, hard_weight=0.0, soft_weight=1.0, reduction="mean",
                              student_softcap=None, teacher_softcap=None, chunk_size=None):
    """Distillation loss of two LM heads from their hidden states, in chunks of tokens (never the
    full (tokens x V) logits). Logits z = h W^T + b (W as nn.Linear.weight, V x H; the widths of
    student and teacher may differ), softcapped c tanh(z / c) when a softcap is given. Per token:
    soft_weight * D(P || Q) at the temperature (D the divergence: kl, reverse_kl, jsd (beta),
    skew_kl, skew_reverse_kl (alpha), tvd) plus hard_weight * cross-entropy(z_s, label) on the
    un-tempered logits. Tokens labelled ignore_index count nowhere; "mean" divides by the counted
    tokens, "sum" adds, "none" gives one value per token (student_hidden.shape[:-1]). chunk_size:
    tokens per chunk (default from V: see default_chunk_size)."""
    o = _fused_linear_args.check(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                 teacher_bias, divergence, beta, alpha, temperature, labels, ignore_index, hard_weight,
                                 soft_weight, reduction, student_softcap, teacher_softcap, chunk_size)
    if not _backend.use_native(student_hidden.device):
        return reference.fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
            labels=labels, ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
            reduction=reduction, student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    return run_chunked(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       labels, o, LocalHead())
