"""The model layer: loading the base and reference models, per-token CE (the head's kernels), dropout on CPU, memory."""
