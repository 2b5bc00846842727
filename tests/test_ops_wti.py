"""WTI similarity: blocked custom autograd vs the einsum reference."""

import pytest
import torch

from ops.wti import wti_similarity, wti_similarity_naive, wti_topk


def _tokens(n: int, length: int, d: int, dtype: torch.dtype, seed: int, min_len: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, length, d, generator=g, dtype=torch.float64), dim=-1)
    lens = torch.randint(min_len, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lens[:, None]
    logits = torch.randn(n, length, generator=g, dtype=torch.float64)
    weight = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), mask


def _grads(fn, text, tw, tm, video, vw, vm, grad_out, **kw):
    s = fn(text, tw, tm, video, vw, vm, **kw)
    return (s, *torch.autograd.grad(s, (text, tw, video, vw), grad_out))


BACKWARDS = ["gather", "dense"]


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("block", [1, 3, 4, 64])
def test_matches_naive_float64_values_and_grads(block, backward):
    text, tw, tm = _tokens(7, 5, 16, torch.float64, seed=0)
    video, vw, vm = _tokens(10, 6, 16, torch.float64, seed=1)
    grad_out = torch.randn(7, 10, dtype=torch.float64)
    ours = _grads(wti_similarity, text, tw, tm, video, vw, vm, grad_out, block=block, backward=backward)
    ref = _grads(wti_similarity_naive, text, tw, tm, video, vw, vm, grad_out)
    for name, a, b in zip(("s", "d_text", "d_text_weight", "d_video", "d_video_weight"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backward", BACKWARDS)
def test_tied_maxima_route_the_gradient_like_torch_max(backward):
    """Duplicated frames and words tie every max: each backward must pick the argmax torch.max
    picks, as the naive version's autograd does, or the gradient lands on the wrong token."""
    text, tw, tm = _tokens(4, 3, 8, torch.float64, seed=20, min_len=3)
    video, vw, vm = _tokens(5, 3, 8, torch.float64, seed=21, min_len=3)
    with torch.no_grad():
        text[:, 2] = text[:, 0]
        video[:, 1] = video[:, 0]
    grad_out = torch.randn(4, 5, dtype=torch.float64)
    ours = _grads(wti_similarity, text, tw, tm, video, vw, vm, grad_out, block=2, backward=backward)
    ref = _grads(wti_similarity_naive, text, tw, tm, video, vw, vm, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_masked_cells_count_as_zero():
    # All real cosines negative: max over a row that includes a padded frame is the masked 0.
    text = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    video = torch.tensor([[[-1.0, 0.0], [0.6, 0.8]]], dtype=torch.float64)
    tm = torch.tensor([[True]])
    vm = torch.tensor([[True, False]])
    tw = torch.ones(1, 1, dtype=torch.float64)
    vw = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    s = wti_similarity(text, tw, tm, video, vw, vm)
    # s_t2v = max(-1, 0 [masked]) = 0; s_v2t = 1 * max_i A[., 0] = -1 (one real word) -> s = -0.5
    assert s.item() == pytest.approx(-0.5)
    torch.testing.assert_close(s, wti_similarity_naive(text, tw, tm, video, vw, vm))


@pytest.mark.parametrize("backward", BACKWARDS)
def test_padded_tokens_get_no_gradient(backward):
    text, tw, tm = _tokens(4, 6, 8, torch.float64, seed=2)
    video, vw, vm = _tokens(5, 7, 8, torch.float64, seed=3)
    assert (~tm).any() and (~vm).any()
    d_text, d_video = torch.autograd.grad(
        wti_similarity(text, tw, tm, video, vw, vm, block=2, backward=backward).sum(), (text, video))
    assert d_text[~tm].abs().max() == 0 and d_video[~vm].abs().max() == 0
    assert d_text[tm].abs().max() > 0 and d_video[vm].abs().max() > 0


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradcheck(backward):
    text, tw, tm = _tokens(3, 3, 4, torch.float64, seed=4)
    video, vw, vm = _tokens(4, 3, 4, torch.float64, seed=5)
    assert torch.autograd.gradcheck(
        lambda t, a, v, b: wti_similarity(t, a, tm, v, b, vm, block=2, backward=backward), (text, tw, video, vw))


def test_float32_matches_naive():
    text, tw, tm = _tokens(9, 8, 32, torch.float32, seed=6)
    video, vw, vm = _tokens(6, 8, 32, torch.float32, seed=7)
    grad_out = torch.randn(9, 6)
    ours = _grads(wti_similarity, text, tw, tm, video, vw, vm, grad_out, block=4)
    ref = _grads(wti_similarity_naive, text, tw, tm, video, vw, vm, grad_out)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_bfloat16_within_documented_tolerance(backward):
    text, tw, tm = _tokens(8, 32, 512, torch.bfloat16, seed=8, min_len=8)
    video, vw, vm = _tokens(8, 32, 512, torch.bfloat16, seed=9, min_len=8)
    grad_out = torch.randn(8, 8)
    ours = _grads(wti_similarity, text, tw, tm, video, vw, vm, grad_out, block=3, backward=backward)
    exact = [x.detach().double().requires_grad_() for x in (text, tw, video, vw)]
    ref = _grads(wti_similarity_naive, exact[0], exact[1], tm, exact[2], exact[3], vm, grad_out.double())
    assert ours[0].dtype == torch.float32, "bf16 inputs must give an fp32 similarity"
    assert (ours[0].double() - ref[0]).abs().max() < 1e-4
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == torch.bfloat16
        rel = (a.double() - b).norm() / b.norm()
        assert rel < 1e-2, f"bf16 gradient relative error {rel:.3g}"


def test_backward_saves_only_inputs_not_the_score_tensor():
    n, length, d = 6, 5, 8
    text, tw, tm = _tokens(n, length, d, torch.float32, seed=10)
    video, vw, vm = _tokens(n, length, d, torch.float32, seed=11)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        wti_similarity(text, tw, tm, video, vw, vm, block=2).sum().backward()
    inputs = sum(x.numel() for x in (text, tw, tm, video, vw, vm))
    assert sum(saved) <= inputs, f"saved {sum(saved)} elements, inputs have {inputs}"
    assert max(saved) < n * n * length * length


def test_wti_topk_matches_full_matrix():
    text, tw, tm = _tokens(11, 4, 8, torch.float64, seed=12)
    video, vw, vm = _tokens(13, 5, 8, torch.float64, seed=13)
    full = wti_similarity_naive(text, tw, tm, video, vw, vm).detach()
    values, indices = wti_topk(text, tw, tm, video, vw, vm, k=4, block=3)
    ref_values, ref_indices = full.topk(4, dim=1)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)
    assert not values.requires_grad


def test_shape_errors_name_the_argument():
    text, tw, tm = _tokens(2, 3, 4, torch.float32, seed=14)
    video, vw, vm = _tokens(2, 3, 4, torch.float32, seed=15)
    with pytest.raises(ValueError, match="video_weight"):
        wti_similarity(text, tw, tm, video, vw[:, :2], vm)
    with pytest.raises(ValueError, match="bool"):
        wti_similarity(text, tw, tm.float(), video, vw, vm)
    with pytest.raises(ValueError, match="backward must be one of"):
        wti_similarity(text, tw, tm, video, vw, vm, backward="sparse")
    with pytest.raises(ValueError, match="k must be"):
        wti_topk(text, tw, tm, video, vw, vm, k=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backward", ["auto", "gather"])
def test_cuda_bfloat16_within_documented_tolerance(backward):
    """On CUDA, bf16 tiles come out of the fp32-accumulating matmul ("auto" = dense backward, whose
    d_A is rounded to bf16): the documented tolerance against fp64 on the host still holds."""
    text, tw, tm = _tokens(8, 32, 512, torch.bfloat16, seed=8, min_len=8)
    video, vw, vm = _tokens(8, 32, 512, torch.bfloat16, seed=9, min_len=8)
    grad_out = torch.randn(8, 8)
    cuda = [x.detach().cuda().requires_grad_(x.requires_grad) for x in (text, tw, video, vw)]
    ours = _grads(wti_similarity, cuda[0], cuda[1], tm.cuda(), cuda[2], cuda[3], vm.cuda(), grad_out.cuda(),
                  block=3, backward=backward)
    exact = [x.detach().double().requires_grad_() for x in (text, tw, video, vw)]
    ref = _grads(wti_similarity_naive, exact[0], exact[1], tm, exact[2], exact[3], vm, grad_out.double())
    assert ours[0].dtype == torch.float32 and ours[0].is_cuda
    assert (ours[0].double().cpu() - ref[0]).abs().max() < 1e-4
    for a, b in zip(ours[1:], ref[1:]):
        rel = (a.double().cpu() - b).norm() / b.norm()
        assert a.dtype == torch.bfloat16 and rel < 1e-2, f"bf16 gradient relative error {rel:.3g}"
