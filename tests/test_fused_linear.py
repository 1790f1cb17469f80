"""fused_linear_distill_loss / nn.FusedLinearDistillLoss against the materialised float64 reference
(kdfast.reference.fused_linear_distill_loss): values and the gradients of hidden states, weights and
biases of both sides, for every divergence and reduction, chunking, labels, softcaps, dtypes."""
import pytest
import torch

import kdfast
from kdfast import reference as R

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def _inputs(lead=(13,), Hs=8, Ht=12, V=37, dtype=torch.float64, bias=True, teacher_grad=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, grad=True):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(grad)

    return [r(*lead, Hs), r(V, Hs), r(V) if bias else None,
            r(*lead, Ht, grad=teacher_grad), r(V, Ht, grad=teacher_grad), r(V, grad=teacher_grad) if bias else None]


def _labels(lead, V, ignored=(1, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, lead, generator=g)
    flat = lab.view(-1)
    for i in ignored:
        if i < flat.numel():
            flat[i] = -100
    return lab


def _call(fn, x, **kw):
    return fn(x[0], x[1], x[3], x[4], student_bias=x[2], teacher_bias=x[5], **kw)


def _run(x, kw, fn, upstream_seed=3):
    out = _call(fn, x, **kw)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    if out.requires_grad:
        (out.double() * up).sum().backward()
    return out


def _copy64(x):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in x]


def _check(x, kw, rtol=1e-9, atol=1e-10, grad_rtol=None, grad_atol=None):
    """Run kdfast on x and the reference on float64 copies; compare values and every gradient."""
    ref = _copy64(x)
    out = _run(x, kw, kdfast.fused_linear_distill_loss)
    want = _run(ref, kw, R.fused_linear_distill_loss)
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    for name, a, b in zip(NAMES, x, ref):
        if a is None or not a.requires_grad:
            continue
        assert a.grad is not None, name
        assert a.grad.dtype == a.dtype, name
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=grad_rtol or rtol, atol=grad_atol or atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    return out


FULL = dict(beta=0.3, alpha=0.2, temperature=2.0, hard_weight=0.7, soft_weight=0.9, student_softcap=3.0,
            teacher_softcap=4.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_and_gradient_matches_reference(divergence, reduction):
    x = _inputs()
    _check(x, dict(FULL, divergence=divergence, reduction=reduction, labels=_labels((13,), 37), chunk_size=4))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 12, 13, 100, None])
def test_chunk_sizes(chunk_size):
    x = _inputs(lead=(13,))
    _check(x, dict(FULL, divergence="jsd", labels=_labels((13,), 37), chunk_size=chunk_size))


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_3d_hidden_states_and_none_shape(divergence):
    x = _inputs(lead=(3, 5))
    out = _check(x, dict(FULL, divergence=divergence, labels=_labels((3, 5), 37, ignored=(0, 7)), reduction="none",
                         chunk_size=4))
    assert out.shape == (3, 5)
    assert out[0, 0] == 0 and out[1, 2] == 0  # ignored tokens


def test_plain_defaults_no_bias_no_labels():
    x = _inputs(bias=False)
    _check(x, {})
    x = _inputs(bias=False)
    _check(x, dict(divergence="jsd", beta=0.5, reduction="sum"))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_without_grad(divergence):
    x = _inputs(teacher_grad=False)
    _check(x, dict(FULL, divergence=divergence, labels=_labels((13,), 37), chunk_size=5))
    assert all(t.grad is None for t in x[3:])


def test_only_some_inputs_require_grad():
    x = _inputs()
    for i in (0, 2, 4):  # student hidden, student bias, teacher weight frozen
        x[i].requires_grad_(False)
    _check(x, dict(FULL, divergence="skew_kl", labels=_labels((13,), 37), chunk_size=3))


@pytest.mark.parametrize("V", [1, 2, 7, 1001])
def test_odd_vocabulary(V):
    x = _inputs(V=V, lead=(9,))
    _check(x, dict(FULL, divergence="jsd", labels=_labels((9,), V), chunk_size=4))


@pytest.mark.parametrize("hard,soft", [(0.0, 1.0), (1.0, 0.0), (2.5, 0.25)])
def test_hard_and_soft_weights(hard, soft):
    x = _inputs()
    _check(x, dict(divergence="kl", temperature=3.0, labels=_labels((13,), 37), hard_weight=hard, soft_weight=soft,
                   chunk_size=4))


