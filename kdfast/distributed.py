"""Vocab-parallel distillation losses over torch.distributed (docs: DESIGN.md section 6).

When the LM head is column-parallel, each rank of a group holds a contiguous slice of the
vocabulary (ranks in group order, slices possibly uneven, possibly empty) and the logits never
exist whole. These functions take each rank's slice of the student and teacher logits and return,
on every rank, the loss over the full vocabulary; backward gives each rank its slice's gradients
(student, and teacher when it requires grad). They work on any backend torch.distributed has (gloo
on CPU, NCCL on GPU) and on subgroups (tensor parallelism inside data parallelism).

The collective scheme (a = student / T, b = teacher / T per row; P, Q the softmaxes of b, a)
---------------------------------------------------------------------------------------------
Round 1, one all_gather of per-row statistics, each relative to the rank's own maxima:
    m_a, m_b (local maxima), Z_a = sum exp(a - m_a), Z_b = sum exp(b - m_b), and for KL
    A = sum exp(b - m_b) (b - a).
  Every rank rescales them to the global maxima M = max_k m_k (exp(m_k - M), a flash-attention
  style merge), so no separate all_reduce(MAX) round is needed, and gets log Z_a, log Z_b over the
  full vocabulary and KL = A / Z_b + log Z_a - log Z_b. KL (and reverse KL, JSD with beta 0 or 1,
  skew KL with alpha 0): 1 round trip, 5 numbers per row per rank.
Round 2 (JSD, skew KL, TVD only), one all_reduce(SUM) of the sums of the per-element terms:
    F = sum f(P, Q), SU = sum Q u, SW = sum P w   (csrc/common/divergence.h)
  which need the global log Z first, so these divergences take 2 round trips: 4 numbers per row
  per rank, then 3. No collective carries anything of size rows x V.
Backward needs no collective: the gradients of a slice are functions of the slice's logits and
of the per-row global numbers the forward already holds (log Z_a, log Z_b, KL, SU, SW):
    KL:     dD/ds = (Q - P) / T,   dD/dt = P (log P - log Q - D) / T
    others: dD/ds = cq Q (u - SU) / T,   dD/dt = cp P (w - SW) / T.

The per-shard passes (statistics, term sums, gradients) are the single-device kernel's own row
passes, exposed as the ops torch.ops.kdfast.softmax_kl_shard_stats, _sums and _grads (CPU and
CUDA). On other devices, without the compiled extension (or its CUDA kernels), or with
kdfast.set_backend("reference"), they run in plain PyTorch, row chunk by row chunk (O(chunk x
V_local) temporaries).

Every rank of the group must call with the same rows (the same leading shape, mask, temperature,
reduction and divergence): rows are replicated across a tensor-parallel group, only the vocabulary
is split.
"""
import dataclasses
import math

import torch
import torch.distributed as dist

from kdfast import _backend, _fused_linear_args, _ops, _validation as v, fused_linear, reference

__all__ = ["softmax_kl_div", "kd_loss", "generalized_jsd", "reverse_kl_div", "skew_kl_div", "tv_distance",
           "vocab_range"]

# Rows per chunk of the plain-PyTorch per-shard passes: about this many elements of temporaries.
_CHUNK_ELEMENTS = 1 << 21

_KL, _JSD, _SKEW, _TVD = "kl", "jsd", "skew_kl", "tvd"
_KERNEL_KIND = {_KL: 0, _JSD: 2, _SKEW: 3, _TVD: 5}  # the softmax_kl ops' divergence numbers


