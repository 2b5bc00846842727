"""Token-level "WTI" similarity between texts and videos (method.md section 2).

For text a with words i and video b with frames j, A[a,b,i,j] = <text[a,i], video[b,j]> with
padded cells set to 0, and

    s_t2v[a,b] = sum_i text_weight[a,i]  * max_j A[a,b,i,j]
    s_v2t[a,b] = sum_j video_weight[b,j] * max_i A[a,b,i,j]
    s[a,b]     = (s_t2v[a,b] + s_v2t[a,b]) / 2

The naive einsum materialises A whole: Nt x Nv x Lw x Lf floats, 17 GB at N=1024, L=64.
`wti_similarity` computes s and its gradient tile by tile (text block x video block) and recomputes
each tile in backward, so memory is O(inputs + one tile) whatever the pool size.

The gradient of a tile flows only through its argmaxes: at most Lw + Lf of the Lw x Lf cells of
each (text, video) pair, 3% at L=64. The "dense" backward scatters them into a zero tile and
runs two matmuls (2x the forward's FLOPs); the "gather" backward sums just those rows with
``embedding_bag``. On 2 CPU cores (N=256, L=64, d=512, ``launch/bench.py ops --backward``) that
took the backward from 6.1 s to 3.3 s, forward + backward from 8.0 s to 5.2 s (naive: 7.6 s). On CUDA dense stays the default: tensor cores run the two matmuls in
less time than the gathers move their 2 * block^2 * (Lw + Lf) * d floats (an estimate, not yet
measured: no GPU in this project so far).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["wti_similarity", "wti_similarity_naive", "wti_topk"]


def _check_inputs(text: Tensor, text_weight: Tensor, text_mask: Tensor,
                  video: Tensor, video_weight: Tensor, video_mask: Tensor) -> None:
    if text.dim() != 3 or video.dim() != 3:
        raise ValueError(f"wti: text and video must be [N, L, d]; got text {tuple(text.shape)}, "
                         f"video {tuple(video.shape)}")
    if text.shape[-1] != video.shape[-1]:
        raise ValueError(f"wti: feature sizes differ: text d={text.shape[-1]}, video d={video.shape[-1]}")
    for name, t, ref in (("text_weight", text_weight, text), ("text_mask", text_mask, text),
                         ("video_weight", video_weight, video), ("video_mask", video_mask, video)):
        if tuple(t.shape) != tuple(ref.shape[:2]):
            raise ValueError(f"wti: {name} must have shape {tuple(ref.shape[:2])}, got {tuple(t.shape)}")
    if text_mask.dtype != torch.bool or video_mask.dtype != torch.bool:
        raise ValueError(f"wti: masks must be bool (True = real token); got text_mask {text_mask.dtype}, "
                         f"video_mask {video_mask.dtype}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in fp32 at least (fp64 stays fp64 so tests can be exact)."""
    return torch.promote_types(dtype, torch.float32)


_CUDA_OUT_DTYPE_MM = True  # flipped off once if this build lacks torch.mm(..., out_dtype=)


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b with the result in the accumulation dtype.

    bf16 products rounded to bf16 would flip near-tied argmaxes and send whole gradients to the
    wrong token (~10% gradient error measured at L=32), so reduced-precision tiles come out fp32:
    on CUDA from the tensor-core kernel's fp32 accumulator, elsewhere by upcasting the operands."""
    global _CUDA_OUT_DTYPE_MM
    if a.dtype == acc and b.dtype == acc:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and _CUDA_OUT_DTYPE_MM:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (RuntimeError, NotImplementedError, TypeError):
            _CUDA_OUT_DTYPE_MM = False
    return a.to(acc) @ b.to(acc)


def _tile_scores(text_blk: Tensor, video_blk: Tensor, acc: torch.dtype) -> Tensor:
    """One tile of A as [bt, Lw, bv, Lf] via a single [bt*Lw, d] x [d, bv*Lf] matmul.

    Inputs are already zero at padded tokens, so masked cells come out exactly 0 with no fill."""
    bt, lw, d = text_blk.shape
    bv, lf, _ = video_blk.shape
    return _mm(text_blk.reshape(bt * lw, d), video_blk.reshape(bv * lf, d).T, acc).view(bt, lw, bv, lf)


def _tile_similarity(a: Tensor, text_weight_blk: Tensor, video_weight_blk: Tensor) -> Tensor:
    """s for one tile from A [bt, Lw, bv, Lf]; A and weights in the accumulation dtype."""
    max_over_frames = a.amax(dim=3)  # [bt, Lw, bv]
    max_over_words = a.amax(dim=1)  # [bt, bv, Lf]
    s_t2v = torch.einsum("ai,aib->ab", text_weight_blk, max_over_frames)
    s_v2t = torch.einsum("bj,abj->ab", video_weight_blk, max_over_words)
    return (s_t2v + s_v2t) * 0.5


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    return x * mask.unsqueeze(-1).to(x.dtype)


