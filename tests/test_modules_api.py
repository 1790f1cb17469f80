"""kdfast.nn modules, the backend switch, native_available, build_info and `python -m kdfast`."""
import copy
import io
import json
import pickle

import pytest
import torch

import kdfast
from kdfast import nn as knn

from conftest import needs_native


def _inputs():
    torch.manual_seed(1)
    logits = (torch.randn(4, 3, 30), torch.randn(4, 3, 30))
    feats = (torch.randn(6, 16), torch.randn(6, 16))
    return logits, feats


MODULE_CASES = [
    ("KDLoss", lambda: knn.KDLoss(temperature=3.0, reduction="mean"),
     lambda s, t: kdfast.kd_loss(s, t, temperature=3.0, reduction="mean"), "logits"),
    ("KDLoss-default", lambda: knn.KDLoss(), lambda s, t: kdfast.kd_loss(s, t), "logits"),
    ("SoftmaxKLDivLoss", lambda: knn.SoftmaxKLDivLoss(temperature=2.0, reduction="sum"),
     lambda s, t: kdfast.softmax_kl_div(s, t, temperature=2.0, reduction="sum"), "logits"),
    ("SoftmaxKLDivLoss-default", lambda: knn.SoftmaxKLDivLoss(), lambda s, t: kdfast.softmax_kl_div(s, t), "logits"),
    ("LogitMSELoss", lambda: knn.LogitMSELoss(reduction="sum"),
     lambda s, t: kdfast.logit_mse(s, t, reduction="sum"), "logits"),
    ("FeatureL2Loss", lambda: knn.FeatureL2Loss(), lambda s, t: kdfast.feature_l2(s, t), "feats"),
    ("FeatureL2Loss-same-width", lambda: knn.FeatureL2Loss(16, 16, reduction="sum"),
     lambda s, t: kdfast.feature_l2(s, t, reduction="sum"), "feats"),
    ("CosineLoss", lambda: knn.CosineLoss(dim=0, reduction="sum"),
     lambda s, t: kdfast.cosine_loss(s, t, dim=0, reduction="sum"), "feats"),
    ("RKDDistanceLoss", lambda: knn.RKDDistanceLoss(delta=0.5, squared=True),
     lambda s, t: kdfast.rkd_distance_loss(s, t, delta=0.5, squared=True), "feats"),
    ("RKDAngleLoss", lambda: knn.RKDAngleLoss(delta=2.0), lambda s, t: kdfast.rkd_angle_loss(s, t, delta=2.0), "feats"),
    ("RKDLoss", lambda: knn.RKDLoss(distance_weight=1.0, angle_weight=2.0, delta=0.7, squared=True, eps=0.25),
     lambda s, t: kdfast.rkd_loss(s, t, distance_weight=1.0, angle_weight=2.0, delta=0.7, squared=True, eps=0.25),
     "feats"),
    ("RKDLoss-default", lambda: knn.RKDLoss(), lambda s, t: kdfast.rkd_loss(s, t), "feats"),
]

# What each module's repr shows of its settings (extra_repr).
MODULE_REPRS = {
    "KDLoss": "temperature=3.0, reduction='mean'", "KDLoss-default": "temperature=4.0, reduction='batchmean'",
    "SoftmaxKLDivLoss": "temperature=2.0, reduction='sum'",
    "SoftmaxKLDivLoss-default": "temperature=1.0, reduction='batchmean'",
    "LogitMSELoss": "reduction='sum'", "FeatureL2Loss": "reduction='mean', channel_dim=-1",
    "FeatureL2Loss-same-width": "reduction='sum', channel_dim=-1", "CosineLoss": "dim=0, reduction='sum', eps=1e-08",
    "RKDDistanceLoss": "delta=0.5, squared=True, eps=1e-12", "RKDAngleLoss": "delta=2.0, eps=1e-12",
    "RKDLoss": "distance_weight=1.0, angle_weight=2.0, delta=0.7, squared=True, eps=0.25",
    "RKDLoss-default": "distance_weight=25.0, angle_weight=50.0, delta=1.0, squared=False, eps=1e-12",
}


@pytest.mark.parametrize("name,make,fn,kind", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_equals_function(name, make, fn, kind):
    logits, feats = _inputs()
    s, t = logits if kind == "logits" else feats
    module = make()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    out_m, out_f = module(s1, t), fn(s2, t)
    torch.testing.assert_close(out_m, out_f, rtol=0, atol=0)
    out_m.sum().backward()
    out_f.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=0)
    assert module.extra_repr() == MODULE_REPRS[name]
    assert repr(module).startswith(f"{type(module).__name__}(") and MODULE_REPRS[name] in repr(module)


def test_kl_modules_take_a_mask():
    (s, t), _ = _inputs()
    mask = torch.rand(4, 3) > 0.5
    torch.testing.assert_close(knn.KDLoss(reduction="mean")(s, t, mask=mask),
                               kdfast.kd_loss(s, t, reduction="mean", mask=mask), rtol=0, atol=0)
    torch.testing.assert_close(knn.SoftmaxKLDivLoss()(s, t, mask),
                               kdfast.softmax_kl_div(s, t, mask=mask), rtol=0, atol=0)


