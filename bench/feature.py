"""Feature losses and logit L2, forward+backward of the student tensors, at modest sizes. These are
memory-bound: kdfast's fused feature_match op reads each input once and writes the gradient in the
same call (cosine re-reads each row from cache), which is as close to the byte floor as a loss gets.

  logit_mse    kdfast.logit_mse(s, t)        vs F.mse_loss(s, t)
  cosine       kdfast.cosine_loss(s, t)      vs (1 - F.cosine_similarity(s, t, dim=-1)).mean()
  feature_l2   kdfast.feature_l2(S, T)       vs sum(F.mse_loss(s, t) for s, t in zip(S, T)),
               three (student, teacher) layer pairs of a small CNN
each also against torch.compile of the eager function. Gelem/s counts the student's elements.
"""
import torch
import torch.nn.functional as F

from bench.harness import DTYPES, Case, Contender, compile_fn, generator, has_kernel

FAMILY = "feature"


def eager_mse(s, t):
    return F.mse_loss(s, t)


def eager_cosine(s, t):
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def eager_feature_l2(*xs):
    k = len(xs) // 2
    return sum(F.mse_loss(s, t) for s, t in zip(xs[:k], xs[k:]))


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def cases(settings, device):
    q = settings.mode == "quick"
    logits = (64, 256) if q else (2048, 4096)
    feats = (128, 64) if q else (8192, 768)
    layers = ([(4, 8, 8, 8), (4, 16, 4, 4)] if q
              else [(32, 64, 32, 32), (32, 128, 16, 16), (32, 256, 8, 8)])
    out = [
        Case(FAMILY, f"logit_mse {logits[0]}x{logits[1]}", device,
             {"loss": "logit_mse", "shapes": [logits], "dtype": "fp32"}, _numel(logits), "student elements"),
        Case(FAMILY, f"cosine {feats[0]}x{feats[1]}", device,
             {"loss": "cosine", "shapes": [feats], "dtype": "fp32"}, _numel(feats), "student elements"),
        Case(FAMILY, f"feature_l2 {len(layers)} layers", device,
             {"loss": "feature_l2", "shapes": layers, "dtype": "fp32"},
             sum(_numel(s) for s in layers), "student elements"),
    ]
    return out


def make_inputs(case):
    dev, dtype = case.device, DTYPES[case.params["dtype"]]
    g = generator(dev)
    shapes = [tuple(s) for s in case.params["shapes"]]
    students = [torch.randn(s, device=dev, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]
    teachers = [torch.randn(s, device=dev, generator=g, dtype=dtype) for s in shapes]
    return (*students, *teachers)


def contenders(case, settings):
    import kdfast
    loss = case.params["loss"]
    if loss == "logit_mse":
        kd, eager = (lambda s, t: kdfast.logit_mse(s, t)), eager_mse
    elif loss == "cosine":
        kd, eager = (lambda s, t: kdfast.cosine_loss(s, t, dim=-1)), eager_cosine
    else:
        def kd(*xs):
            k = len(xs) // 2
            return kdfast.feature_l2(list(xs[:k]), list(xs[k:]))
        eager = eager_feature_l2
    native = has_kernel("kdfast::feature_match", case.device)
    out = [Contender("kdfast", kd, is_kdfast=True, native=native), Contender("eager", eager)]
    if case.with_compile:
        out.append(Contender("torch.compile", compile_fn(eager), compiled=True))
    return out
