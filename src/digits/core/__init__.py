"""The foundations every layer uses: errors, files, MNIST facts, numerics pins, params, BLAS."""
