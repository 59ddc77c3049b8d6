"""Hand-written CPU kernels where torch has no fast path: an optional fast path for the math
of gemmakit/model/, which decides when to use them.

- gemv.py: the bfloat16 GEMV of decoding (bf16_gemv.c), at close to memory bandwidth, and its
  float32 twin;
- decode_step.py: a whole decode step of the layer stack in one call (decode_step.c), which
  gemmakit/model/fast_decode.py drives;
- train_ops.py: fused RMSNorm, RoPE, GELU gating and cross-entropy rows for CPU training steps
  (train_ops.c);
- build.py: compiling, verifying and loading each source as its own library.

Each library builds and falls back to torch on its own; a failure is warned about once per
process. GEMMAKIT_NO_KERNELS=1 turns them all off.
"""
