"""End to end: real processes, servers and commands (torchrun, torchx, MLflow, S3, the CLIs), faults injected."""