def vocab_range(vocab_size, group=None, rank=None):
    """(start, stop) of this rank's contiguous slice when vocab_size is split as torch.chunk (and
    DTensor's Shard) split it: the first ranks get ceil(V / world) entries."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group) if rank is None else rank
    per = -(-vocab_size // world)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)


# ---------------------------------------------------------------- per-shard passes
#
# The row state the passes share (a (k, rows) tensor in the accumulation dtype): maxima of the raw
# logits M_s, M_t, sums Z_s = sum exp((s - M_s) / T), Z_t relative to them and, for KL, A / Z_t with
# A = sum exp((t - M_t) / T) ((t - M_t) - (s - M_s)) / T. The statistics pass gives it for the
# slice (relative to the slice's maxima); _merge_stats makes the row's global one; the term-sums and
# gradient passes read the global one. On CPU and CUDA the fused ops torch.ops.kdfast.softmax_kl_shard_*
# run them (csrc/cpu/softmax_kl.cpp, csrc/cuda/softmax_kl.cu); elsewhere the plain-PyTorch versions
# below, row chunk by row chunk (O(chunk x V_local) temporaries), which are also the reference for the
# ops' tests.

def _use_ops(x):
    return x.device.type in ("cpu", "cuda") and _ops.LOADED and _backend.use_native(x.device)


def _chunks(rows, V):
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _local_max(x):
    return x.amax(-1) if x.shape[-1] else torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)


def _ref(m):
    """A finite reference point for exp(x - m): the maxima, 0 where a slice row has no mass."""
    return torch.where(m == -math.inf, torch.zeros((), dtype=m.dtype, device=m.device), m)


def _shard_stats(s, t, inv_t, with_a, acc):
    """Statistics pass: the slice's row state relative to its own maxima ((5 if with_a else 4, rows);
    A itself, not A / Z_t, in the fifth row)."""
    if _use_ops(s):
        return torch.ops.kdfast.softmax_kl_shard_stats(s, t, inv_t, with_a)
    rows, V = s.shape
    out = torch.empty((5 if with_a else 4, rows), dtype=acc, device=s.device)
    for r0, r1 in _chunks(rows, V):
        x, y = s[r0:r1].to(acc), t[r0:r1].to(acc)
        ms, mt = _local_max(x), _local_max(y)
        a, b = (x - _ref(ms)[:, None]) * inv_t, (y - _ref(mt)[:, None]) * inv_t
        ea, eb = torch.exp(a), torch.exp(b)
        out[0, r0:r1], out[1, r0:r1] = ms, mt
        out[2, r0:r1], out[3, r0:r1] = ea.sum(-1), eb.sum(-1)
        if with_a:
            # a term with P = 0 is 0, also where a or b is -inf
            out[4, r0:r1] = torch.where(eb != 0, eb * (b - a), torch.zeros((), dtype=acc, device=s.device)).sum(-1)
    return out


def _merge_stats(gathered, inv_t):
    """(world, k, rows) slice states -> the rows' global state (k, rows), A / Z_t in the fifth row
    for k = 5: each slice's sums rescaled from its maxima to the global ones (exp((m_k - M) / T))."""
    m = gathered[:, :2]
    top = m.amax(0)
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    scale = torch.where(m == -math.inf, zero, torch.exp((m - top) * inv_t))
    z = (scale * gathered[:, 2:4]).sum(0)
    out = [top[0], top[1], z[0], z[1]]
    if gathered.shape[1] == 5:
        # A_k is relative to the slice's references; moving b - a to the global maxima adds
        # Z_t,k ((ref_t,k - M_t) - (ref_s,k - M_s)) / T (nothing where the slice's teacher has no mass)
        ref = _ref(m)
        shift = ((ref[:, 1] - top[1]) - (ref[:, 0] - top[0])) * inv_t
        zt = gathered[:, 3]
        a = gathered[:, 4] + torch.where(zt != 0, zt * shift, zero)
        out.append((scale[:, 1] * a).sum(0) / z[1])
    return torch.stack(out)


def _probs(s, t, inv_t, state, acc):
    """P, Q and log(P / Q) of a chunk from the global state; also b - a relative to the maxima."""
    a = (s.to(acc) - state[0][:, None]) * inv_t
    b = (t.to(acc) - state[1][:, None]) * inv_t
    lq, lp = a - torch.log(state[2])[:, None], b - torch.log(state[3])[:, None]
    return torch.exp(lp), torch.exp(lq), lp - lq, b - a


