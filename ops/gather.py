"""Cross-rank feature gathers whose gradients are exact under DDP / DeepSpeed averaging.

`gather_with_grad` concatenates every rank's rows. Its backward all-reduces (sums) the incoming
gradient and keeps this rank's slice. DDP and DeepSpeed then average parameter gradients over the
W ranks, and the result is exactly the gradient of the global-batch loss in both usual modes:

- every rank computes the full global loss L: each rank's copy contributes dL/dx_r, the sum is
  W * dL/dx_r, and the 1/W of the parameter averaging cancels the W;
- local-loss mode (rank k computes L_k = its own rows against all gathered columns, mean over its
  rows; the global loss is mean_k L_k): the sum over ranks collects sum_k dL_k/dx_r and the
  averaging supplies the 1/W.

Returning only the local slice without the all-reduce (as the reference code did) drops the other
ranks' contributions and gives gradients W times too small in full-loss mode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_with_grad", "local_rows"]


def _world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_equal_shapes(x: Tensor, world: int) -> None:
    # One small collective so a mismatch fails loudly here instead of hanging or corrupting in
    # all_gather. The shape tensor lives on x's device because NCCL only moves CUDA tensors.
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    seen = [tuple(s.tolist()) for s in shapes]
    if any(s != seen[0] for s in seen):
        raise ValueError(
            f"gather_with_grad: every rank must pass the same shape, got {seen} (index = rank). "
            "Use drop_last in the loader or pad the last batch so all ranks have equal batch sizes.")


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = _world()
        _check_equal_shapes(x, world)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n_local = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd owns the incoming buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.n_local
        return grad[start:start + ctx.n_local]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate x [n, ...] from all ranks along dim 0 -> [world * n, ...], rank order.

    Identity when torch.distributed is not initialised or world_size == 1. Every rank must pass
    the same shape (ValueError otherwise). Works with gloo (CPU tensors) and NCCL (CUDA tensors).
    Backward: all_reduce(SUM) of the incoming gradient, then this rank's slice; see the module
    docstring for why that is exact under DDP/DeepSpeed gradient averaging."""
    _, world = _world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def local_rows(n_local: int) -> slice:
    """This rank's rows of a matrix whose rows were gathered with `gather_with_grad`.

    For local-loss mode: loss over sim[local_rows(n)] against all gathered columns."""
    rank, _ = _world()
    return slice(rank * n_local, (rank + 1) * n_local)