@pytest.mark.parametrize("name,make,fn,kind", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_pickle_deepcopy_state_dict(name, make, fn, kind):
    logits, feats = _inputs()
    s, t = logits if kind == "logits" else feats
    module = make()
    expected = module(s, t)
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert type(clone) is type(module)
        torch.testing.assert_close(clone(s, t), expected, rtol=0, atol=0)
    fresh = make()
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh(s, t), expected, rtol=0, atol=0)


def _train(module, s, t, opt, steps):
    """The module's loss after each of `steps` optimiser steps on its own parameters."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = module(s, t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _projection_module_roundtrip(module, s, t):
    expected = module(s, t)
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return expected, torch.load(buf)


@pytest.mark.parametrize("layout", ["NC_last", "NCHW_channel1"])
def test_feature_l2_projection_trains(layout):
    torch.manual_seed(3)
    if layout == "NC_last":
        cs, ct, channel_dim = 8, 12, -1
        module = knn.FeatureL2Loss(student_channels=cs, teacher_channels=ct)  # channel_dim=-1
        s = torch.randn(32, cs)
        t = s @ torch.randn(cs, ct)  # reachable by a linear map
    else:
        cs, ct, channel_dim = 4, 6, 1
        module = knn.FeatureL2Loss(student_channels=cs, teacher_channels=ct, channel_dim=channel_dim)
        s = torch.randn(8, cs, 5, 5)
        t = torch.einsum("nchw,cd->ndhw", s, torch.randn(cs, ct))
    assert sum(p.numel() for p in module.parameters()) == cs * ct, \
        "one bias-free linear projection from the student width to the teacher width"
    # the projection runs (and shapes work) before training
    first = module(s, t).item()
    losses = _train(module, s, t, torch.optim.SGD(module.parameters(), lr=0.1), 30)
    assert losses[0] == pytest.approx(first)
    assert losses[-1] < 0.5 * losses[0], f"the projection did not learn: {losses[0]:.4f} -> {losses[-1]:.4f}"
    # state_dict round trip keeps the trained projection
    expected, state = _projection_module_roundtrip(module, s, t)
    clone = knn.FeatureL2Loss(student_channels=cs, teacher_channels=ct, channel_dim=channel_dim)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone(s, t), expected, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(module)(s, t), expected, rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(module))(s, t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape,channel_dim", [((3, 4, 5, 6), 1), ((3, 4, 5), 1), ((2, 3, 4, 5), 2), ((6, 4), 0)])
def test_feature_l2_projection_in_place_layout(shape, channel_dim):
    """Where the channel dim is not last, the projection runs as a 1x1 convolution over the maps as
    they lie; it is the same linear map as the Linear over a permuted view: value and gradients
    (student and projection weight)."""
    torch.manual_seed(5)
    cs, ct = shape[channel_dim], 7
    module = knn.FeatureL2Loss(student_channels=cs, teacher_channels=ct, channel_dim=channel_dim).double()
    s = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    tshape = list(shape)
    tshape[channel_dim] = ct
    t = torch.randn(tshape, dtype=torch.float64)
    out = module(s, t)
    gs, gw = torch.autograd.grad(out, (s, module.projections[0].weight))
    s2 = s.detach().clone().requires_grad_()
    w2 = module.projections[0].weight.detach().clone().requires_grad_()
    want = kdfast.feature_l2(torch.nn.functional.linear(s2.movedim(channel_dim, -1), w2).movedim(-1, channel_dim), t)
    gs2, gw2 = torch.autograd.grad(want, (s2, w2))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(gs, gs2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gw, gw2, rtol=1e-10, atol=1e-14)


def test_feature_l2_projection_edge_cases():
    """The in-place projection's fallbacks and checks: an out-of-range channel_dim raises, an empty
    spatial dim gives the Linear path's result, and hooks on the projection still run."""
    module = knn.FeatureL2Loss(student_channels=4, teacher_channels=6, channel_dim=5)
    with pytest.raises(IndexError):
        module(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3))
    module = knn.FeatureL2Loss(student_channels=4, teacher_channels=6, channel_dim=1)
    out = module(torch.randn(2, 4, 0, 3), torch.randn(2, 6, 0, 3))
    assert out.shape == ()
    calls = []
    module.projections[0].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    module(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3))
    assert calls == [(2, 3, 3, 6)]


def test_feature_l2_multi_layer_projection():
    module = knn.FeatureL2Loss(student_channels=[4, 8], teacher_channels=[4, 16])
    s = [torch.randn(5, 4), torch.randn(5, 8)]
    t = [torch.randn(5, 4), torch.randn(5, 16)]
    out = module(s, t)
    assert out.shape == () and torch.isfinite(out)
    assert sum(p.numel() for p in module.parameters()) == 8 * 16  # identity for the equal-width layer
    proj = module.projections[1]
    torch.testing.assert_close(out, kdfast.feature_l2([s[0], proj(s[1])], t), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [-1, 1])