def _blocked_similarity(text: Tensor, text_weight: Tensor, text_mask: Tensor, video: Tensor,
                        video_weight: Tensor, video_mask: Tensor, block: int) -> Tensor:
    """Forward over tiles; weights already in the accumulation dtype.

    Padding is zeroed per block rather than in full masked copies, which would cost as much
    memory as the inputs (1 GB at N=4096, L=64, d=512 fp32)."""
    nt, nv = text.shape[0], video.shape[0]
    out = torch.empty(nt, nv, dtype=text_weight.dtype, device=text.device)
    for t0 in range(0, nt, block):
        t1 = min(t0 + block, nt)
        text_blk = _masked(text[t0:t1], text_mask[t0:t1])
        for v0 in range(0, nv, block):
            v1 = min(v0 + block, nv)
            a = _tile_scores(text_blk, _masked(video[v0:v1], video_mask[v0:v1]), text_weight.dtype)
            out[t0:t1, v0:v1] = _tile_similarity(a, text_weight[t0:t1], video_weight[v0:v1])
    return out


def _bag_sum(bags: Tensor, rows: Tensor, weights: Tensor, table: Tensor, num_bags: int) -> Tensor:
    """out[k] = sum of weights[e] * table[rows[e]] over the entries e with bags[e] == k."""
    bags, order = bags.sort(stable=True)  # a fixed summation order per bag, whatever the thread count
    offsets = torch.zeros(num_bags, dtype=torch.long, device=table.device)
    offsets[1:] = torch.bincount(bags, minlength=num_bags)[:-1].cumsum(0)
    return F.embedding_bag(rows[order], table, offsets, mode="sum", per_sample_weights=weights[order])


def _gather_tile_grads(j_star: Tensor, i_star: Tensor, coef_t2v: Tensor, coef_v2t: Tensor, text_flat: Tensor,
                       video_flat: Tensor, need_text: bool, need_video: bool) -> tuple[Tensor | None, Tensor | None]:
    """d_text [bt*Lw, d] and d_video [bv*Lf, d] of one tile from its argmaxes alone.

    In the flattened tile (rows a*Lw + i, columns b*Lf + j), t2v puts coef_t2v[a,i,b] at column
    b*Lf + j*[a,i,b] and v2t puts coef_v2t[a,b,j] at row a*Lw + i*[a,b,j]: that sparse d_A times
    video (or its transpose times text) is what the dense backward computes with full matmuls."""
    bt, lw, bv = j_star.shape
    lf = i_star.shape[2]
    dev = j_star.device
    a_idx = torch.arange(bt, device=dev).view(bt, 1, 1)
    rows_t2v = (a_idx * lw + torch.arange(lw, device=dev).view(1, lw, 1)).expand(bt, lw, bv)
    cols_t2v = torch.arange(bv, device=dev).view(1, 1, bv) * lf + j_star
    rows_v2t = a_idx * lw + i_star
    cols_v2t = (torch.arange(bv, device=dev).view(1, bv, 1) * lf + torch.arange(lf, device=dev)).expand(bt, bv, lf)
    rows = torch.cat([rows_t2v.reshape(-1), rows_v2t.reshape(-1)])
    cols = torch.cat([cols_t2v.reshape(-1), cols_v2t.reshape(-1)])
    weights = torch.cat([coef_t2v.reshape(-1), coef_v2t.reshape(-1)])
    d_text = _bag_sum(rows, cols, weights, video_flat, bt * lw) if need_text else None
    d_video = _bag_sum(cols, rows, weights, text_flat, bv * lf) if need_video else None
    return d_text, d_video


