"""Weights kept quantized: the formats (formats.py), the weight module that `linear` and the
embedding dispatch on (weight.py), quantizing a model or loading one quantized (model.py),
llama.cpp's Q8_0/Q4_K quantizers (ggml.py) and the quantized checkpoint (checkpoint.py)."""
