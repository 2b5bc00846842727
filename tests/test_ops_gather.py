"""gather_with_grad: identity without a process group; exact global-batch gradients with 2 ranks."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ops.gather import gather_with_grad, local_rows
from ops.wti import wti_similarity
from tests.support import free_port


def test_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_grad(x)
    assert y is x
    assert local_rows(3) == slice(0, 3)


def _batch(n: int):
    g = torch.Generator().manual_seed(0)
    text_in = torch.randn(n, 3, 6, generator=g, dtype=torch.float64)
    video_in = torch.randn(n, 4, 6, generator=g, dtype=torch.float64)
    return text_in, video_in


def _model() -> torch.nn.ModuleDict:
    torch.manual_seed(1)
    return torch.nn.ModuleDict({"t": torch.nn.Linear(6, 5), "v": torch.nn.Linear(6, 5)}).double()


def _features(model, text_in, video_in):
    t = F.normalize(model["t"](text_in), dim=-1)
    v = F.normalize(model["v"](video_in), dim=-1)
    return t, v


def _weights(x: torch.Tensor):
    # Token weights that depend on the features, so weight gradients travel through the gather too.
    return (x.sum(-1) * 3).softmax(-1), torch.ones(x.shape[:2], dtype=torch.bool)


def _sym_ce(sim: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """Symmetric CE with logit scale 100; rows restricts both directions to local rows/columns."""
    n = sim.shape[0]
    target = torch.arange(n)
    if rows is None:
        return (F.cross_entropy(100 * sim, target) + F.cross_entropy(100 * sim.T, target)) / 2
    return (F.cross_entropy(100 * sim[rows], target[rows]) +
            F.cross_entropy(100 * sim.T[rows], target[rows])) / 2


def _loss(model, text_in, video_in, rows=None, gather=False):
    t, v = _features(model, text_in, video_in)
    tw, tm = _weights(t)
    vw, vm = _weights(v)
    if gather:
        t, tw, tm = gather_with_grad(t), gather_with_grad(tw), gather_with_grad(tm)
        v, vw, vm = gather_with_grad(v), gather_with_grad(vw), gather_with_grad(vm)
    return _sym_ce(wti_similarity(t, tw, tm, v, vw, vm, block=3), rows)


def _worker(rank: int, world: int, port: int, n: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        text_in, video_in = _batch(n)
        reference = _model()
        _loss(reference, text_in, video_in).backward()  # one process, whole batch
        mine = slice(rank * n // world, (rank + 1) * n // world)
        for mode in ("global", "local"):
            model = _model()
            rows = local_rows(n // world) if mode == "local" else None
            loss = _loss(model, text_in[mine], video_in[mine], rows=rows, gather=True)
            loss.backward()
            for p in model.parameters():  # what DDP / DeepSpeed do with parameter gradients
                dist.all_reduce(p.grad)
                p.grad /= world
            for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"rank {rank} mode {mode} {name}: {m}")
        with pytest.raises(ValueError, match="same shape"):
            gather_with_grad(torch.zeros(rank + 1, 2))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_single_process_in_both_loss_modes():
    mp.spawn(_worker, args=(2, free_port(), 8), nprocs=2, join=True)
