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
# each (chunk x V) buffer (either side's logits, the logit gradient; three are live at once) stays
# near 48 MB in fp32 on the CPU: 393 tokens at V = 32000. Bench case "N=2048 H=512/768 V=32000 fp32
# jsd" (commit message of this value): 512-token chunks held about 0.1x the eager code's peak memory
# (the bar), 262-token chunks cost a tenth more time than 512 (smaller GEMMs). CUDA: 261
# tokens at V = 128256, near Liger's 256 for its shapes (not measured).
FUSED_LINEAR_CHUNK_ELEMS = {"cpu": 3 << 22, "cuda": 1 << 25}
FUSED_LINEAR_CHUNK_ELEMS_DEFAULT = 1 << 24
