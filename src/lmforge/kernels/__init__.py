"""CPU kernel choices (`cpu_kernels`): float32 Linears on oneDNN (linear.py), bf16 causal attention as GEMMs
(cpu_attention.py), inductor-compiled elementwise kernels (compiled.py, gelu.py), and the switch between them
and torch's defaults (cpu_kernels.py).

A package of its own, importing nothing from lmforge but errors, so that models, losses and the strategy can
all import it without import cycles.
"""