def test_hard_loss_is_untempered_cross_entropy():
    x = _inputs(teacher_grad=False)
    lab = _labels((13,), 37)
    out = _call(kdfast.fused_linear_distill_loss, x, labels=lab, hard_weight=1.0, soft_weight=0.0, temperature=5.0)
    z = x[0].detach() @ x[1].detach().t() + x[2].detach()
    want = torch.nn.functional.cross_entropy(z, lab, ignore_index=-100)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(reduction):
    x = _inputs(dtype=torch.float32)
    lab = torch.full((13,), -100)
    out = _call(kdfast.fused_linear_distill_loss, x, labels=lab, hard_weight=1.0, reduction=reduction, chunk_size=4)
    assert torch.all(out == 0)
    out.sum().backward()
    for name, t in zip(NAMES, x):
        assert t.grad is not None and torch.all(t.grad == 0), name


def test_mean_divides_by_counted_tokens():
    x = _inputs(teacher_grad=False)
    lab = _labels((13,), 37, ignored=(0, 1, 2))
    none = _call(kdfast.fused_linear_distill_loss, x, labels=lab, reduction="none").detach()
    mean = _call(kdfast.fused_linear_distill_loss, x, labels=lab).detach()
    torch.testing.assert_close(mean, none.sum() / 10)


def test_custom_ignore_index():
    x = _inputs()
    lab = _labels((13,), 37, ignored=())
    lab[3] = 36
    _check(x, dict(FULL, divergence="kl", labels=lab, ignore_index=36, chunk_size=4))


def test_float32_matches_reference():
    x = _inputs(dtype=torch.float32, V=301, lead=(33,), Hs=16, Ht=24)
    _check(x, dict(FULL, divergence="jsd", labels=_labels((33,), 301), chunk_size=8), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_bfloat16(divergence):
    # bf16 GEMMs round the logits (8 bits): tolerances scale with the logits' size
    x = _inputs(dtype=torch.bfloat16, V=257, lead=(40,), Hs=32, Ht=48, scale=0.3)
    out = _check(x, dict(divergence=divergence, labels=_labels((40,), 257), hard_weight=0.5, chunk_size=7),
                 rtol=3e-2, atol=3e-3, grad_rtol=5e-2, grad_atol=2e-3)
    assert out.dtype == torch.float32


def test_bfloat16_weight_gradient_accumulates_in_fp32():
    # Many one-token chunks add into grad_W: summed in bf16 the running total would lose its low
    # bits at every step (the drift TRL fixed); in fp32 only each chunk's product is rounded.
    N, V, H = 512, 16, 8
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, H, generator=g).bfloat16()
    Ws = (0.5 * torch.randn(V, H, generator=g)).bfloat16().requires_grad_()
    ht, Wt = torch.randn(N, H, generator=g).bfloat16(), torch.randn(V, H, generator=g).bfloat16()
    kdfast.fused_linear_distill_loss(hs, Ws, ht, Wt, reduction="sum", chunk_size=1).backward()
    W64 = Ws.detach().double().requires_grad_()
    R.fused_linear_distill_loss(hs.double(), W64, ht.double(), Wt.double(), reduction="sum").backward()
    err = (Ws.grad.double() - W64.grad).abs().max() / W64.grad.abs().max()
    assert err < 1e-2, float(err)


def test_mixed_dtypes_student_bf16_teacher_fp32():
    x = _inputs(V=64, lead=(10,))
    x = [t.detach().to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(x)]
    _check(x, dict(divergence="kl", chunk_size=3), rtol=3e-2, atol=3e-3, grad_rtol=5e-2, grad_atol=3e-3)


def test_no_grad_and_inputs_unchanged():
    x = _inputs()
    before = [t.detach().clone() for t in x]
    with torch.no_grad():
        out = _call(kdfast.fused_linear_distill_loss, x, **FULL, labels=_labels((13,), 37), chunk_size=4)
    want = _call(R.fused_linear_distill_loss, x, **FULL, labels=_labels((13,), 37))
    torch.testing.assert_close(out, want.detach())
    for a, b in zip(x, before):
        assert torch.equal(a.detach(), b)


