"""Process group and device: torchrun/torchx set RANK/WORLD_SIZE; without them this is dev mode."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(ValueError):
    """The configured device does not exist here; a one-line error, like a config error."""


def pick_device(wanted: str, local_rank: int) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device=cuda but no GPU is visible; use train.device=cpu or auto")
    if wanted in ("cuda", "auto") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                              f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now ("" checks every interface: for a rendezvous other machines reach)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init(device: str, timeout_s: int = 600) -> Env:
    """Joins the launcher's process group, or creates a world of one on loopback (dev mode)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend, store=elastic_store(rank, world, timeout_s), rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
        elif "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
    return Env(rank, world, local_rank, dev, backend)


def elastic_store(rank: int, world: int, timeout_s: int) -> dist.Store:
    """torchrun's store, namespaced by restart attempt: torchrun reuses its agent store across restarts,
    and keys left by the previous attempt's ranks (their gloo addresses) would otherwise be read."""
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts_store and rank == 0, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"two-tower/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