class _WTISimilarity(torch.autograd.Function):
    """Blocked WTI similarity; backward recomputes each tile instead of storing A."""

    @staticmethod
    def forward(ctx, text: Tensor, text_weight: Tensor, text_mask: Tensor, video: Tensor,
                video_weight: Tensor, video_mask: Tensor, block: int, backward: str) -> Tensor:
        acc = _acc_dtype(text.dtype)
        tw, vw = text_weight.to(acc), video_weight.to(acc)
        ctx.save_for_backward(text, tw, text_mask, video, vw, video_mask)
        ctx.block, ctx.gather = block, backward == "gather"
        ctx.dtypes = (text.dtype, text_weight.dtype, video.dtype, video_weight.dtype)
        return _blocked_similarity(text, tw, text_mask, video, vw, video_mask, block)

    @staticmethod
    def backward(ctx, grad_s: Tensor):
        text, tw, text_mask, video, vw, video_mask = ctx.saved_tensors
        block = ctx.block
        acc = tw.dtype
        nt, lw, d = text.shape
        nv, lf, _ = video.shape
        need_text, need_tw, _, need_video, need_vw, _, _, _ = ctx.needs_input_grad
        # s = (s_t2v + s_v2t) / 2, so every path carries half of the incoming gradient.
        g_all = grad_s.to(acc) * 0.5
        d_text = torch.zeros(nt, lw, d, dtype=acc, device=text.device) if need_text else None
        d_video = torch.zeros(nv, lf, d, dtype=acc, device=video.device) if need_video else None
        d_tw = torch.zeros_like(tw) if need_tw else None
        d_vw = torch.zeros_like(vw) if need_vw else None
        for t0 in range(0, nt, block):
            t1 = min(t0 + block, nt)
            text_blk = _masked(text[t0:t1], text_mask[t0:t1])
            for v0 in range(0, nv, block):
                v1 = min(v0 + block, nv)
                video_blk = _masked(video[v0:v1], video_mask[v0:v1])
                g = g_all[t0:t1, v0:v1]  # [bt, bv]
                a = _tile_scores(text_blk, video_blk, acc)  # [bt, Lw, bv, Lf]
                bt, _, bv, _ = a.shape
                # torch.max picks one argmax per reduction, the same choice the naive version's
                # autograd makes, so ties route the gradient identically.
                m_frames, j_star = a.max(dim=3)  # [bt, Lw, bv]
                m_words, i_star = a.max(dim=1)  # [bt, bv, Lf]
                if need_tw:
                    d_tw[t0:t1] += torch.einsum("ab,aib->ai", g, m_frames)
                if need_vw:
                    d_vw[v0:v1] += torch.einsum("ab,abj->bj", g, m_words)
                if not (need_text or need_video):
                    continue
                coef_t2v = g.unsqueeze(1) * tw[t0:t1].unsqueeze(2)  # [bt, Lw, bv]
                coef_v2t = g.unsqueeze(2) * vw[v0:v1].unsqueeze(0)  # [bt, bv, Lf]
                if ctx.gather:
                    del a, m_frames, m_words  # a tile's worth of memory, not needed past this point
                    dt, dv = _gather_tile_grads(j_star, i_star, coef_t2v, coef_v2t, text_blk.reshape(bt * lw, d).to(acc),
                                                video_blk.reshape(bv * lf, d).to(acc), need_text, need_video)
                    if need_text:
                        d_text[t0:t1] += dt.view(bt, lw, d)
                    if need_video:
                        d_video[v0:v1] += dv.view(bv, lf, d)
                    continue
                d_a = torch.zeros(a.shape, dtype=acc, device=a.device)
                d_a.scatter_(3, j_star.unsqueeze(3), coef_t2v.unsqueeze(3))
                d_a.scatter_add_(1, i_star.unsqueeze(1), coef_v2t.unsqueeze(1))
                # On CUDA the bf16 kernel wants bf16 operands; d_a in bf16 costs ~2^-9 relative.
                d_a = d_a.view(bt * lw, bv * lf)
                if d_a.is_cuda:
                    d_a = d_a.to(text.dtype)
                if need_text:
                    d_text[t0:t1] += _mm(d_a, video_blk.reshape(bv * lf, d), acc).view(bt, lw, d)
                if need_video:
                    d_video[v0:v1] += _mm(d_a.T, text_blk.reshape(bt * lw, d), acc).view(bv, lf, d)
        text_dtype, tw_dtype, video_dtype, vw_dtype = ctx.dtypes
        # Padded tokens were zeroed before the matmul, so they receive no gradient.
        if need_text:
            d_text = d_text.mul_(text_mask.unsqueeze(-1).to(acc)).to(text_dtype)
        if need_video:
            d_video = d_video.mul_(video_mask.unsqueeze(-1).to(acc)).to(video_dtype)
        if need_tw:
            d_tw = d_tw.to(tw_dtype)
        if need_vw:
            d_vw = d_vw.to(vw_dtype)
        return d_text, d_tw, None, d_video, d_vw, None, None, None


WTI_BACKWARDS = ("auto", "gather", "dense")


