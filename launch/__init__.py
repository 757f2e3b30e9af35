"""TorchX components that launch the trainer on one machine, Slurm or Kubernetes."""