def test_cosine_projection_trains(dim):
    """CosineLoss with different widths: a bias-free projection along `dim` that learns to align a
    narrower student with a wider teacher, equal to cosine_loss of the projected student."""
    torch.manual_seed(4)
    module = knn.CosineLoss(dim=dim, student_channels=12, teacher_channels=20)
    s = torch.randn(16, 12) if dim == -1 else torch.randn(4, 12, 3)
    mix = torch.randn(12, 20)
    t = s @ mix if dim == -1 else torch.einsum("ncl,cd->ndl", s, mix)
    assert sum(p.numel() for p in module.parameters()) == 12 * 20
    proj = module.projections[0]
    ps = proj(s) if dim == -1 else proj(s.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(module(s, t), kdfast.cosine_loss(ps, t, dim=dim), rtol=0, atol=0)
    losses = _train(module, s, t, torch.optim.Adam(module.parameters(), lr=0.05), 40)
    assert losses[-1] < 0.3 * losses[0], f"the projection did not learn: {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert knn.CosineLoss(student_channels=8, teacher_channels=8).projections[0].__class__ is torch.nn.Identity
    with pytest.raises(ValueError, match="student_channels"):
        knn.CosineLoss(student_channels=8)
    with pytest.raises(TypeError, match="student_channels"):
        knn.CosineLoss(student_channels=[8], teacher_channels=[16])


# ----------------------------------------------------------------------------- backends

def test_set_get_backend():
    for name in ("reference", "auto", "native"):
        kdfast.set_backend(name)
        assert kdfast.get_backend() == name
    kdfast.set_backend(" Reference ")
    assert kdfast.get_backend() == "reference"


@needs_native
def test_backend_selects_implementation():
    """'reference' runs the pure-PyTorch formula (log_softmax in the graph); 'native' and 'auto'
    run the fused op (a custom autograd node and no log_softmax)."""
    s = torch.randn(3, 10, requires_grad=True)
    t = torch.randn(3, 10)

    def nodes(out):
        seen, stack = set(), [out.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
        return seen

    def is_custom(fn):
        return isinstance(fn, torch.autograd.function.BackwardCFunction)

    kdfast.set_backend("reference")
    graph = nodes(kdfast.kd_loss(s, t))
    assert any(type(f).__name__.startswith("LogSoftmaxBackward") for f in graph)
    assert not any(is_custom(f) for f in graph)
    for name in ("native", "auto"):
        kdfast.set_backend(name)
        graph = nodes(kdfast.kd_loss(s, t))
        assert any(is_custom(f) for f in graph), name
        assert not any(type(f).__name__.startswith("LogSoftmaxBackward") for f in graph), name


def test_native_available():
    assert kdfast.native_available("cpu") is True
    assert kdfast.native_available(torch.device("cpu")) is True
    assert kdfast.native_available("meta") is False
    if not torch.cuda.is_available():
        assert kdfast.native_available("cuda") is False


def test_native_backend_without_kernel_for_device_errors():
    kdfast.set_backend("native")
    with pytest.raises(RuntimeError, match="native"):
        kdfast.kd_loss(torch.empty(2, 5, device="meta"), torch.empty(2, 5, device="meta"))


def test_backend_env(python_jobs):
    proc = python_jobs["backend=reference"].result()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == "reference"
    # unset: "auto" (python -m kdfast runs without KDFAST_*); KDFAST_BACKEND=AUTO: see test_isa
    unset = python_jobs["python -m kdfast"].result()
    assert unset.returncode == 0, unset.stderr
    assert json.loads(unset.stdout)["backend"] == "auto"


def test_backend_env_unknown(python_jobs):
    proc = python_jobs["backend=fastest"].result()
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "fastest" in proc.stderr


# ----------------------------------------------------------------------------- build info

BUILD_KEYS = {"version", "torch", "cpu_isa_compiled", "cpu_isa_selected", "openmp", "threads", "cuda", "cuda_archs"}


def test_build_info():
    info = kdfast.build_info()
    assert BUILD_KEYS <= set(info)
    assert info["version"] == kdfast.__version__
    assert info["torch"] == torch.__version__
    assert info["openmp"] is True
    assert info["threads"] == torch.get_num_threads()
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], list)
    assert info["cpu_isa_selected"] in info["cpu_isa_compiled"]
    assert "default" in info["cpu_isa_compiled"]
    if not info["cuda"]:
        assert info["cuda_archs"] == []
    json.dumps(info)  # plain data


def test_python_m_kdfast_prints_json(python_jobs):
    proc = python_jobs["python -m kdfast"].result()
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert BUILD_KEYS <= set(info)
    assert info["openmp"] is True
    assert info["cpu_isa_selected"] in info["cpu_isa_compiled"]
    assert info["version"] == kdfast.__version__
