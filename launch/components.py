"""TorchX component for the training job: the same trainer, on any scheduler.

    torchx run -s local_cwd launch/components.py:train --nnodes 1 --nproc_per_node 2 \
        --config configs/synthetic.yaml train.epochs=2
    torchx run -s slurm      launch/components.py:train --nnodes 4 --nproc_per_node 8 --gpu 8 ...
    torchx run -s kubernetes launch/components.py:train --image my/registry/two-tower:tag ...

Every node runs torchrun (`python -m launch.run`, which also records a killed worker as the job's
root cause), which starts nproc_per_node ranks and restarts them up to `max_restarts` times (the
trainer resumes from its latest verified checkpoint); `max_retries` asks the scheduler to re-run the
whole job (local schedulers ignore it).
"""


import os
import shlex
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.specs import macros

from trainer.distributed import free_port


def train(
    *overrides: str,
    config: str = "configs/synthetic.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = os.getcwd(),
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 0,
    python: str = "python",
    name: str = "two-tower",
) -> specs.AppDef:
    """Two-tower retrieval training.

    Args:
        overrides: config overrides for the trainer, section.key=value
        config: YAML job config, relative to the image's working directory
        nnodes: number of nodes (scheduler replicas)
        nproc_per_node: ranks per node (GPUs per node on GPU hosts)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        image: container image (kubernetes), or the working directory (local_cwd, slurm)
        env: extra environment, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000
        max_retries: scheduler-level retries of the whole job
        max_restarts: torchrun restarts of failed ranks; the trainer resumes from its checkpoint
        rdzv_port: c10d rendezvous port on the first node for multi-node jobs; 0 picks a free one
        python: the Python interpreter on the nodes (with the project's requirements installed)
        name: job name
    """
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError("nnodes and nproc_per_node must be >= 1")
    if nnodes == 1:
        endpoint = "localhost:0"  # one agent: torchrun picks a free port itself
    else:
        port = rdzv_port or free_port("")
        endpoint = f"$${{{macros.rank0_env}:=localhost}}:{port}"
    # A fresh rendezvous store per restart round, hosted by rank 0: torchrun's shared agent store would make
    # the ranks of a restarted multi-node job wait in different namespaces (trainer/distributed.py).
    job_env = {"LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
               **(env or {})}
    cmd: List[str] = [
        python, "-m", "launch.run",  # torchrun that also records a killed worker as the root cause
        "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", macros.app_id,
        "--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node), "--max_restarts", str(max_restarts),
        "-m", "trainer", "--config", config, *overrides,
    ]
    command = " ".join(part if part.startswith("$$") else shlex.quote(part) for part in cmd)
    return specs.AppDef(
        name=name,
        roles=[specs.Role(
            name="trainer",
            image=image,
            entrypoint="bash",
            args=["-c", command],
            num_replicas=nnodes,
            resource=specs.Resource(cpu=cpu, gpu=gpu, memMB=memMB),
            env=job_env,
            max_retries=max_retries,
            port_map={"c10d": rdzv_port or 29500},
        )],
    )