def _terms(divergence, mix, p, q, lpq):
    """f, u, w of csrc/common/divergence.h, elementwise (the same clamps and zero rules)."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    if divergence == _JSD:
        m = mix * p + (1 - mix) * q
        lp = torch.where(p != 0, torch.log(torch.clamp(p / m, max=1.0 / mix)), zero)
        lq = torch.where(q != 0, torch.clamp(lp - lpq, max=-math.log1p(-mix)), zero)
        return mix * (p * lp) + (1 - mix) * (q * lq), lq, lp
    if divergence == _SKEW:
        m = mix * p + (1 - mix) * q
        r = torch.where(p != 0, torch.clamp(p / m, max=1.0 / mix), zero)
        lr = torch.where(p != 0, torch.log(r), zero)
        return p * lr, r - 1, lr + mix * (1 - r)
    d = p - q  # TVD
    sign = torch.sign(d)
    return 0.5 * d.abs(), sign, sign


def _grad_factors(divergence, mix):
    """(cq, cp): the gradient factors of u and w."""
    if divergence == _JSD:
        return 1 - mix, mix
    if divergence == _SKEW:
        return -(1 - mix), 1.0
    return -0.5, 0.5


def _shard_term_sums(s, t, inv_t, state, divergence, mix, acc):
    """From-statistics pass: (3, rows) = F, SU, SW over the slice, given the global state."""
    if _use_ops(s):
        return torch.ops.kdfast.softmax_kl_shard_sums(s, t, inv_t, _KERNEL_KIND[divergence], mix, state[:4])
    rows, V = s.shape
    out = torch.zeros((3, rows), dtype=acc, device=s.device)
    for r0, r1 in _chunks(rows, V):
        p, q, lpq, _ = _probs(s[r0:r1], t[r0:r1], inv_t, state[:, r0:r1], acc)
        f, u, w = _terms(divergence, mix, p, q, lpq)
        out[0, r0:r1], out[1, r0:r1], out[2, r0:r1] = f.sum(-1), (q * u).sum(-1), (p * w).sum(-1)
    return out


def _shard_grads(s, t, inv_t, state, row_sums, coef, divergence, mix, want_s, want_t, acc):
    """Gradient pass: the slice's gradients of sum_r coef[r] * D_r, given the global state (KL: its
    A / Z_t) and, for the others, the global F, SU, SW."""
    if _use_ops(s):
        gs, gt = torch.ops.kdfast.softmax_kl_shard_grads(s, t, inv_t, _KERNEL_KIND[divergence], mix, state,
                                                         row_sums, coef.contiguous(), want_s, want_t)
        return (gs if want_s else None), (gt if want_t else None)
    rows, V = s.shape
    gs = torch.empty_like(s) if want_s else None
    gt = torch.empty_like(t) if want_t else None
    zero = torch.zeros((), dtype=acc, device=s.device)
    for r0, r1 in _chunks(rows, V):
        p, q, lpq, ba = _probs(s[r0:r1], t[r0:r1], inv_t, state[:, r0:r1], acc)
        c = (coef[r0:r1] * inv_t)[:, None]
        if divergence == _KL:
            if want_s:
                gs[r0:r1] = c * (q - p)
            if want_t:
                gt[r0:r1] = torch.where(p != 0, c * p * (ba - state[4, r0:r1, None]), zero)
            continue
        _, u, w = _terms(divergence, mix, p, q, lpq)
        cq, cp = _grad_factors(divergence, mix)
        if want_s:
            gs[r0:r1] = torch.where(q != 0, (cq * c) * q * (u - row_sums[1, r0:r1, None]), zero)
        if want_t:
            gt[r0:r1] = torch.where(p != 0, (cp * c) * p * (w - row_sums[2, r0:r1, None]), zero)
    return gs, gt


# ---------------------------------------------------------------- collectives and autograd

def _all_gather_rows(x, group):
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


class _VocabParallelDivergence(torch.autograd.Function):
    """Per-row divergence of a vocabulary slice (rows, V_local) -> (rows,) full-vocabulary values,
    in the accumulation dtype. Masked-out rows enter as zeros, so their value is 0 and their
    gradients 0. Backward runs no collective."""

    @staticmethod
    def forward(ctx, s, t, keep, group, inv_t, divergence, mix):
        acc = v.compute_dtype(s, t)
        if keep is not None:  # masked rows as zeros, as the reference does (no NaN leaks through)
            zero = torch.zeros((), dtype=s.dtype, device=s.device)
            s, t = torch.where(keep[:, None], s, zero), torch.where(keep[:, None], t, zero.to(t.dtype))
        kl = divergence == _KL
        state = _merge_stats(_all_gather_rows(_shard_stats(s, t, inv_t, kl, acc), group), inv_t)  # round 1
        if kl:
            rows = state[:0]  # (nothing more: the value and the gradients come from the state)
            value = state[4] + torch.log(state[2]) - torch.log(state[3])
        else:
            rows = _shard_term_sums(s, t, inv_t, state, divergence, mix, acc)
            dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)  # round 2
            value = torch.clamp(rows[0], min=0)
        if keep is not None:
            value = torch.where(keep, value, torch.zeros((), dtype=acc, device=value.device))
        ctx.save_for_backward(s, t, state, rows, keep)
        ctx.params = (inv_t, divergence, mix, acc)
        return value

    @staticmethod
    def backward(ctx, grad_rows):
        s, t, state, rows, keep = ctx.saved_tensors
        inv_t, divergence, mix, acc = ctx.params
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        coef = grad_rows.to(acc)
        if keep is not None:
            coef = torch.where(keep, coef, torch.zeros((), dtype=acc, device=coef.device))
        gs, gt = _shard_grads(s, t, inv_t, state, rows, coef, divergence, mix, want_s, want_t, acc)
        return gs, gt, None, None, None, None, None


def _check_local(student, teacher, group):
    v.check_pair(student, teacher, "student_logits", "teacher_logits")
    if student.dim() == 0:
        raise ValueError("student_logits must have at least one dimension (the vocabulary slice)")
    _check_group(group)


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kdfast.distributed needs an initialised process group "
                           "(torch.distributed.init_process_group, or launch with torchrun)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


def _vocab_parallel(student, teacher, temperature, reduction, mask, divergence, mix, scale, group):
    _check_local(student, teacher, group)
    temperature = v.check_positive(temperature, "temperature")
    v.check_reduction(reduction, v.KL_REDUCTIONS)
    mask = v.check_mask(mask, student)
    keep = None if mask is None else mask.reshape(-1)
    rows = _divergence_rows(student, teacher, temperature, keep, divergence, mix, group)
    rows = rows.reshape(student.shape[:-1])
    out = reference.reduce_rows(rows, mask, reduction, student.shape[0]).to(v.result_dtype(student, teacher))
    return out * scale if scale != 1.0 else out


def _rows(x):
    x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (not -1: a slice may be empty)
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


# ---------------------------------------------------------------- public API

def softmax_kl_div(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None, group=None):
    """KL(softmax(teacher / T) || softmax(student / T)) over the full vocabulary, from this rank's
    slices of the logits (..., V_local); as kdfast.softmax_kl_div otherwise. group: the
    tensor-parallel group holding the slices in rank order (None: the default group).
    Collectives: 1 round trip (an all_gather of 5 numbers per row) in forward, none in backward."""
    return _vocab_parallel(student_logits, teacher_logits, temperature, reduction, mask, _KL, 0.0, 1.0, group)


def kd_loss(student_logits, teacher_logits, *, temperature=4.0, reduction="batchmean", mask=None, group=None):
    """Hinton's KD loss, T^2 * softmax_kl_div, on vocabulary slices. Collectives: 1 round trip
    (forward), none in backward."""
    temperature = v.check_positive(temperature, "temperature")
    return _vocab_parallel(student_logits, teacher_logits, temperature, reduction, mask, _KL, 0.0,
                           temperature * temperature, group)


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, reduction="batchmean", mask=None,
                    group=None):
    """Generalized JSD (TRL's beta) on vocabulary slices; as kdfast.generalized_jsd otherwise.
    Collectives: 2 round trips in forward (an all_gather of 4 numbers per row, then an
    all_reduce of 3), 1 for beta = 0 or 1 (KL); none in backward."""
    beta = v.check_unit_interval(beta, "beta")
    return _vocab_parallel(student_logits, teacher_logits, temperature, reduction, mask, _JSD, beta, 1.0, group)


def reverse_kl_div(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None, group=None):
    """KL(Q || P) on vocabulary slices. Collectives: 1 round trip (forward), none in backward."""
    return _vocab_parallel(student_logits, teacher_logits, temperature, reduction, mask, "reverse_kl", 0.0, 1.0,
                           group)


def skew_kl_div(student_logits, teacher_logits, *, alpha=0.1, reverse=False, temperature=1.0, reduction="batchmean",
                mask=None, group=None):
    """DistiLLM's skew KL (reverse: skew reverse KL) on vocabulary slices. Collectives: 2 round
    trips in forward (1 for alpha = 0), none in backward."""
    alpha = v.check_unit_interval(alpha, "alpha")
    return _vocab_parallel(student_logits, teacher_logits, temperature, reduction, mask,
                           "skew_reverse_kl" if reverse else _SKEW, alpha, 1.0, group)


def tv_distance(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None, group=None):
    """Total variation distance on vocabulary slices. Collectives: 2 round trips in forward, none
    in backward."""
    return _vocab_parallel(student_logits, teacher_logits, temperature, reduction, mask, _TVD, 0.0, 1.0, group)


# ---------------------------------------------------------------- DTensor (kdfast.<loss> on Shard(-1))

def is_dtensor(x):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return False
    return isinstance(x, DTensor)


def _vocab_mesh_dim(x, name):
    """The mesh dim over which DTensor x is split on its last (vocabulary) dim; every other mesh
    dim must replicate it."""
    from torch.distributed.tensor import Replicate, Shard
    vocab_dims = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim % x.dim() == x.dim() - 1]
    others_ok = all(isinstance(p, Replicate) for i, p in enumerate(x.placements) if i not in vocab_dims)
    if len(vocab_dims) != 1 or not others_ok:
        raise ValueError(f"{name} is a DTensor with placements {tuple(x.placements)}; kdfast takes DTensors "
                         "sharded on the vocabulary (last) dim over one mesh dim and replicated over the others, "
                         "e.g. [Shard(-1)]")
    return vocab_dims[0]


def dtensor_divergence(student, teacher, temperature, reduction, mask, divergence, mix, scale):
    """kdfast.<loss> on DTensors sharded on the vocabulary dim: the vocab-parallel path on the local
    slices. The loss comes back as a plain tensor holding the full value (the same on every rank);
    the gradients reach the DTensors with their placements (through to_local's backward)."""
    if not (is_dtensor(student) and is_dtensor(teacher)):
        raise TypeError("student_logits and teacher_logits must both be DTensors or both plain tensors, got "
                        f"{type(student).__name__} and {type(teacher).__name__}")
    dim = _vocab_mesh_dim(student, "student_logits")
    if teacher.device_mesh != student.device_mesh or tuple(teacher.placements) != tuple(student.placements):
        raise ValueError("teacher_logits must be a DTensor on student_logits' mesh with the same placements, got "
                         f"{tuple(teacher.placements)} and {tuple(student.placements)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits has shape {tuple(student.shape)} but teacher_logits has shape "
                         f"{tuple(teacher.shape)}; they must match")
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary (last dim is 0)")
    if mask is not None and is_dtensor(mask):
        mask = mask.full_tensor()
    s, t = student.to_local(), teacher.to_local()
    v.check_mask(mask, s)  # the rows are whole on every rank
    group = student.device_mesh.get_group(dim)
    return _vocab_parallel(s, t, temperature, reduction, mask, divergence, mix, scale, group)


# ---------------------------------------------------------------- column-parallel LM heads

def _ce_stats(z, owned, idx, acc):
    """(4, rows) cross-entropy statistics of a vocabulary slice of logits: the row maxima, the
    sums of exp relative to them, the label's logit where this slice holds it (else 0), and
    whether it does."""
    rows, V = z.shape
    zero = torch.zeros((), dtype=acc, device=z.device)
    stats = torch.empty((4, rows), dtype=acc, device=z.device)
    for r0, r1 in _chunks(rows, V):
        x = z[r0:r1].to(acc)
        m = _local_max(x)
        stats[0, r0:r1] = m
        stats[1, r0:r1] = torch.exp(x - _ref(m)[:, None]).sum(-1)
    picked = z.gather(1, idx[:, None])[:, 0].to(acc) if V else torch.zeros(rows, dtype=acc, device=z.device)
    stats[2] = torch.where(owned, picked, zero)
    stats[3] = owned.to(acc)
    return stats


def _ce_merge(g, keep):
    """(world, 4, rows) gathered _ce_stats -> (log-sum-exp over the full vocabulary, the
    cross-entropy (0 where not keep)); a kept label no slice holds is an error on every rank."""
    if bool(((g[:, 3].sum(0) != 1) & keep).any()):
        raise ValueError("labels: a label is neither ignore_index nor a vocabulary id in [0, V) of the group's "
                         "full vocabulary")
    st = _merge_stats(g[:, [0, 0, 1, 1]], 1.0)  # (a merge of one side)
    lz = st[0] + torch.log(st[2])
    return lz, torch.where(keep, lz - g[:, 2].sum(0), torch.zeros((), dtype=lz.dtype, device=lz.device))


class _ShardHead(fused_linear.LocalHead):
    """The per-chunk step of the chunked fused head (kdfast/fused_linear.py) on vocabulary slices:
    per chunk of tokens, 1 all_gather of the soft statistics and the cross-entropy's together
    (O(chunk) numbers), 1 all_reduce of the term sums for JSD, skew KL and TVD; then the slice's
    logit gradients from the global per-row numbers. Those numbers are kept (O(tokens)), so a
    backward that runs the chunks again (reduction "none", retain_graph) needs no collective but the
    hidden states' all_reduce (reduce_grads)."""

    def __init__(self, N, start, divergence, mix, soft, hard, acc, device, group):
        self.swap, self.kind = _roles(divergence, mix)
        self.mix, self.start, self.group, self.N, self.replay = mix, start, group, N, False
        kl = self.kind == _KL
        self.state = torch.empty((5 if kl else 4, N), dtype=acc, device=device) if soft else None
        self.sums = torch.empty((0 if kl else 3, N), dtype=acc, device=device) if soft else None
        self.lz = torch.empty(N, dtype=acc, device=device) if hard else None
        self.ce = torch.empty(N, dtype=acc, device=device) if hard else None

    def __call__(self, zs, zt, sl, w, labels, o, want_s, want_t, acc):
        inv_t, zero = 1.0 / o.temperature, torch.zeros((), dtype=acc, device=zs.device)
        x = y = keep = owned = idx = None
        if zt is not None:
            common = torch.promote_types(zs.dtype, zt.dtype)
            x, y = (zt.to(common), zs.to(common)) if self.swap else (zs.to(common), zt.to(common))
        if self.ce is not None:
            lab = labels[sl]
            keep = lab != o.ignore_index
            local = lab - self.start
            owned = keep & (local >= 0) & (local < zs.shape[1])
            idx = torch.where(owned, local, torch.zeros_like(local))
        if not self.replay:
            self._exchange(zs, x, y, sl, keep, owned, idx, inv_t, acc)
            self.replay = sl.stop == self.N  # the per-row numbers of every token are kept
        losses, gs, gt = torch.zeros(zs.shape[0], dtype=acc, device=zs.device), None, None
        if zt is not None:
            state, sums = self.state[:, sl].contiguous(), self.sums[:, sl].contiguous()
            d = state[4] + torch.log(state[2]) - torch.log(state[3]) if self.kind == _KL else torch.clamp(sums[0], min=0)
            losses = o.soft_weight * torch.where(w != 0, d, zero)
            want_x, want_y = (want_t, want_s) if self.swap else (want_s, want_t)
            if want_x or want_y:
                gx, gy = _shard_grads(x, y, inv_t, state, sums, (w * o.soft_weight).to(acc), self.kind, self.mix,
                                      want_x, want_y, acc)
                gs, gt = (gy, gx) if self.swap else (gx, gy)
                gs = None if gs is None else gs.to(zs.dtype)
                gt = None if gt is None else gt.to(zt.dtype)
        if want_s and gs is None:
            gs = torch.zeros_like(zs)
        if self.ce is not None:
            losses += o.hard_weight * self.ce[sl]
            if want_s:  # hard_weight * w * (softmax - onehot), the softmax from the full log-sum-exp
                hw = (w * o.hard_weight).to(acc)
                p = torch.exp(zs.to(acc) - self.lz[sl, None]).mul_(hw[:, None])
                rows = torch.arange(zs.shape[0], device=zs.device)[owned]
                p[rows, idx[owned]] -= hw[owned]
                gs.add_(p)
        return losses, gs, gt

    def _exchange(self, zs, x, y, sl, keep, owned, idx, inv_t, acc):
        """The collectives of a chunk: its per-row global numbers into state, sums, lz, ce."""
        parts = []
        if x is not None:
            parts.append(_shard_stats(x, y, inv_t, self.kind == _KL, acc))
        if self.ce is not None:
            parts.append(_ce_stats(zs, owned, idx, acc))
        g = _all_gather_rows(torch.cat(parts), self.group)  # round 1
        if x is not None:
            k = self.state.shape[0]
            state = _merge_stats(g[:, :k], inv_t)
            self.state[:, sl] = state
            if self.kind != _KL:
                sums = _shard_term_sums(x, y, inv_t, state, self.kind, self.mix, acc)
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)  # round 2
                self.sums[:, sl] = sums
            g = g[:, k:]
        if self.ce is not None:
            self.lz[sl], self.ce[sl] = _ce_merge(g, keep)

    def reduce_grads(self, grads):
        for i in (0, 3):  # the hidden states: replicated inputs, their gradient is the group's sum
            if grads[i] is not None:
                dist.all_reduce(grads[i], op=dist.ReduceOp.SUM, group=self.group)
        return grads


def fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                              teacher_bias=None, divergence="kl", beta=0.5, alpha=0.1, temperature=1.0, labels=None,
                              ignore_index=-100, hard_weight=0.0, soft_weight=1.0, reduction="mean",
                              student_softcap=None, teacher_softcap=None, chunk_size=None, group=None):
    """The distillation loss of column-parallel LM heads: each rank holds the rows start .. stop of
    both heads' weights (V_local x H, as nn.Linear.weight, contiguous slices in rank order; the
    biases' matching slices) and the full hidden states (replicated over the group). Per token:
    soft_weight * divergence(P || Q) at the temperature (divergence: kl, reverse_kl, jsd (beta),
    skew_kl, skew_reverse_kl (alpha), tvd) + hard_weight * cross-entropy of the un-tempered student
    logits against labels (global vocabulary ids); tokens labelled ignore_index count nowhere;
    reduction "mean" (over counted tokens), "sum" or "none". Softcap c: logits c tanh(z / c).

    Runs as kdfast.fused_linear_distill_loss does, in chunks of tokens (chunk_size; default from
    the largest slice, the same on every rank): a chunk's logits slice (chunk x V_local), the
    per-shard passes write its logit gradients, multiplied at once into the weight and hidden-state
    gradients, so memory stays O(chunk x V_local) and, for "mean" and "sum", backward recomputes
    nothing. Every rank gets the full loss, its weight and bias slices' gradients and the hidden
    states' full gradient. Collectives: 1 all_gather of one number (the slice widths); per chunk, 1
    round trip (an all_gather of 5 numbers per token for KL, its reverse and the endpoints, 4 for the
    others, plus 4 with the hard term) and for JSD, skew KL and TVD a second (an all_reduce of 3);
    backward 1 all_reduce of the hidden states' gradient (tokens x H, the inherent cost of a
    column-parallel layer) per hidden input that needs one.
    """
    _check_group(group)
    sizes = _slice_sizes(student_weight, group)
    o = _fused_linear_args.check(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                 teacher_bias, divergence, beta, alpha, temperature, labels, ignore_index, hard_weight,
                                 soft_weight, reduction, student_softcap, teacher_softcap, chunk_size,
                                 vocab=sum(sizes))
    N = math.prod(student_hidden.shape[:-1])
    o = dataclasses.replace(o, chunk_size=chunk_size or fused_linear.default_chunk_size(N, max(sizes),
                                                                                        student_hidden.device))
    head = _ShardHead(N, sum(sizes[:dist.get_rank(group)]), reference.DIVERGENCES[o.divergence], o.mix,
                      o.soft_weight != 0, o.hard_weight != 0, v.compute_dtype(student_hidden, teacher_hidden),
                      student_hidden.device, group)
    return fused_linear.run_chunked(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                    teacher_bias, labels, o, head)


def _slice_sizes(weight, group):
    """Every rank's slice width, in group rank order (one all_gather of one number)."""
    v.check_tensor(weight, "student_weight")
    mine = torch.tensor([weight.shape[0] if weight.dim() == 2 else 0], dtype=torch.long, device=weight.device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _roles(divergence, mix):
    """(swap, kind): the reverse forms and the endpoints are KL or skew KL with the roles swapped
    (as the op does)."""
    swap = divergence in ("reverse_kl", "skew_reverse_kl") or (divergence == _JSD and mix == 1)
    kind = {"reverse_kl": _KL, "skew_reverse_kl": _SKEW}.get(divergence, divergence)
    if kind in (_JSD, _SKEW) and mix in (0, 1) and not (kind == _SKEW and mix == 1):
        kind = _KL
    return swap, kind


def _divergence_rows(s, t, temperature, keep, divergence, mix, group):
    """Per-row divergence of vocabulary slices (rows, V_local), masked rows 0 (autograd)."""
    swap, kind = _roles(divergence, mix)
    x, y = (t, s) if swap else (s, t)
    return _VocabParallelDivergence.apply(_rows(x), _rows(y), keep, group, 1.0 / temperature, kind, mix)
