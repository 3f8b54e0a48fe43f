"""The vision towers (issue: native rotary apply in every vision encoder, sync-free vision positions).

- ``ropekit.apply_rope_vision`` against every covered family's own ``apply_rotary_pos_emb_vision`` (the installed
  transformers'): bit-identical forward and backward in fp32 / bf16 / fp16, on the strided q/k views the towers pass,
  at the head dims of real towers; gradcheck; bad inputs.
- ``vision_position_ids`` / ``vision_window_index`` / ``vision_pos_embed_interp`` against transformers' own code on
  random grids (many small images included): 5.x ``vision_utils``, 4.57's tower methods.
- Each family's tower, patched vs unpatched: outputs (features, deepstack features) and every gradient bit-identical,
  fp32 and bf16, images and multi-frame videos; the ops really ran.
- The host syncs of a tower forward, counted on the CPU (``sync_count``): 4.57's grow with the images, patched they do
  not; a 5.x tower fed by ``ropekit.data`` does none (under a flash-style varlen attention).
- ``ropekit.data``'s vision inputs: what the tower computes itself, used by the tower, in spawned DataLoader workers.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re

import pytest
import torch

import ropekit
from ropekit import ops
from ropekit.transformers import _patching

from conftest import build, requires_cuda, same_bits

VISION_MODULES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen4_exp",
                  "glm4v", "glm4v_moe")


def _module(name):
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return None


def _transformers_function(name):
    """The installed family's own apply_rotary_pos_emb_vision, unpatched."""
    module = _module(name)
    if module is None:
        pytest.skip(f"transformers has no {name}")
    return _patching.original(module, "apply_rotary_pos_emb_vision")


def _qkv(tokens, heads, head_dim, dtype, layout, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if layout == "qkv":  # what the towers pass: views of one (N, 3 * H * D) projection
        qkv = torch.randn(tokens, 3 * heads * head_dim, generator=gen).to(device, dtype)
        q, k, _ = qkv.reshape(tokens, 3, heads, head_dim).permute(1, 0, 2, 3).unbind(0)
    elif layout == "heads_first":  # (H, N, D) storage seen as (N, H, D)
        q = torch.randn(heads, tokens, head_dim, generator=gen).to(device, dtype).transpose(0, 1)
        k = torch.randn(heads, tokens, head_dim, generator=gen).to(device, dtype).transpose(0, 1)
    else:
        q = torch.randn(tokens, heads, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(tokens, heads, head_dim, generator=gen).to(device, dtype)
    return q, k


def _cos_sin(tokens, head_dim, dtype, device, seed=1):
    """Qwen2.5-VL's axial layout: h and w positions on a quarter of the channels each, the halves duplicated."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 64, (tokens, 2), generator=gen).float()
    inv = 1.0 / (1e4 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2)))
    freqs = (pos[..., None] * inv).reshape(tokens, head_dim // 2)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def _run_with_grads(fn, q, k, cos, sin, seed=2):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    out = fn(q, k, cos, sin)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in out]
    torch.autograd.backward(out, grads)
    return out, q.grad, k.grad


# ------------------------------------------------------------------------------------------------------------------
# the op


@pytest.mark.transformers
@pytest.mark.parametrize("family", VISION_MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, layout", [(80, "qkv"), (72, "qkv"), (64, "heads_first"), (16, "contiguous")])
@pytest.mark.parametrize("cos_dtype", ["float32", "q"])
def test_bit_identical_to_each_family(device, family, dtype, head_dim, layout, cos_dtype):
    """Qwen2.5-VL-7B's head dim 80, Qwen3-VL-8B's 72 (16-byte lanes do not divide its halves), 64, and a tiny one."""
    reference = _transformers_function(family)
    q, k = _qkv(37, 3, head_dim, dtype, layout, device)
    cos, sin = _cos_sin(37, head_dim, torch.float32 if cos_dtype == "float32" else dtype, device)
    expected, ref_dq, ref_dk = _run_with_grads(reference, q, k, cos, sin)
    got, dq, dk = _run_with_grads(ops.apply_rope_vision, q, k, cos, sin)
    assert len(got) == len(expected) == 2
    for e, g in zip(expected, got):
        assert g.dtype == dtype and same_bits(g, e)
    assert same_bits(dq, ref_dq) and same_bits(dk, ref_dk), "the backward rounds like autograd through it"


@pytest.mark.transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [80, 72, 16])
def test_signed_zeros_like_transformers(device, dtype, head_dim):
    """Zeros of both signs in q, cos, sin and the output gradient: products and sums of -0 keep their sign in the
    forward; autograd's gradient sum adds +0 (the slices' zero padding), which the backward reproduces."""
    reference = _transformers_function("qwen2_5_vl")
    gen = torch.Generator().manual_seed(5)
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5])

    def draw(*shape):
        return values[torch.randint(0, len(values), shape, generator=gen)]

    q = draw(9, 2, head_dim).to(device, dtype)
    k = draw(9, 3, head_dim).to(device, dtype)
    cos, sin = draw(9, head_dim).to(device), draw(9, head_dim).to(device)
    grads = [draw(9, 2, head_dim).to(device, dtype), draw(9, 3, head_dim).to(device, dtype)]
    results = []
    for fn in (reference, ops.apply_rope_vision):
        qi, ki = q.detach().requires_grad_(), k.detach().requires_grad_()
        out = fn(qi, ki, cos, sin)
        torch.autograd.backward(out, grads)
        results.append([*out, qi.grad, ki.grad])
    assert any(bool((r == 0).logical_and(r.signbit()).any()) for r in results[0]), "some -0 to reproduce"
    for e, g in zip(*results):
        assert same_bits(g, e)


def test_partial_rotary_and_gptj(device):
    """R < head_dim passes the other channels through; is_neox=False rotates (2i, 2i + 1) pairs; against the
    float32 formula rounded once to q's dtype."""
    q, k = _qkv(11, 2, 64, torch.bfloat16, "qkv", device)
    cos, sin = _cos_sin(11, 32, torch.float32, device)
    for is_neox in (True, False):
        c = cos if is_neox else cos[:, :16].repeat_interleave(2, -1)
        s = sin if is_neox else sin[:, :16].repeat_interleave(2, -1)
        out = ops.apply_rope_vision(q, k, c, s, is_neox=is_neox)
        for x, o in zip((q, k), out):
            x32, r = x.float(), 32
            rot = x32[..., :r]
            if is_neox:
                turned = torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], -1)
            else:
                turned = torch.stack([-rot[..., 1::2], rot[..., 0::2]], -1).flatten(-2)
            ref = torch.cat([rot * c[:, None] + turned * s[:, None], x32[..., r:]], -1).to(x.dtype)
            assert torch.equal(o, ref)


