"""The names `load_model(quant=...)` and `--quant` accept (no torch import: the command line
lists them without loading torch)."""

# "keep" keeps what the file stores quantized; the others quantize float weights at load
# ("int4" in groups of 32, "int4-g128" in groups of 128)
QUANT_MODES = ("keep", "int8", "int4", "int4-g128", "q8_0", "q4_k")
