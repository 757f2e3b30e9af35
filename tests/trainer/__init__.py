"""The loss against float64 references, evaluation, and the training loop in one process."""
