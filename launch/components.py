"""TorchX component for the training job: the same trainer, on any scheduler.

    torchx run -s local_cwd launch/components.py:train --nnodes 1 --nproc_per_node 2 \\
        --config configs/synthetic.yaml train.epochs=2
    torchx run -s slurm      launch/components.py:train --nnodes 4 --nproc_per_node 8 --gpu 8 ...
    torchx run -s kubernetes launch/components.py:train --image my/registry/two-tower:tag \\
        --data s3://bucket/prepared/clicks --checkpoint_dir s3://bucket/ckpt/clicks --export_dir s3://bucket/exports

`.torchxconfig` sets `workspace =` (empty), so torchx never tries to build an image from the checkout
(the kubernetes image is one you built and pushed); pass `--workspace ""` when running from another
directory. The submitter's MLFLOW_* variables (MLFLOW_TRACKING_URI first) and its object-store settings
(AWS_*, GOOGLE_*, HADOOP_*: endpoint, region, credentials) are passed to every node. Replicas of an image
scheduler share no disk, so there `--data`, `--checkpoint_dir` and `--export_dir` must be URIs (s3://, gs://,
hdfs://); prefer the cluster's workload identity (IRSA, GKE) to keys in the environment, which the job spec
shows to whoever can read it.

Every node runs torchrun (`python -m launch.run`, which also records a killed worker as the job's
root cause), which starts nproc_per_node ranks and restarts them up to `max_restarts` times (the
trainer resumes from its latest verified checkpoint); `max_retries` asks the scheduler to re-run the
whole job (local schedulers ignore it).
"""

import os
import posixpath  # paths inside the containers, never opened here
import shlex
import sys
import warnings
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.specs import macros

from trainer.distributed import free_port

# Schedulers that run a container image: they need --image, and only these see a container port.
IMAGE_SCHEDULERS = ("kubernetes", "kubernetes_mcad", "aws_batch", "aws_sagemaker", "gcp_batch", "docker")
LOCAL_SCHEDULERS = ("local_cwd", "local_docker")
RDZV_PORT = 29500  # torchrun's usual rendezvous port, declared as the container port


def scheduler() -> Optional[str]:
    """The scheduler `torchx run` was asked for. torchx does not tell a component, so it is read from
    torchx's own command line (`-s NAME`, `--scheduler NAME` or `--scheduler=NAME`); None elsewhere."""
    argv = sys.argv
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-s", "--scheduler"):
            return argv[i + 1]
    return next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--scheduler=")), None)