def test_gradcheck(device):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 2, 8, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    k = torch.randn(5, 3, 8, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    cos = torch.randn(5, 8, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    sin = torch.randn(5, 8, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ops.apply_rope_vision(*a), (q, k, cos, sin))
    assert torch.autograd.gradcheck(lambda *a: ops.apply_rope_vision(*a, is_neox=False), (q, k, cos, sin))


def test_no_tokens(device):
    q, k = _qkv(0, 2, 16, torch.bfloat16, "qkv", device)
    cos, sin = _cos_sin(0, 16, torch.float32, device)
    out = ops.apply_rope_vision(q, k, cos, sin)
    assert [tuple(o.shape) for o in out] == [(0, 2, 16)] * 2


@pytest.mark.parametrize("change, message", [
    (lambda q, k, c, s: (q[None], k, c, s), "q: expected a 3-D"),
    (lambda q, k, c, s: (q, k[:, :, None], c, s), "k: expected a 3-D"),
    (lambda q, k, c, s: (q, k, c[None], s), "cos: expected a 2-D"),
    (lambda q, k, c, s: (q, k[:3], c, s), "k: expected 5 tokens"),
    (lambda q, k, c, s: (q, k, c[:3], s[:3]), "cos: expected 5 tokens"),
    (lambda q, k, c, s: (q, k, c, s[:, :4]), "sin: expected the shape of cos"),
    (lambda q, k, c, s: (q.long(), k, c, s), "q: expected float32"),
    (lambda q, k, c, s: (q, k.double(), c, s), "k: expected the dtype of q"),
    (lambda q, k, c, s: (q, k, c.double(), s.double()), "cos: expected the dtype of q"),
    (lambda q, k, c, s: (q, k, c[:, :7], s[:, :7]), "even rotary dim"),
    (lambda q, k, c, s: (q[..., :4], k[..., :4], c, s), "exceeds head_dim"),
])
def test_bad_inputs(change, message):
    q, k = _qkv(5, 2, 8, torch.float32, "contiguous", "cpu")
    cos, sin = _cos_sin(5, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=message):
        ops.apply_rope_vision(*change(q, k, cos, sin))


@requires_cuda
def test_inputs_on_two_devices_are_refused():
    q, k = _qkv(5, 2, 8, torch.float32, "contiguous", "cuda")
    cos, sin = _cos_sin(5, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cos: expected device"):
        ops.apply_rope_vision(q, k, cos, sin)


# ------------------------------------------------------------------------------------------------------------------
# the position ops


def random_grids(seed, count=None, merge=2, max_side=12, videos=True):
    """(n, 3) grids: many small images (1 x 2m..), some larger ones, videos of 1-4 frames."""
    gen = torch.Generator().manual_seed(seed)
    n = count or int(torch.randint(1, 40, (1,), generator=gen))
    t = torch.randint(1, 5, (n,), generator=gen) if videos else torch.ones(n, dtype=torch.long)
    hw = torch.randint(1, max_side // merge + 1, (n, 2), generator=gen) * merge
    return torch.cat([t[:, None], hw], 1)


def _loop_positions(grid, m):
    """transformers 4.57's rot_pos_emb position loop (the reference on any line)."""
    out = []
    for t, h, w in grid.tolist():
        hpos = torch.arange(h).unsqueeze(1).expand(-1, w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        wpos = torch.arange(w).unsqueeze(0).expand(h, -1).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        out.append(torch.stack([hpos, wpos], -1).repeat(t, 1))
    return torch.cat(out)


@pytest.mark.parametrize("seed", range(40))
def test_vision_position_ids(seed):
    merge = 1 + seed % 3
    grid = random_grids(seed, merge=merge)
    got = ops.vision_position_ids(grid, merge)
    assert got.dtype == torch.int64 and torch.equal(got, _loop_positions(grid, merge))
    vision_utils = _vision_utils()
    if vision_utils is not None:
        assert torch.equal(got, vision_utils.get_vision_position_ids(grid, merge))
    assert torch.equal(ops.vision_position_ids(grid.int(), merge, int(grid.prod(-1).sum())), got)


def _vision_utils():
    try:
        return importlib.import_module("transformers.vision_utils")  # 5.x
    except ImportError:
        return None


def _window_index_457(grid, merge, window_size, patch_size):
    """4.57 Qwen2.5-VL get_window_index's algorithm (the reference on any line; 4.57's own method is compared by
    the tower tests)."""
    import torch.nn.functional as F

    window_index, cu = [], [0]
    index_id, win = 0, window_size // merge // patch_size
    for t, h, w in grid.tolist():
        lh, lw = h // merge, w // merge
        index = torch.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h, pad_w = win - lh % win, win - lw % win
        nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
        padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
        padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum([2, 3]).reshape(-1)
        padded = padded.reshape(-1)
        window_index.append(padded[padded != -100] + index_id)
        cu.extend((seqlens.cumsum(0) * merge * merge + cu[-1]).tolist())
        index_id += t * lh * lw
    return torch.cat(window_index), cu


@pytest.mark.parametrize("seed", range(30))
def test_vision_window_index(seed):
    merge = 2
    window_size, patch_size = [(112, 14), (16, 4), (24, 4), (8, 2)][seed % 4]
    grid = random_grids(seed, merge=merge, max_side=20)
    grid[::3, 1] += 1  # h not a multiple of the merge size: floored, as transformers floors it
    index, bounds = ops.vision_window_index(grid, merge, window_size, patch_size)
    ref_index, ref_bounds = _window_index_457(grid, merge, window_size, patch_size)
    assert index.dtype == torch.int64 and torch.equal(index, ref_index)
    assert bounds.tolist() == ref_bounds
    vision_utils = _vision_utils()
    if vision_utils is not None:
        index5, bounds5 = vision_utils.get_vision_window_index(grid, merge, window_size, patch_size)
        assert torch.equal(index, index5)
        assert torch.equal(torch.unique_consecutive(bounds).to(torch.int32), bounds5)


def _interp_457(grid, side, merge, dtype):
    """4.57 Qwen3-VL fast_pos_embed_interpolate's taps and weights (its lists before the embedding lookup), in its
    own arithmetic (the reference on any line)."""
    idx_list, weight_list = [[] for _ in range(4)], [[] for _ in range(4)]
    for t, h, w in grid.tolist():
        h_idxs, w_idxs = torch.linspace(0, side - 1, h), torch.linspace(0, side - 1, w)
        hf, wf = h_idxs.int(), w_idxs.int()
        hc, wc = (h_idxs.int() + 1).clip(max=side - 1), (w_idxs.int() + 1).clip(max=side - 1)
        dh, dw = h_idxs - hf, w_idxs - wf
        bh, bhc = hf * side, hc * side
        indices = [(bh[None].T + wf[None]).flatten(), (bh[None].T + wc[None]).flatten(),
                   (bhc[None].T + wf[None]).flatten(), (bhc[None].T + wc[None]).flatten()]
        weights = [((1 - dh)[None].T * (1 - dw)[None]).flatten(), ((1 - dh)[None].T * dw[None]).flatten(),
                   (dh[None].T * (1 - dw)[None]).flatten(), (dh[None].T * dw[None]).flatten()]
        for i in range(4):
            idx_list[i].extend(indices[i].tolist())
            weight_list[i].extend(weights[i].tolist())
    return torch.tensor(idx_list, dtype=torch.long), torch.tensor(weight_list, dtype=dtype)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_pos_embed_interp(seed, dtype):
    merge, side = 2, [48, 8, 7, 1][seed % 4]
    grid = random_grids(seed, merge=merge, max_side=24)
    indices, weights = ops.vision_pos_embed_interp(grid, side, merge)
    ref_indices, ref_weights = _interp_457(grid, side, merge, dtype)
    assert torch.equal(indices, ref_indices)
    assert weights.dtype == torch.float32 and torch.equal(weights.to(dtype), ref_weights)


@pytest.mark.parametrize("call, message", [
    (lambda g: ops.vision_position_ids(g[:, :2], 2), "expected shape \\(num_grids, 3\\)"),
    (lambda g: ops.vision_position_ids(g.float(), 2), "expected an integer dtype"),
    (lambda g: ops.vision_position_ids(g, 0), "spatial_merge_size: expected 1 to 2\\^20"),
    (lambda g: ops.vision_window_index(g, 2**21, 2**30, 1), "spatial_merge_size: expected 1 to 2\\^20"),
    (lambda g: ops.vision_position_ids(g - 5, 2), "negative extent"),
    (lambda g: ops.vision_position_ids(g + torch.tensor([0, 1, 0]), 2), "multiples of spatial_merge_size"),
    (lambda g: ops.vision_position_ids(g, 2, 3), "num_tokens is 3"),
    (lambda g: ops.vision_position_ids(torch.tensor([[1, 2**21, 2**21]]), 2), "more than 2\\^40"),
    # no frames, so no patches: but one frame's h * w, which the interpolation takes, past 2^40 all the same
    (lambda g: ops.vision_pos_embed_interp(torch.tensor([[0, 2**30, 2**30]]), 8, 2), "more than 2\\^40"),
    # few patches, too many (empty) windows: (0 + 1) * (2^40 + 1) a frame, 2^20 frames
    (lambda g: ops.vision_window_index(torch.tensor([[2**20, 0, 2**40]]), 1, 1, 1), "too many patches or windows"),
    (lambda g: ops.vision_window_index(g, 2, 4, 4), "no window holds a merged patch"),
    (lambda g: ops.vision_window_index(g, 2, 16, 0), "patch_size: expected >= 1"),
    (lambda g: ops.vision_pos_embed_interp(g, 0, 2), "num_grid_per_side: expected 1 to 2\\^20"),
    (lambda g: ops.vision_pos_embed_interp(g, 2**21, 2), "num_grid_per_side: expected 1 to 2\\^20"),
])
def test_position_ops_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.tensor([[1, 4, 6], [2, 2, 2]]))


def test_empty_grids():
    grid = torch.zeros(0, 3, dtype=torch.long)
    assert ops.vision_position_ids(grid, 2).shape == (0, 2)
    index, bounds = ops.vision_window_index(grid, 2, 16, 4)
    assert index.numel() == 0 and bounds.tolist() == [0]
    assert ops.vision_pos_embed_interp(grid, 8, 2)[0].shape == (4, 0)


@requires_cuda
def test_position_ids_device_path_has_no_sync():
    grid = random_grids(7).cuda()
    expected = ops.vision_position_ids(grid, 2)  # host path: one pull
    n = int(grid.prod(-1).sum())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ops.vision_position_ids(grid, 2, n)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.device == grid.device and torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------------------------
# the towers, patched vs unpatched


def _tower_families():
    import conftest
    import family_models as fm

    return {
        "qwen2_vl": ("Qwen2VLForConditionalGeneration", lambda: fm.qwen2_vl_config("2"), ropekit.apply_to_qwen2_vl),
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", lambda: fm.qwen2_vl_config("2.5"),
                       ropekit.apply_to_qwen2_5_vl),
        "qwen3_vl": ("Qwen3VLForConditionalGeneration", conftest.tiny_qwen3_vl_config, ropekit.apply_to_qwen3_vl),
        "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", lambda: conftest.tiny_qwen3_vl_config(moe=True),
                         ropekit.apply_to_qwen3_vl),
        "qwen3_5": ("Qwen3_5ForConditionalGeneration", conftest.tiny_qwen3_5_config, ropekit.apply_to_qwen3_5),
        "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", lambda: conftest.tiny_qwen3_5_config(moe=True),
                        ropekit.apply_to_qwen3_5),
        "qwen4_exp": ("Qwen4ExpForConditionalGeneration", fm.qwen4_exp_config, ropekit.apply_to_qwen4_exp),
        "glm4v": ("Glm4vForConditionalGeneration", fm.glm4v_config, ropekit.apply_to_glm4v),
        "glm4v_moe": ("Glm4vMoeForConditionalGeneration", lambda: fm.glm4v_config("glm4v_moe"),
                      ropekit.apply_to_glm4v),
        "glm46v": ("Glm46VForConditionalGeneration", lambda: fm.glm4v_config("glm46v"), ropekit.apply_to_glm4v),
        "glm_ocr": ("GlmOcrForConditionalGeneration", fm.glm_ocr_config, ropekit.apply_to_glm_ocr),
        "cosmos3_omni": ("Cosmos3OmniForConditionalGeneration", fm.cosmos3_omni_config, ropekit.apply_to_cosmos3),
        "cohere_compass": ("CohereCompassForConditionalGeneration", fm.cohere_compass_config,
                           ropekit.apply_to_cohere_compass),
    }


TOWERS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen4_exp", "glm4v",
          "glm4v_moe", "glm46v", "glm_ocr", "cosmos3_omni", "cohere_compass")


