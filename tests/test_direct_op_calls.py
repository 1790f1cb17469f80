"""torch.ops.kdfast.* are public: called directly, without kdfast's Python validation, bad arguments
get a RuntimeError (TORCH_CHECK) that names the argument, on every device the op is built for,
never a NaN, a negative loss or a crash. The Python API's own errors are in test_errors.py."""
import math

import pytest
import torch

from conftest import needs_native

pytestmark = needs_native

ops = torch.ops.kdfast if hasattr(torch.ops, "kdfast") else None

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and hasattr(torch.ops.kdfast, "softmax_kl") and
                     torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::softmax_kl", "CUDA") else [])


def raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inv_t", [0.0, -1.0, math.inf, -math.inf, math.nan])
def test_softmax_kl_inv_temperature(device, inv_t):
    s = torch.randn(3, 7, device=device)
    w = torch.ones(3, device=device)
    raises("inv_temperature", ops.softmax_kl, s, s.clone(), inv_t, 0, 0.0, w, True, False)


@pytest.mark.parametrize("device", DEVICES)
def test_row_ops_element_type(device):
    s = torch.randint(0, 5, (3, 7), device=device)
    w = torch.ones(3, device=device)
    raises("student must be float32, float64, float16 or bfloat16", ops.softmax_kl, s, s, 1.0, 0, 0.0, w, True, False)
    raises("student must be float32, float64, float16 or bfloat16", ops.feature_match, s, s, False, 0.0, w,
           True, False)
    raises("grad must be float32", ops.scale_rows_, s, torch.ones(3, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [-1.0, math.nan, math.inf])
def test_feature_match_eps(device, eps):
    s = torch.randn(3, 7, device=device)
    raises("eps", ops.feature_match, s, s.clone(), True, eps, torch.ones(3, device=device), True, False)


def _rkd(x, y, delta=1.0, eps=1e-12, squared=False, dw=1.0, aw=1.0):
    return ops.rkd(x, y, dw, aw, delta, squared, eps, torch.ones(x.shape[0], device=x.device), True, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("delta", [0.0, -1.0, math.nan, math.inf])
def test_rkd_delta(device, delta):
    x = torch.randn(1, 5, 3, device=device)
    raises("delta", _rkd, x, 2 * x, delta)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [-1.0, math.nan, math.inf])
def test_relation_eps(device, eps):
    x = torch.randn(1, 5, 3, device=device)
    raises("eps", _rkd, x, 2 * x, 1.0, eps)
    raises("eps", ops.pairwise_distances, x, False, True, eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", [(math.nan, 1.0), (1.0, -math.inf), (-1.0, 1.0)])
def test_rkd_term_weights(device, weights):
    x = torch.randn(1, 5, 3, device=device)
    raises("weight", _rkd, x, 2 * x, 1.0, 1e-12, False, *weights)


@pytest.mark.parametrize("device", DEVICES)
def test_relation_empty_features(device):
    x = torch.randn(1, 5, 0, device=device)
    y = torch.randn(1, 5, 3, device=device)
    raises("student points need at least one coordinate", _rkd, x, y)
    raises("teacher points need at least one coordinate", _rkd, y, x)
    raises("x points need at least one coordinate", ops.pairwise_distances, x, False, True, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_relation_element_type(device, dtype):
    x = torch.ones(1, 5, 3, device=device).to(dtype)
    raises("x must be float32, float64, float16 or bfloat16", ops.pairwise_distances, x, False, True, 1e-12)
    raises("student must be float32, float64, float16 or bfloat16", _rkd, x, x)
