"""Every bad input of docs/design.md ("Bad input", section 2), for every public function: a ValueError or TypeError
whose message names the argument, never a crash, and the inputs left as they were."""
import math
import warnings

import pytest
import torch

import kdfast

from conftest import needs_cuda

x2 = torch.randn(4, 10)
y2 = torch.randn(4, 10)
i2 = torch.randint(0, 5, (4, 10))
meta2 = torch.empty(4, 10, device="meta")
pts = torch.randn(5, 3)
pts_t = torch.randn(5, 6)
pts3 = torch.randn(2, 5, 3)
BOTH_LOGITS = r"(?s)student_logits.*teacher_logits"


def _csr(t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        return t.to_sparse_csr()


def _nested(layout):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors ... prototype stage"
        return torch.nested.nested_tensor([torch.randn(3, 10), torch.randn(2, 10)], layout=layout)


def _kl_fns():
    return [("softmax_kl_div", kdfast.softmax_kl_div), ("kd_loss", kdfast.kd_loss)]


def _rkd_fns():
    return [("rkd_distance_loss", kdfast.rkd_distance_loss), ("rkd_angle_loss", kdfast.rkd_angle_loss),
            ("rkd_loss", kdfast.rkd_loss)]


CASES = []


def case(name, fn, exc, match):
    CASES.append(pytest.param(fn, exc, match, id=name))


# ---- softmax_kl_div and kd_loss
for fname, f in _kl_fns():
    case(f"{fname}-shape-mismatch", lambda f=f: f(x2, torch.randn(4, 11)), ValueError, BOTH_LOGITS)
    case(f"{fname}-lead-mismatch", lambda f=f: f(x2, torch.randn(5, 10)), ValueError, BOTH_LOGITS)
    case(f"{fname}-int-student", lambda f=f: f(i2, y2), TypeError, "student_logits")
    case(f"{fname}-int-teacher", lambda f=f: f(x2, i2), TypeError, "teacher_logits")
    case(f"{fname}-bool-student", lambda f=f: f(x2 > 0, y2), TypeError, "student_logits")
    case(f"{fname}-complex-teacher", lambda f=f: f(x2, torch.randn(4, 10, dtype=torch.complex64)), TypeError,
         "teacher_logits")
    case(f"{fname}-list-student", lambda f=f: f(x2.tolist(), y2), TypeError, "student_logits")
    case(f"{fname}-numpy-teacher", lambda f=f: f(x2, y2.numpy()), TypeError, "teacher_logits")
    case(f"{fname}-none-teacher", lambda f=f: f(x2, None), TypeError, "teacher_logits")
    case(f"{fname}-scalar-logits", lambda f=f: f(torch.tensor(1.0), torch.tensor(2.0)), ValueError, "student_logits")
    case(f"{fname}-empty-vocab", lambda f=f: f(torch.randn(3, 0), torch.randn(3, 0)), ValueError,
         r"(?i)vocabulary")
    case(f"{fname}-device-mismatch", lambda f=f: f(x2, meta2), ValueError, BOTH_LOGITS)
    for T in (0.0, -1.0, math.nan, math.inf, -math.inf):
        case(f"{fname}-T={T}", lambda f=f, T=T: f(x2, y2, temperature=T), ValueError, "temperature")
    for T in (True, "2.0", None, torch.tensor(2.0), [2.0]):
        case(f"{fname}-T-{type(T).__name__}", lambda f=f, T=T: f(x2, y2, temperature=T), TypeError, "temperature")
    for r in ("avg", "elementwise_mean", "Sum", ""):
        case(f"{fname}-reduction-{r!r}", lambda f=f, r=r: f(x2, y2, reduction=r), ValueError, "reduction")
    case(f"{fname}-mask-shape", lambda f=f: f(x2, y2, mask=torch.ones(4, 10, dtype=torch.bool)), ValueError, "mask")
    case(f"{fname}-mask-short", lambda f=f: f(x2, y2, mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask")
    case(f"{fname}-mask-float", lambda f=f: f(x2, y2, mask=torch.ones(4)), TypeError, "mask")
    case(f"{fname}-mask-uint8", lambda f=f: f(x2, y2, mask=torch.ones(4, dtype=torch.uint8)), TypeError, "mask")
    case(f"{fname}-mask-list", lambda f=f: f(x2, y2, mask=[True] * 4), TypeError, "mask")
    case(f"{fname}-mask-device", lambda f=f: f(x2, y2, mask=torch.ones(4, dtype=torch.bool, device="meta")),
         ValueError, "mask")
    case(f"{fname}-sparse-student", lambda f=f: f(x2.to_sparse(), y2), TypeError, "student_logits")
    case(f"{fname}-sparse-csr-teacher", lambda f=f: f(x2, _csr(y2)), TypeError, "teacher_logits")
    case(f"{fname}-sparse-mask", lambda f=f: f(x2, y2, mask=torch.ones(4, dtype=torch.bool).to_sparse()),
         TypeError, "mask")
    for layout in (torch.strided, torch.jagged):
        case(f"{fname}-nested-{layout}", lambda f=f, lo=layout: f(_nested(lo), _nested(lo)), TypeError,
             "student_logits")

# ---- logit_mse
f = kdfast.logit_mse
case("logit_mse-shape-mismatch", lambda f=f: f(x2, torch.randn(4, 11)), ValueError, BOTH_LOGITS)
case("logit_mse-int", lambda f=f: f(i2, y2), TypeError, "student_logits")
case("logit_mse-int-teacher", lambda f=f: f(x2, i2), TypeError, "teacher_logits")
case("logit_mse-non-tensor", lambda f=f: f(x2, 3.0), TypeError, "teacher_logits")
case("logit_mse-reduction", lambda f=f: f(x2, y2, reduction="batchmean"), ValueError, "reduction")
case("logit_mse-device", lambda f=f: f(meta2, y2), ValueError, BOTH_LOGITS)

# ---- feature_l2
f = kdfast.feature_l2
case("feature_l2-shape-mismatch", lambda f=f: f(x2, torch.randn(4, 11)), ValueError, r"student_feats.*teacher_feats")
case("feature_l2-pair-shape-mismatch", lambda f=f: f([x2, x2], [y2, torch.randn(3, 10)]), ValueError,
     r"student_feats\[1\]")
case("feature_l2-int", lambda f=f: f(i2, y2), TypeError, "student_feats")
case("feature_l2-int-in-list", lambda f=f: f([x2, i2], [y2, y2]), TypeError, r"student_feats\[1\]")
case("feature_l2-non-tensor-in-list", lambda f=f: f([x2], [None]), TypeError, r"teacher_feats\[0\]")
case("feature_l2-non-tensor", lambda f=f: f(3.0, 4.0), TypeError, "student_feats")
case("feature_l2-tensor-vs-list", lambda f=f: f(x2, [y2]), TypeError, "student_feats")
case("feature_l2-length-mismatch", lambda f=f: f([x2, x2], [y2]), ValueError, r"(?s)student_feats.*teacher_feats")
case("feature_l2-empty", lambda f=f: f([], []), ValueError, "student_feats")
case("feature_l2-reduction", lambda f=f: f(x2, y2, reduction="none"), ValueError, "reduction")
case("feature_l2-reduction-bogus", lambda f=f: f(x2, y2, reduction="avg"), ValueError, "reduction")
case("feature_l2-device", lambda f=f: f([x2], [meta2]), ValueError, r"(?s)student_feats\[0\].*teacher_feats\[0\]")

# ---- cosine_loss
f = kdfast.cosine_loss
case("cosine_loss-shape-mismatch", lambda f=f: f(x2, torch.randn(4, 11)), ValueError, r"student_feats.*teacher_feats")
case("cosine_loss-int", lambda f=f: f(i2, y2), TypeError, "student_feats")
case("cosine_loss-non-tensor", lambda f=f: f(x2, "y"), TypeError, "teacher_feats")
case("cosine_loss-dim-range", lambda f=f: f(x2, y2, dim=2), ValueError, "dim")
case("cosine_loss-dim-range-neg", lambda f=f: f(x2, y2, dim=-3), ValueError, "dim")
case("cosine_loss-dim-float", lambda f=f: f(x2, y2, dim=1.0), TypeError, "dim")
case("cosine_loss-dim-bool", lambda f=f: f(x2, y2, dim=True), TypeError, "dim")
case("cosine_loss-eps-zero", lambda f=f: f(x2, y2, eps=0.0), ValueError, "eps")
case("cosine_loss-eps-nan", lambda f=f: f(x2, y2, eps=math.nan), ValueError, "eps")
case("cosine_loss-reduction", lambda f=f: f(x2, y2, reduction="batchmean"), ValueError, "reduction")
case("cosine_loss-device", lambda f=f: f(meta2, y2), ValueError, r"student_feats.*teacher_feats")

# ---- pairwise_distances
f = kdfast.pairwise_distances
case("pairwise_distances-1d", lambda f=f: f(torch.randn(5)), ValueError, r"\bx\b")
case("pairwise_distances-4d", lambda f=f: f(torch.randn(2, 2, 5, 3)), ValueError, r"\bx\b")
case("pairwise_distances-one-point", lambda f=f: f(torch.randn(1, 3)), ValueError, r"(?s)\bx\b.*2 points")
case("pairwise_distances-no-points", lambda f=f: f(torch.randn(2, 0, 3)), ValueError, r"(?s)\bx\b.*2 points")
case("pairwise_distances-empty-dim", lambda f=f: f(torch.randn(4, 0)), ValueError, r"\bx\b")
case("pairwise_distances-int", lambda f=f: f(torch.randint(0, 3, (5, 3))), TypeError, r"\bx\b")
case("pairwise_distances-non-tensor", lambda f=f: f([[1.0, 2.0], [3.0, 4.0]]), TypeError, r"\bx\b")
case("pairwise_distances-sparse", lambda f=f: f(pts.to_sparse()), TypeError, r"\bx\b")
case("pairwise_distances-eps-negative", lambda f=f: f(pts, eps=-1e-12), ValueError, "eps")
case("pairwise_distances-eps-nan", lambda f=f: f(pts, eps=math.nan), ValueError, "eps")

# ---- rkd_distance_loss, rkd_angle_loss, rkd_loss
for fname, f in _rkd_fns():
    case(f"{fname}-1d-student", lambda f=f: f(torch.randn(5), pts_t), ValueError, "student")
    case(f"{fname}-4d-teacher", lambda f=f: f(pts, torch.randn(1, 1, 5, 6)), ValueError, "teacher")
    case(f"{fname}-0d", lambda f=f: f(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "student")
    case(f"{fname}-one-point", lambda f=f: f(torch.randn(1, 3), torch.randn(1, 6)), ValueError,
         r"(?s)student.*2 points")
    case(f"{fname}-one-point-batched", lambda f=f: f(torch.randn(4, 1, 3), torch.randn(4, 1, 6)), ValueError,
         r"(?s)student.*2 points")
    case(f"{fname}-N-mismatch", lambda f=f: f(pts, torch.randn(6, 6)), ValueError, r"(?s)student.*teacher")
    case(f"{fname}-B-mismatch", lambda f=f: f(pts3, torch.randn(3, 5, 3)), ValueError, r"(?s)student.*teacher")
    case(f"{fname}-ndim-mismatch", lambda f=f: f(pts3, pts), ValueError, r"(?s)student.*teacher")
    case(f"{fname}-empty-dim", lambda f=f: f(torch.randn(5, 0), pts_t), ValueError, "student")
    case(f"{fname}-int", lambda f=f: f(torch.randint(0, 3, (5, 3)), pts_t), TypeError, "student")
    case(f"{fname}-int-teacher", lambda f=f: f(pts, torch.randint(0, 3, (5, 6))), TypeError, "teacher")
    case(f"{fname}-non-tensor", lambda f=f: f(pts.tolist(), pts_t), TypeError, "student")
    case(f"{fname}-device", lambda f=f: f(pts, torch.empty(5, 6, device="meta")), ValueError, r"(?s)student.*teacher")
    case(f"{fname}-sparse", lambda f=f: f(pts.to_sparse(), pts_t), TypeError, "student")
    for d in (0.0, -1.0, math.nan, math.inf):
        case(f"{fname}-delta={d}", lambda f=f, d=d: f(pts, pts_t, delta=d), ValueError, "delta")
    for d in (True, "1"):
        case(f"{fname}-delta-{type(d).__name__}", lambda f=f, d=d: f(pts, pts_t, delta=d), TypeError, "delta")
for fname, f in _rkd_fns()[:2]:
    case(f"{fname}-eps-negative", lambda f=f: f(pts, pts_t, eps=-1.0), ValueError, "eps")
f = kdfast.rkd_loss
case("rkd_loss-distance_weight-negative", lambda f=f: f(pts, pts_t, distance_weight=-1.0), ValueError, "distance_weight")
case("rkd_loss-distance_weight-nan", lambda f=f: f(pts, pts_t, distance_weight=math.nan), ValueError, "distance_weight")
case("rkd_loss-angle_weight-inf", lambda f=f: f(pts, pts_t, angle_weight=math.inf), ValueError, "angle_weight")
case("rkd_loss-angle_weight-str", lambda f=f: f(pts, pts_t, angle_weight="50"), TypeError, "angle_weight")


@pytest.mark.parametrize("fn,exc,match", CASES)
def test_bad_input(fn, exc, match):
    keep = [t.clone() for t in (x2, y2, pts, pts_t, pts3)]
    with pytest.raises(exc, match=match):
        fn()
    for a, b in zip(keep, (x2, y2, pts, pts_t, pts3)):
        assert torch.equal(a, b), "a rejected call changed an input"


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_input_same_under_every_backend(backend):
    """Validation does not depend on the backend."""
    kdfast.set_backend(backend)
    with pytest.raises(ValueError, match="temperature"):
        kdfast.kd_loss(x2, y2, temperature=0)
    with pytest.raises(ValueError, match="mask"):
        kdfast.softmax_kl_div(x2, y2, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="student_logits"):
        kdfast.softmax_kl_div(i2, y2)
    with pytest.raises(ValueError, match="vocabulary"):
        kdfast.kd_loss(torch.randn(2, 0), torch.randn(2, 0))


def test_reference_functions_validate_too():
    r = kdfast.reference
    with pytest.raises(ValueError, match="temperature"):
        r.softmax_kl_div(x2, y2, temperature=-1)
    with pytest.raises(ValueError, match="temperature"):
        r.kd_loss(x2, y2, temperature=math.nan)
    with pytest.raises(ValueError, match="reduction"):
        r.softmax_kl_div(x2, y2, reduction="avg")
    with pytest.raises(ValueError, match="delta"):
        r.rkd_loss(pts, pts_t, delta=0)
    with pytest.raises(ValueError, match="2 points"):
        r.rkd_angle_loss(torch.randn(1, 3), torch.randn(1, 3))


def test_set_backend_rejects_unknown():
    before = kdfast.get_backend()
    with pytest.raises(ValueError, match="backend"):
        kdfast.set_backend("bogus")
    with pytest.raises((ValueError, TypeError), match="backend"):
        kdfast.set_backend(3)
    assert kdfast.get_backend() == before


@pytest.mark.parametrize("module,args,kwargs,exc,match", [
    (kdfast.nn.KDLoss, (), dict(temperature=-1.0), ValueError, "temperature"),
    (kdfast.nn.SoftmaxKLDivLoss, (), dict(reduction="avg"), ValueError, "reduction"),
    (kdfast.nn.CosineLoss, (), dict(dim=5), ValueError, "dim"),
    (kdfast.nn.RKDLoss, (), dict(delta=0.0), ValueError, "delta"),
], ids=["KDLoss-T", "SoftmaxKLDivLoss-reduction", "CosineLoss-dim", "RKDLoss-delta"])
def test_modules_report_bad_settings(module, args, kwargs, exc, match):
    """A module with a bad setting fails with the function's message (at construction or at the
    first call)."""
    with pytest.raises(exc, match=match):
        m = module(*args, **kwargs)
        if isinstance(m, kdfast.nn.RKDLoss):
            m(pts, pts_t)
        else:
            m(x2, y2)


def test_feature_l2_module_bad_widths():
    with pytest.raises(ValueError, match="teacher_channels"):
        kdfast.nn.FeatureL2Loss(student_channels=8)
    with pytest.raises(ValueError, match="(?s)student_channels.*teacher_channels"):
        kdfast.nn.FeatureL2Loss(student_channels=[8, 4], teacher_channels=[16])


def test_cosine_module_bad_widths():
    with pytest.raises(ValueError, match="teacher_channels"):
        kdfast.nn.CosineLoss(teacher_channels=8)
    with pytest.raises(TypeError, match="student_channels"):
        kdfast.nn.CosineLoss(student_channels=[8], teacher_channels=[16])
    with pytest.raises(TypeError, match="teacher_channels"):
        kdfast.nn.CosineLoss(student_channels=8, teacher_channels=16.0)


@needs_cuda
def test_cuda_device_mismatch():
    xc = x2.cuda()
    with pytest.raises(ValueError, match=BOTH_LOGITS):
        kdfast.kd_loss(xc, y2)
    with pytest.raises(ValueError, match="mask"):
        kdfast.softmax_kl_div(xc, y2.cuda(), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="(?s)student.*teacher"):
        kdfast.rkd_loss(pts.cuda(), pts_t)
    with pytest.raises(ValueError, match=r"(?s)student_feats\[0\].*teacher_feats\[0\]"):
        kdfast.feature_l2([xc], [y2])
