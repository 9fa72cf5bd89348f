"""digits: a reproducible MNIST pipeline (DVC + PyTorch + MLflow)."""
