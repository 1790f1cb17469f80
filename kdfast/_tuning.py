"""The tuning constants of kdfast's Python layer, in one place (the C++ ones are in
csrc/common/tuning.h). Each comment names the bench case (`python -m bench`) or the commit whose
measurement chose the value; the figures themselves live in bench/results and commit messages."""

# Below this many elements (keyed by the element size in bytes of the dtype the op would run in),
# the "auto" backend sends a CPU squared error (logit_mse, feature_l2) to ATen's mse_loss: one
# kernel behind a C++ autograd node costs less there than the fused op behind a Python autograd
# Function. "native" always runs the fused op; CUDA always does (not measured). Chosen from step
# times of 32 x 10 to 256 x 1024 logits in fp32 and bf16 (commit fa4ae3f); the bench's
# "logit_mse 2048x4096" and "feature_l2 3 layers" cases lie above it and stay fused.
ATEN_MSE_BELOW = {2: 32768, 4: 65536, 8: 65536}
ATEN_MSE_BELOW_DEFAULT = 65536

# The fused squared error only needs the total, so it views a tensor as (rows, C) with C the
# product of the trailing dims up to at least this many elements: rows long enough for the vector
# loop, and enough of them to share between threads ("feature_l2 3 layers": 32 x 64 x 32 x 32 maps
# become rows of 1024 x 4 = 4096).
SQ_ERROR_MIN_ROW = 4096

# fused_linear_distill_loss's default chunk: tokens per chunk = this many elements // V, so that
# each (chunk x V) buffer (either side's logits, the logit gradient) stays near 64 MB in fp32 (a
# 512-token chunk at V = 32000; bench case "fused_linear_jsd 2048 H512/768 V32000").
FUSED_LINEAR_CHUNK_ELEMS = 1 << 24
