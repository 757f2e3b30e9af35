"""Training: config, two-tower model, loss, evaluation, tracking and the training loop."""