def test_retain_graph_second_backward():
    x = _inputs()
    out = _call(kdfast.fused_linear_distill_loss, x, **FULL, labels=_labels((13,), 37), chunk_size=4)
    out.backward(retain_graph=True)
    first = [t.grad.clone() for t in x]
    for t in x:
        t.grad = None
    (3 * out).backward()
    for a, t in zip(first, x):
        torch.testing.assert_close(t.grad, 3 * a)


def test_reference_backend_gives_the_same():
    x = _inputs()
    kw = dict(FULL, divergence="jsd", labels=_labels((13,), 37))
    native = _call(kdfast.fused_linear_distill_loss, x, **kw).detach()
    kdfast.set_backend("reference")
    try:
        ref = _call(kdfast.fused_linear_distill_loss, x, **kw).detach()
    finally:
        kdfast.set_backend("auto")
    torch.testing.assert_close(native, ref)


def test_module_matches_function():
    x = _inputs()
    lab = _labels((13,), 37)
    kw = dict(divergence="skew_reverse_kl", alpha=0.3, temperature=1.5, hard_weight=0.2, reduction="sum",
              student_softcap=5.0, chunk_size=6)
    m = kdfast.nn.FusedLinearDistillLoss(**kw)
    out = m(x[0], x[1], x[3], x[4], lab, x[2], x[5])
    want = _call(kdfast.fused_linear_distill_loss, x, labels=lab, **kw)
    torch.testing.assert_close(out, want)
    assert "skew_reverse_kl" in repr(m)


def _bad(**changes):
    x = _inputs(dtype=torch.float32, teacher_grad=False)
    args = dict(zip(NAMES, x))
    args["labels"] = _labels((13,), 37)
    args.update(changes)
    return args


BAD = [
    ("vocab", dict(teacher_weight=torch.randn(36, 12)), ValueError, "vocabulary"),
    ("width", dict(student_weight=torch.randn(37, 9)), ValueError, "student_weight"),
    ("teacher width", dict(teacher_hidden=torch.randn(13, 11)), ValueError, "teacher_weight"),
    ("rows", dict(teacher_hidden=torch.randn(12, 12)), ValueError, "teacher_hidden"),
    ("divergence", dict(divergence="kld"), ValueError, "divergence"),
    ("hard without labels", dict(labels=None, hard_weight=1.0), ValueError, "hard_weight"),
    ("labels range", dict(labels=torch.full((13,), 37)), ValueError, "labels"),
    ("labels negative", dict(labels=torch.full((13,), -3)), ValueError, "labels"),
    ("labels shape", dict(labels=torch.zeros(12, dtype=torch.long)), ValueError, "labels"),
    ("labels dtype", dict(labels=torch.zeros(13)), TypeError, "labels"),
    ("beta", dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    ("alpha", dict(alpha=-0.1), ValueError, "alpha"),
    ("temperature", dict(temperature=0.0), ValueError, "temperature"),
    ("reduction", dict(reduction="batchmean"), ValueError, "reduction"),
    ("softcap", dict(student_softcap=-1.0), ValueError, "student_softcap"),
    ("chunk", dict(chunk_size=0), ValueError, "chunk_size"),
    ("hard weight", dict(hard_weight=float("nan")), ValueError, "hard_weight"),
    ("bias shape", dict(student_bias=torch.randn(36)), ValueError, "student_bias"),
    ("dtype", dict(student_weight=torch.randn(37, 8, dtype=torch.float64)), TypeError, "student_weight"),
    ("int hidden", dict(student_hidden=torch.zeros(13, 8, dtype=torch.long)), TypeError, "student_hidden"),
    ("weight 1-D", dict(teacher_weight=torch.randn(37)), ValueError, "teacher_weight"),
]


@pytest.mark.parametrize("fn", [kdfast.fused_linear_distill_loss, R.fused_linear_distill_loss], ids=["kdfast", "ref"])
@pytest.mark.parametrize("case,changes,exc,word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(fn, case, changes, exc, word):
    args = _bad(**changes)
    pos = [args.pop(n) for n in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    with pytest.raises(exc, match=word):
        fn(*pos, **args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_tokens(reduction):
    x = _inputs(lead=(0,), dtype=torch.float32)
    out = _check(x, dict(divergence="jsd", reduction=reduction))
    assert out.shape == ((0,) if reduction == "none" else ())
