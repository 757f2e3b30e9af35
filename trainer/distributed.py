"""Process group and device: torchrun/torchx set RANK/WORLD_SIZE; without them this is dev mode."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from storage import location

log = logging.getLogger(__name__)


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


def write_error_file(path: str, message: str, timestamp: float, callstack: str | None = None) -> None:
    """A torchelastic error file (the JSON torchrun and torchx read), whole or not at all: when one rank dies,
    torchrun's agent SIGTERMs the others and parses their files; one killed while torch's own handler was
    writing left an empty file, and the agent crashed on it instead of restarting the job (seen in CI)."""
    extra = {"timestamp": str(int(timestamp)), **({"py_callstack": callstack} if callstack else {})}
    location(path).write_text(json.dumps({"message": {"message": message, "extraInfo": extra}}))
    os.utime(path, (timestamp, timestamp))


class WholeErrorFile(ErrorHandler):
    """torch's error handler, writing through `write_error_file`."""

    def record_exception(self, e: BaseException) -> None:
        path = self._get_error_file_path()
        if path:
            write_error_file(path, f"{type(e).__name__}: {e}", time.time(), traceback.format_exc())


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
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend, store=agent_store(rank, world, timeout_s), rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
        elif "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
    return Env(rank, world, local_rank, dev, backend)


def agent_store(rank: int, world: int, timeout_s: int) -> dist.Store:
    """torchrun's agent store, which lives across restarts, namespaced by restart attempt so that keys
    left by the previous attempt's ranks (their gloo addresses) are not read.

    The attempt is the local agent's restart count, which only a single node can rely on: after one
    node's worker fails, the healthy node restarts its workers without counting a restart, so two
    nodes would wait in different namespaces. Multi-node jobs therefore run torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the torchx component sets it): then every rendezvous round
    gets a fresh store, hosted by rank 0, and `init` never comes here."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world > local_world and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and rank == 0:
        log.warning("a multi-node job with restarts shares torchrun's agent store: a restart can hang until "
                    "train.collective_timeout_s. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (the "
                    "torchx component does)")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"two-tower/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