@functools.lru_cache(maxsize=None)
def _model(family: str):
    import transformers

    cls_name, config, _ = _tower_families()[family]
    if not hasattr(transformers, cls_name) or _module(family) is None:
        pytest.skip(f"{cls_name} is not in transformers {transformers.__version__}")
    return build(getattr(transformers, cls_name), config(), "cpu")


def _tower(family: str, dtype=torch.float32):
    from ropekit.transformers.vision import _vision_model

    tower = _vision_model(_model(family)).visual
    return tower.to(dtype)


# images of several sizes (a 1x2x2 one among them), and videos of 2 and 3 frames
GRIDS = {"images": [[1, 4, 6], [1, 2, 2], [1, 8, 4], [1, 6, 6]], "videos": [[2, 4, 4], [3, 2, 6]]}


def _tower_grid(family: str, grids) -> torch.Tensor:
    """GLM-4V's model hands its tower one (1, h, w) grid per video frame (its tower fails on t > 1 itself)."""
    if family.startswith("glm"):
        grids = [[1, h, w] for t, h, w in grids for _ in range(t)]
    return torch.tensor(grids)


def _pixels(tower, grid, dtype, seed=0):
    config = tower.config
    patch = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), patch, generator=gen).to(dtype)


def _outputs(out) -> list:
    """Every tensor of a tower's output: a tensor (4.57 Qwen2-VL), a tuple (4.57 Qwen3-VL: features and deepstack
    features), a ModelOutput (5.x)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _outputs(item)]
    return []


def _tower_run(tower, pixels, grid, **kwargs):
    """Outputs, and the gradients of a fixed random loss w.r.t. the pixels and every tower parameter."""
    tower.zero_grad(set_to_none=True)
    pixels = pixels.detach().requires_grad_()
    outs = _outputs(tower(pixels, grid_thw=grid, **kwargs))
    gen = torch.Generator().manual_seed(3)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    grads = [pixels.grad] + [p.grad for p in tower.parameters() if p.grad is not None]
    return [o.detach() for o in outs], grads


@pytest.mark.transformers
@pytest.mark.parametrize("family", TOWERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["images", "videos"])
def test_tower_bit_identical(family, dtype, kind, unpatch_after, monkeypatch):
    """Patched (vision_rope, and under 4.57 vision_positions) vs unpatched: every output (pooled features,
    last hidden state, deepstack features) and every gradient bit for bit."""
    tower = _tower(family, dtype)
    grid = _tower_grid(family, GRIDS[kind])
    pixels = _pixels(tower, grid, dtype)
    expected, expected_grads = _tower_run(tower, pixels, grid)
    calls = {name: [] for name in ("apply_rope_vision", "vision_position_ids", "vision_window_index",
                                   "vision_pos_embed_interp")}
    for name, log in calls.items():
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _log=log, **k: _log.append(1) or _real(*a, **k))
    _tower_families()[family][2](_model(family))
    got, got_grads = _tower_run(tower, pixels, grid)
    assert got and len(got) == len(expected) and len(got_grads) == len(expected_grads) > 1
    for e, g in zip(expected + expected_grads, got + got_grads):
        assert same_bits(g, e)
    assert len(calls["apply_rope_vision"]) == tower.config.depth, "every block's rotation ran natively"
    helpers = [n for n in ("rot_pos_emb", "get_window_index", "fast_pos_embed_interpolate") if n in vars(type(tower))]
    if "rot_pos_emb" in helpers:  # transformers 4.57
        assert calls["vision_position_ids"], "4.57's rot_pos_emb ran natively"
    if "get_window_index" in helpers:
        assert calls["vision_window_index"]
    if "fast_pos_embed_interpolate" in helpers:
        assert calls["vision_pos_embed_interp"]


@pytest.mark.transformers
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
@pytest.mark.parametrize("seed", range(6))
def test_tower_random_grids(family, seed, unpatch_after, monkeypatch):
    """Random grids, many small images among them (4.57: rot_pos_emb / get_window_index / fast_pos_embed_interpolate
    on each)."""
    tower = _tower(family)
    grid = _tower_grid(family, random_grids(100 + seed, max_side=10).tolist())
    pixels = _pixels(tower, grid, torch.float32, seed)
    calls = []
    real = ops.apply_rope_vision
    monkeypatch.setattr(ops, "apply_rope_vision", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        expected = _outputs(tower(pixels, grid_thw=grid))
        assert not calls
        _tower_families()[family][2](_model(family))
        got = _outputs(tower(pixels, grid_thw=grid))
    assert len(calls) == tower.config.depth, "the patched tower ran the op in every block"
    assert got and len(got) == len(expected)
    assert all(same_bits(g, e) for e, g in zip(expected, got))


# towers reached through their model's get_<modality>_features (not a ``visual`` attribute of Qwen's kind): the
# family, its tower attribute, the config entry giving its block count, and the modalities it takes
OWN_TOWERS = {
    # PaddleOCR-VL's SigLIP tower (its own embeddings and attention); images only
    "paddleocr_vl": ("visual", "num_hidden_layers", ("image",)),
    # ERNIE-4.5-VL's tower with its axial rotary, then the resampler merging patches and frames
    "ernie4_5_vl_moe": ("vision_tower", "depth", ("image", "video")),
}


@pytest.mark.transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family_id", sorted(OWN_TOWERS))
def test_own_tower_bit_identical(family_id, dtype, unpatch_after, monkeypatch):
    """PaddleOCR-VL's and ERNIE-4.5-VL's towers (transformers' apply_rotary_pos_emb_vision in their own attention):
    patched, every block rotates through ropekit.apply_rope_vision, and the image (and video) features and the
    gradient of every tower parameter and of the pixels are the unpatched bits."""
    import family_models as fm

    family = fm.FAMILIES[family_id]
    if not family.available():
        pytest.skip(f"{family_id} is transformers 5.x only")
    attribute, depth_key, modalities = OWN_TOWERS[family_id]
    model = copy.deepcopy(fm.shared_model(family)).to(dtype)  # the shared model's weights stay as they are
    rows = [[("text", 2), ("image", 4, 6), ("text", 1), ("video", 2, 4, 4)],
            [("text", 1), ("image", 8, 4), ("image", 2, 2)]]
    batch = fm.multimodal_inputs(family, model.config, seed=7, rows=rows)
    tower = getattr(model.model, attribute)

    def run():
        model.zero_grad(set_to_none=True)
        out = []
        for modality in modalities:
            key = "pixel_values" if modality == "image" else "pixel_values_videos"
            given = batch[key].to(dtype).requires_grad_()
            get = getattr(model.model, f"get_{modality}_features")
            features = torch.cat(get(given, batch[f"{modality}_grid_thw"], return_dict=True).pooler_output)
            features.float().mul(torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
            out += [features.detach(), given.grad]
        return out + [p.grad for p in tower.parameters() if p.grad is not None]

    expected = run()
    calls = []
    real = ops.apply_rope_vision
    monkeypatch.setattr(ops, "apply_rope_vision", lambda *a, **k: calls.append(1) or real(*a, **k))
    family.apply(model)
    got = run()
    assert len(calls) == len(modalities) * getattr(model.config.vision_config, depth_key)
    assert len(got) == len(expected) > 2 * len(modalities)
    assert all(same_bits(g, e) for e, g in zip(expected, got))


@pytest.mark.transformers
def test_apply_to_model_takes_the_vision_switches_everywhere(unpatch_after):
    """Families without a vision tower (Qwen3) take the vision switches through apply_to_model (nothing to patch),
    as they take qk_norm_rope; the family functions without them do not."""
    from conftest import tiny_qwen3_config
    from transformers import Qwen3ForCausalLM

    ropekit.apply_to_model(Qwen3ForCausalLM(tiny_qwen3_config()), vision_rope=True, vision_positions=False)
    with pytest.raises(TypeError):
        ropekit.apply_to_qwen3(vision_rope=True)


@pytest.mark.transformers
@pytest.mark.parametrize("switches", [dict(vision_rope=False), dict(vision_positions=False)])
def test_switches_off(switches, unpatch_after):
    module = _module("qwen2_5_vl")
    ropekit.apply_to_qwen2_5_vl(**switches)
    rotation_patched = _patching.is_patched(module, "apply_rotary_pos_emb_vision")
    positions_patched = _patching.is_patched(module.Qwen2_5_VisionTransformerPretrainedModel, "rot_pos_emb")
    assert rotation_patched == switches.get("vision_rope", True)
    assert not positions_patched or switches.get("vision_positions", True)


@pytest.mark.transformers
def test_rotation_outside_the_op_domain_runs_transformers(unpatch_after, monkeypatch):
    """float64, cos/sin that require grad, a (1, D) cos that transformers broadcasts, a device this build has no
    kernel for: transformers' own code, the op not called."""
    calls = []
    monkeypatch.setattr(ops, "apply_rope_vision", lambda *a, **k: calls.append(1))
    ropekit.apply_to_qwen2_5_vl()
    module = _module("qwen2_5_vl")
    original = _patching.original(module, "apply_rotary_pos_emb_vision")
    patched = module.apply_rotary_pos_emb_vision
    q, k = _qkv(6, 2, 16, torch.float64, "qkv", "cpu")
    cos, sin = _cos_sin(6, 16, torch.float32, "cpu")
    cases = [(q, k, cos, sin), (q.float(), k.float(), cos[:1], sin[:1]),
             (q.float(), k.float(), cos.clone().requires_grad_(), sin)]
    for args in cases:
        expected, got = original(*args), patched(*args)
        assert len(expected) == len(got) == 2
        assert all(same_bits(g, e) for e, g in zip(expected, got))
    # CPU tensors, as if this build had kernels for CUDA alone
    monkeypatch.setattr(_patching, "KERNEL_DEVICE_TYPES", frozenset({"cuda"}))
    args = (q.float(), k.float(), cos, sin)
    assert all(same_bits(g, e) for e, g in zip(original(*args), patched(*args)))
    assert not calls


# ------------------------------------------------------------------------------------------------------------------
# host syncs of a tower forward (counted on the CPU, sync_count.py)


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      max_length_q=None, **kwargs):
    """A flash-style variable-length attention for the CPU (its name contains "flash", so the towers take their
    flash path): block-diagonal over cu_seqlens, computed without reading any value on the host."""
    positions = torch.arange(query.shape[2], device=query.device)
    segment = torch.searchsorted(cu_seq_lens_q[1:].contiguous(), positions, right=True)
    mask = segment[:, None] == segment[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


@pytest.fixture
def varlen_attention():
    """Registers _varlen_attention and yields a function that switches a tower to it (restored afterwards)."""
    from transformers import AttentionInterface

    name = "ropekit_test_flash_varlen"
    AttentionInterface.register(name, _varlen_attention)
    switched = []

    def use(tower):
        switched.append((tower.config, tower.config._attn_implementation))
        tower.config._attn_implementation = name

    yield use
    for config, implementation in switched:
        config._attn_implementation = implementation


def _count_syncs(tower, grid, pixels, **kwargs):
    from sync_count import SyncCounter

    with torch.no_grad(), SyncCounter(tower, grid, pixels, *kwargs.values()) as syncs:
        out = _outputs(tower(pixels, grid_thw=grid, **kwargs))
    return syncs, out


def _takes_precomputed_inputs(family) -> bool:
    from ropekit.transformers.vision import VisionInputs, VisionInputsUnavailable

    try:
        VisionInputs(_model(family))
    except VisionInputsUnavailable:
        return False
    return True


@pytest.mark.transformers
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_tower_syncs_457(family, unpatch_after):
    """transformers 4.57: a tower forward syncs per image in its position helpers; patched, once per helper
    whatever the images (the rest, transformers' own: its cu_seqlens and the eager attention's split per layer)."""
    tower = _tower(family)
    if not any(name in vars(type(tower)) for name in ("rot_pos_emb", "get_window_index")):
        pytest.skip("transformers 5.x towers have no 4.57 position helpers (see test_tower_fed_by_ropekit_data)")
    counts = {}
    for patched in (False, True):
        ropekit.unpatch()
        if patched:
            _tower_families()[family][2]()
        for images in (1, 8):
            grid = _tower_grid(family, [[1, 4, 4]] * images)
            counts[patched, images] = _count_syncs(tower, grid, _pixels(tower, grid, torch.float32))[0].count
    assert counts[False, 8] > counts[False, 1] + 4 * 7, counts  # unpatched: several per image
    assert counts[True, 8] == counts[True, 1] < counts[False, 1], counts


@pytest.mark.transformers
@pytest.mark.parametrize("family", TOWERS)
def test_tower_fed_by_ropekit_data(family, varlen_attention, unpatch_after):
    """transformers 5.x: ropekit.data's inputs for a tower are what it computes itself, it takes them, and under a
    flash-style attention its forward then does no host sync at all (it does several without them)."""
    from ropekit.transformers.vision import VisionInputs

    if not _takes_precomputed_inputs(family):
        pytest.skip("transformers 4.57 towers take no precomputed inputs (the patched helpers are tested above)")
    ropekit.apply_to_model(_model(family))
    tower = _tower(family)
    varlen_attention(tower)
    inputs = VisionInputs(_model(family))
    for kind in ("images", "videos"):
        grid = _tower_grid(family, GRIDS[kind])
        pixels = _pixels(tower, grid, torch.float32)
        tower_grid = inputs.grids["image"](grid)
        kwargs = {k[len("image_"):]: v for k, v in inputs(image_grid_thw=tower_grid).items()}
        assert {"position_ids", "cu_seqlens", "max_seqlen"} <= set(kwargs)
        syncs_alone, expected = _count_syncs(tower, grid, pixels)
        syncs_fed, got = _count_syncs(tower, grid, pixels, **kwargs)
        assert got and len(got) == len(expected)
        assert all(same_bits(g, e) for e, g in zip(expected, got))
        assert syncs_alone.count > 0 and syncs_fed.count == 0, (syncs_alone.where, syncs_fed.where)


@pytest.mark.transformers
@pytest.mark.parametrize("family", TOWERS)
def test_vision_inputs_are_the_towers_own(family, monkeypatch):
    """Every value ropekit.data hands the tower equals what the tower's own helper call returns (recorded from an
    unpatched forward), and the model forward uses them: the helpers hand back the very objects given."""
    import transformers

    from ropekit.transformers.vision import VisionInputs

    if not _takes_precomputed_inputs(family):
        pytest.skip("transformers 4.57 towers take no precomputed inputs")
    inputs = VisionInputs(_model(family))
    tower = _tower(family)
    module = importlib.import_module(type(tower).__module__)
    own, handed = {}, []
    for step in inputs.steps:
        real = getattr(module, step.name)

        def spy(*args, _real=real, _step=step, kwargs=None, **rest):
            given = {k: kwargs[k] for k in _step.keys if kwargs and kwargs.get(k) is not None}
            result = _real(*args, kwargs=kwargs, **rest)
            results = result if len(_step.targets) > 1 else (result,)
            if given:
                handed.extend(given[k] is r for k, r in zip(_step.keys, results) if k in given)
            else:
                own.update(zip(_step.keys, results))
            return result

        monkeypatch.setattr(module, step.name, spy)
    for kind in ("images", "videos"):
        grid = _tower_grid(family, GRIDS[kind])
        own.clear()
        with torch.no_grad():
            tower(_pixels(tower, grid, torch.float32), grid_thw=grid)
        ours = inputs(image_grid_thw=inputs.grids["image"](grid))
        assert own, "the tower ran its helpers"
        assert set(ours) == {f"image_{key}" for key, value in own.items() if value is not None}
        for key, value in own.items():
            if value is None:
                assert f"image_{key}" not in ours
            elif isinstance(value, torch.Tensor):
                assert torch.equal(ours[f"image_{key}"], value) and ours[f"image_{key}"].dtype == value.dtype
            else:
                assert ours[f"image_{key}"] == value
    assert not handed
    # the whole model, images and videos as the processor lays them out: the precomputed values reach the tower
    import family_models as fm

    family_obj = fm.FAMILIES.get(family)
    if family_obj is None:
        return  # Qwen3-VL / Qwen3.5 (conftest models): the tower-level check above is theirs
    model = _model(family)
    rows = [[("text", 2), ("image", 4, 6), ("text", 1)], [("text", 1), ("image", 4, 4)]]
    if not family.startswith("glm"):
        rows[0] += [("video", 2, 4, 4), ("text", 1)]
    batch = fm.multimodal_inputs(family_obj, model.config, rows=rows)
    extra = inputs(batch.get("image_grid_thw"), batch.get("video_grid_thw"))
    with torch.no_grad():
        model(**batch, **extra)
    assert handed and all(handed), "the tower took every precomputed input"
    del transformers


# ------------------------------------------------------------------------------------------------------------------
# what VisionInputs refuses to derive: code of another shape than the towers' (decline, never guess)

_helper = None  # stands for a vision_utils helper: the derivation refuses these forwards before it would run one


class _RebindsKwargs(torch.nn.Module):
    def forward(self, hidden_states, grid_thw, **kwargs):
        kwargs = dict(kwargs, position_ids=None)
        position_ids = _helper(grid_thw, 2, kwargs=kwargs)
        return position_ids


class _PopsKwargs(torch.nn.Module):
    def forward(self, hidden_states, grid_thw, **kwargs):
        kwargs.pop("cu_seqlens", None)
        position_ids = _helper(grid_thw, 2, kwargs=kwargs)
        return position_ids


class _StoresIntoKwargs(torch.nn.Module):
    def forward(self, hidden_states, grid_thw, **kwargs):
        kwargs["position_ids"] = None
        position_ids = _helper(grid_thw, 2, kwargs=kwargs)
        return position_ids


class _RebindsGrid(torch.nn.Module):
    def forward(self, hidden_states, grid_thw, **kwargs):
        for grid_thw in (grid_thw[:1],):
            pass
        position_ids = _helper(grid_thw, 2, kwargs=kwargs)
        return position_ids


class _ChangesGridInPlace(torch.nn.Module):
    def forward(self, hidden_states, grid_thw, **kwargs):
        grid_thw.clamp_(min=1)
        position_ids = _helper(grid_thw, 2, kwargs=kwargs)
        return position_ids


class _HelperUnderCondition(torch.nn.Module):
    def forward(self, hidden_states, grid_thw, **kwargs):
        if hidden_states.shape[0]:
            position_ids = _helper(grid_thw, 2, kwargs=kwargs)
        return position_ids


class _HelperInsideAnExpression(torch.nn.Module):
    def forward(self, hidden_states, grid_thw, **kwargs):
        position_ids = torch.as_tensor(_helper(grid_thw, 2, kwargs=kwargs))
        return position_ids


@pytest.mark.parametrize("tower, message", [
    (_RebindsKwargs, "rebinds kwargs"),
    (_PopsKwargs, "changes kwargs"),
    (_StoresIntoKwargs, "changes kwargs"),
    (_RebindsGrid, "rebinds grid_thw"),
    (_ChangesGridInPlace, "changes grid_thw"),
    (_HelperUnderCondition, "other than in a plain assignment"),
    (_HelperInsideAnExpression, "other than in a plain assignment"),
])
def test_vision_inputs_decline_other_tower_code(tower, message):
    from ropekit.transformers.vision import VisionInputs, VisionInputsUnavailable

    with pytest.raises(VisionInputsUnavailable, match=message):
        VisionInputs.for_tower(tower())


class _Owner:
    """get_<modality>_features of shapes the grid derivation refuses."""

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        flat = video_grid_thw.clone()
        flat.mul_(2)  # an in-place step on the grid: left out, the transform would hand another grid
        return self.visual(pixel_values_videos, grid_thw=flat, **kwargs)

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        return self.visual(pixel_values, grid_thw=image_grid_thw[:, 1:], **kwargs)


class _AliasOwner:
    """The grid changed through an alias, or in place before being handed over as it is."""

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        grid = video_grid_thw
        video_grid_thw.mul_(2)
        return self.visual(pixel_values_videos, grid_thw=grid, **kwargs)

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        image_grid_thw[:, 0] = 1
        return self.visual(pixel_values, grid_thw=image_grid_thw, **kwargs)


def test_vision_inputs_decline_other_grid_code():
    from ropekit.transformers.vision import VisionInputs, VisionInputsUnavailable, _grid_transform

    for owner, modality in ((_Owner, "video"), (_AliasOwner, "video"), (_AliasOwner, "image")):
        with pytest.raises(VisionInputsUnavailable, match="may change the grid"):
            _grid_transform(owner, modality)
    transform = _grid_transform(_Owner, "image")  # derivable, but not a grid: the dry run finds it
    inputs = object.__new__(VisionInputs)
    with pytest.raises(VisionInputsUnavailable, match="does not give an \\(n, 3\\) grid"):
        inputs._derive(torch.nn.Module(), [], {"image": transform})