def wti_similarity(text: Tensor, text_weight: Tensor, text_mask: Tensor,
                   video: Tensor, video_weight: Tensor, video_mask: Tensor,
                   block: int = 128, backward: str = "auto") -> Tensor:
    """Blocked WTI similarity with a memory-light custom backward.

    text [Nt, Lw, d]: L2-normalised word features; text_weight [Nt, Lw]: softmax weights, 0 at
    padding; text_mask [Nt, Lw] bool (True = real word); video [Nv, Lf, d], video_weight [Nv, Lf],
    video_mask [Nv, Lf] likewise for frames. Returns s [Nt, Nv] = (s_t2v + s_v2t) / 2 where
    A[a,b,i,j] = <text[a,i], video[b,j]> with masked cells set to 0,
    s_t2v[a,b] = sum_i text_weight[a,i] * max_j A[a,b,i,j],
    s_v2t[a,b] = sum_j video_weight[b,j] * max_i A[a,b,i,j].

    Gradients flow to text, text_weight, video and video_weight; each max is differentiated
    through its argmax, as torch.max does. Memory: inputs, their gradients and one tile of
    block x block x Lw x Lf floats (two in backward), never the whole A. ``backward``: "gather"
    sums only the argmax rows (embedding_bag), "dense" scatters into a tile and uses matmuls,
    "auto" = dense on CUDA, gather elsewhere (see the module docstring); both give the same
    gradients up to summation order.

    Dtypes: tiles are produced and reduced in fp32 (fp64 for fp64 inputs): bf16 operands go
    through the fp32-output tensor-core matmul on CUDA and are upcast on CPU, and the gradient
    is accumulated over tiles in fp32. s is returned in that accumulation dtype (fp32 for
    bf16/fp16/fp32 inputs) so the logit scale of 100 does not amplify bf16 rounding; input
    gradients come back in each input's dtype. bf16 tolerance, against fp64 on the same
    bf16-rounded inputs (unit-norm features, d=512, L=32): s within 1e-4 absolute (measured
    ~2e-8 on CPU), gradients within 1e-2 relative norm (measured ~2e-3, the final bf16 rounding;
    on CUDA the per-tile d_A is also rounded to bf16).
    """
    _check_inputs(text, text_weight, text_mask, video, video_weight, video_mask)
    if block < 1:
        raise ValueError(f"wti_similarity: block must be >= 1, got {block}")
    if backward not in WTI_BACKWARDS:
        raise ValueError(f"wti_similarity: backward must be one of {WTI_BACKWARDS}, got {backward!r}")
    if backward == "auto":
        backward = "dense" if text.is_cuda else "gather"
    return _WTISimilarity.apply(text, text_weight, text_mask, video, video_weight, video_mask, block, backward)


def wti_similarity_naive(text: Tensor, text_weight: Tensor, text_mask: Tensor,
                         video: Tensor, video_weight: Tensor, video_mask: Tensor) -> Tensor:
    """Reference einsum implementation: materialises A [Nt, Nv, Lw, Lf]. Tests and benches only."""
    _check_inputs(text, text_weight, text_mask, video, video_weight, video_mask)
    a = torch.einsum("aid,bjd->abij", text, video)
    cell_mask = text_mask[:, None, :, None] & video_mask[None, :, None, :]
    a = a.masked_fill(~cell_mask, 0)
    s_t2v = (a.max(dim=3).values * text_weight[:, None, :]).sum(dim=2)
    s_v2t = (a.max(dim=2).values * video_weight[None, :, :]).sum(dim=2)
    return (s_t2v + s_v2t) / 2


@torch.no_grad()
def wti_topk(text: Tensor, text_weight: Tensor, text_mask: Tensor,
             video: Tensor, video_weight: Tensor, video_mask: Tensor,
             k: int, block: int = 128) -> tuple[Tensor, Tensor]:
    """Per text row, the k highest WTI similarities over all videos and their video indices.

    For evaluating pools too large for a full [Nt, Nv] matrix: memory is one [block, Nv] row
    strip plus one tile. Returns (values [Nt, k] in the accumulation dtype, indices [Nt, k] long),
    best first."""
    _check_inputs(text, text_weight, text_mask, video, video_weight, video_mask)
    nt, nv = text.shape[0], video.shape[0]
    if not 1 <= k <= nv:
        raise ValueError(f"wti_topk: k must be in [1, {nv}] (number of videos), got {k}")
    acc = _acc_dtype(text.dtype)
    tw, vw = text_weight.to(acc), video_weight.to(acc)
    values = torch.empty(nt, k, dtype=acc, device=text.device)
    indices = torch.empty(nt, k, dtype=torch.long, device=text.device)
    for t0 in range(0, nt, block):
        t1 = min(t0 + block, nt)
        strip = _blocked_similarity(text[t0:t1], tw[t0:t1], text_mask[t0:t1], video, vw, video_mask, block)
        values[t0:t1], indices[t0:t1] = strip.topk(k, dim=1)
    return values, indices