def mlflow_env() -> Dict[str, str]:
    """The submitter's MLflow settings (tracking URI, credentials, experiment), for every node."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


STORAGE_PREFIXES = ("AWS_", "GOOGLE_", "HADOOP_")
STORAGE_KEYS = ("data.path", "checkpoint.dir", "export.dir")  # the config keys that name storage


def storage_env(target: Optional[str]) -> Dict[str, str]:
    """The submitter's object-store settings (endpoint, region, credentials), for every node. A setting that names
    a file on this machine (AWS_CA_BUNDLE, GOOGLE_APPLICATION_CREDENTIALS, ...) is not sent to the replicas of an
    image scheduler, where that file does not exist: mount it into the image and pass its path with --env."""
    found = {k: v for k, v in os.environ.items() if k.startswith(STORAGE_PREFIXES)}
    if target not in IMAGE_SCHEDULERS:
        return found
    paths = sorted(k for k, v in found.items() if v.startswith(("/", "~", "./", "../")))
    if paths:
        warnings.warn(f"not passed to the {target} replicas, as they name files on this machine: {', '.join(paths)} "
                      f"(mount the files into the image and pass --env NAME=<path in the container>)", stacklevel=3)
    return {k: v for k, v in found.items() if k not in paths}


def is_uri(value: str) -> bool:
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme.lower() not in ("", "file")


def storage_overrides(target: Optional[str], overrides: List[str], flags: Dict[str, str],
                      mounted: List[str] = ()) -> List[str]:
    """The storage flags as config overrides; on an image scheduler every storage location must be a URI, or a path
    under a volume mounted into every replica (`mounted`: the mounts' destinations)."""
    given = {key: value for key, value in flags.items() if value}
    given.update({o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides
                  if "=" in o and o.split("=", 1)[0] in STORAGE_KEYS and o.split("=", 1)[1]})
    if target in IMAGE_SCHEDULERS:
        local = [f"{key}={value}" for key, value in given.items()
                 if not is_uri(value) and not any(posixpath.normpath(value).startswith(posixpath.join(dst, ""))
                                                  or posixpath.normpath(value) == dst for dst in mounted)]
        if local:
            raise ValueError(f"the {target} scheduler's replicas share no disk, so data, checkpoints and exports need "
                             f"URIs every replica reaches (s3://, gs://, hdfs://) or paths under a --mounts volume: "
                             f"got {', '.join(local)}; pass --data, --checkpoint_dir and --export_dir")
    return [f"{key}={value}" for key, value in flags.items() if value]


def train(
    *overrides: str,
    config: str = "configs/synthetic.yaml",
    data: str = "",
    checkpoint_dir: str = "",
    export_dir: str = "",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = "",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
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
        data: the prepared dataset (data.path), a URI every node reads (s3://bucket/prepared/x)
        checkpoint_dir: checkpoint.dir, a URI every node writes and a restarted node finds again
        export_dir: export.dir, where rank 0 publishes the export (a URI serving reads)
        nnodes: number of nodes (scheduler replicas)
        nproc_per_node: ranks per node (GPUs per node on GPU hosts)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        image: container image, required by kubernetes and other image schedulers; local_cwd and slurm
            run in the current (shared) checkout and ignore it
        env: extra environment, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000 (the submitter's MLFLOW_*
            variables are passed on already)
        mounts: volumes for image schedulers, in torchx's syntax (as its dist.ddp takes them):
            type=volume,src=<PVC name>,dst=/data[,readonly] or type=bind,src=/host/path,dst=/data or
            type=device,src=/dev/fuse; a mounted path then works as data.path or checkpoint.dir
        max_retries: scheduler-level retries of the whole job
        max_restarts: torchrun restarts of failed ranks; the trainer resumes from its checkpoint
        rdzv_port: c10d rendezvous port on the first node of a multi-node job, also declared as the
            container port; 0: 29500 on image schedulers, a free port on local ones (so local jobs
            never collide)
        python: the Python interpreter on the nodes (with the project's requirements installed)
        name: job name
    """
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError("nnodes and nproc_per_node must be >= 1")
    target = scheduler()
    if target in IMAGE_SCHEDULERS and not image:
        raise ValueError(f"the {target} scheduler runs a container image: pass --image <registry>/<image>:<tag> "
                         f"(an image with this project and its requirements installed)")
    volumes = specs.parse_mounts(mounts) if mounts else []
    storage = storage_overrides(target, list(overrides), {"data.path": data, "checkpoint.dir": checkpoint_dir,
                                                          "export.dir": export_dir},
                                [posixpath.normpath(v.dst_path) for v in volumes if hasattr(v, "dst_path")])
    job_env = {**mlflow_env(), **storage_env(target), **(env or {})}
    uri = job_env.get("MLFLOW_TRACKING_URI", "")
    if nnodes > 1 and target not in LOCAL_SCHEDULERS and (not uri or uri.startswith(("sqlite:", "file:"))):
        warnings.warn(f"MLFLOW_TRACKING_URI is {uri or 'unset (sqlite:///mlflow.db)'}: on a {nnodes}-node job the run "
                      f"would go to a file on one node (lost with its container, and each attempt's node may "
                      f"differ); point it at an MLflow server", stacklevel=2)
    if nproc_per_node > 1 and gpu == 0 and target not in LOCAL_SCHEDULERS:
        warnings.warn(f"--nproc_per_node {nproc_per_node} without --gpu: {nproc_per_node} ranks share the node's "
                      f"{cpu} CPUs and no GPU is requested; pass --gpu {nproc_per_node} for one GPU per rank",
                      stacklevel=2)
    port = rdzv_port or (free_port("") if target in LOCAL_SCHEDULERS or target is None else RDZV_PORT)
    endpoint = "localhost:0" if nnodes == 1 else f"$${{{macros.rank0_env}:=localhost}}:{port}"
    # A fresh rendezvous store per restart round, hosted by rank 0: torchrun's shared agent store would make
    # the ranks of a restarted multi-node job wait in different namespaces (trainer/distributed.py).
    job_env = {"LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **job_env}
    cmd: List[str] = [
        python, "-m", "launch.run",  # torchrun that also records a killed worker as the root cause
        "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", macros.app_id,
        "--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node), "--max_restarts", str(max_restarts),
        "-m", "trainer", "--config", config, *storage, *overrides,
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
            port_map={"c10d": port},
            mounts=volumes,
        )],
    )
