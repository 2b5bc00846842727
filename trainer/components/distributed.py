"""Process-group setup for the three ways streamret starts: plain ``python`` (one rank),
``deepspeed``/``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* in the environment) and Ray Train
workers (which set the same variables before calling in)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    adopted: bool = False  # the process group was already up (Ray Train's workers) and was adopted

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but CUDA is not available; use run.device=auto or cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


SHM_COMM_ENV = "STREAMRET_DS_SHM_COMM"  # "1": let DeepSpeed build its CPU shared-memory comm op


def _skip_shm_comm_op() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op when its comm backend starts
    (a minute or more, in a cache that concurrent builds with other flags keep invalidating).
    Only ``inference_all_reduce`` uses it; training collectives go through gloo either way, so it
    is marked unavailable (DeepSpeed's documented-by-comment hook: edits to the probed dict persist)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(backend: str = "auto", device: str = "auto") -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (its engine needs a process group even with
    one rank). A single process with no launcher gets a private loopback rendezvous; a group that
    is already up (Ray Train's workers get one from ``TorchTrainer``) is adopted as it is."""
    if os.environ.get("DS_ACCELERATOR") is None and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
    import deepspeed

    adopted = torch.distributed.is_initialized()
    if adopted:
        # DeepSpeed reads these from the environment; keep them consistent with the live group.
        os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
    elif "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if adopted and torch.distributed.get_backend() != backend:
        raise RuntimeError(f"the process group is already initialised with backend {torch.distributed.get_backend()!r} "
                           f"but deepspeed.backend resolves to {backend!r}; set deepspeed.backend="
                           f"{torch.distributed.get_backend()} or let the launcher pick the same one")
    if dev.type == "cpu" and os.environ.get(SHM_COMM_ENV) != "1":
        _skip_shm_comm_op()
    # With a live group DeepSpeed only wraps it in deepspeed.comm (the engine needs that).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, dev, adopted)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def decided_once(pick):
    """``pick()`` on rank 0, its result on every rank (ranks started apart must agree on a choice)."""
    if not torch.distributed.is_initialized():
        return pick()
    box = [pick() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
