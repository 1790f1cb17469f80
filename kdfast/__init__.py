"""kdfast: fused knowledge-distillation losses for PyTorch.

    import kdfast
    loss = kdfast.kd_loss(student_logits, teacher_logits, temperature=4.0)

Every loss also exists as a module in kdfast.nn and as pure PyTorch in kdfast.reference.
"""
from kdfast._version import __version__
from kdfast import _ops  # loads the extension (if built) first
from kdfast._backend import get_backend, native_available, set_backend
from kdfast._grad_scale_prediction import grad_scale_prediction_enabled, set_grad_scale_prediction
from kdfast._info import build_info
from kdfast.functional import (cosine_loss, feature_l2, fused_linear_distill_loss, generalized_jsd, kd_loss, logit_mse, pairwise_distances,
                               reverse_kl_div, rkd_angle_loss, rkd_distance_loss, rkd_loss, skew_kl_div,
                               softmax_kl_div, sparse_kl_div, tv_distance)
from kdfast import nn, reference  # noqa: E402

__all__ = ["softmax_kl_div", "kd_loss", "generalized_jsd", "reverse_kl_div", "skew_kl_div", "tv_distance", "sparse_kl_div", "logit_mse", "feature_l2", "cosine_loss", "pairwise_distances",
           "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "fused_linear_distill_loss", "set_backend", "get_backend",
           "native_available", "build_info", "set_grad_scale_prediction", "grad_scale_prediction_enabled",
           "nn", "reference"]
