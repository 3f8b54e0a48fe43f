"""torch.library.opcheck for every op (schema, fake kernel, autograd registration, AOT dispatch) and
torch.compile(fullgraph=True) with no graph breaks."""

from __future__ import annotations

import pytest
import torch

import ropekit  # noqa: F401
from ropekit import ops

from test_apply_rope import make_inputs


def table(device, half=16, rows=64):
    inv = 1.0 / (1e6 ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))
    return inv.to(device), *ops.rope_cache(inv.to(device), rows)


def op_cases(device):
    inv, cos_t, sin_t = table(device)
    pos = torch.randint(0, 64, (2, 9), device=device)
    pos3 = torch.randint(0, 64, (3, 2, 9), device=device)
    past = torch.randint(0, 200, (2, 9), device=device)
    q, k, cos, sin = make_inputs(device=device, dtype=torch.float32, rot_dim=32)
    qd, kd, cosd, sind = make_inputs(device=device, dtype=torch.float64, batch=1, seq=4, heads=2, kv_heads=1,
                                     head_dim=8)
    qb, kb, cosb, sinb = make_inputs(device=device, dtype=torch.bfloat16, kv_heads=1)
    rg = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    return [
        (torch.ops.ropekit.rope_cache.default, (inv, 40, 1.0)),
        (torch.ops.ropekit.rope_cache.default, (inv.bfloat16(), 7, 0.5)),
        (torch.ops.ropekit.rope_cos_sin.default, (cos_t, sin_t, pos, torch.bfloat16, None, 1.0)),
        (torch.ops.ropekit.rope_cos_sin.default, (cos_t, sin_t, past, torch.float32, inv, 1.0)),
        (torch.ops.ropekit.mrope_cos_sin.default, (cos_t, sin_t, pos3, [6, 5, 5], torch.float16, None, 1.0)),
        (torch.ops.ropekit.mrope_cos_sin.default, (cos_t, sin_t, pos, [6, 5, 5], torch.float32, None, 1.0)),
        # GPT-J layout (GLM-4V) and sectioned mRoPE (Qwen2-VL, Qwen2.5-VL, GLM-4V), with rows computed past the table
        (torch.ops.ropekit.rope_cos_sin.default, (cos_t, sin_t, past, torch.bfloat16, inv, 1.0, inv, False)),
        (torch.ops.ropekit.mrope_cos_sin.default, (cos_t, sin_t, pos3, [8, 4, 4], torch.float32, None, 1.0, None,
                                                   False, True)),
        (torch.ops.ropekit.mrope_cos_sin.default, (cos_t, sin_t, pos3, [8, 4, 4], torch.bfloat16, inv, 1.0, None,
                                                   False, False)),
        (torch.ops.ropekit.apply_rope.default, (q, k, cos, sin, 1)),
        (torch.ops.ropekit.apply_rope.default, (*rg(q, k), cos, sin, 1)),
        (torch.ops.ropekit.apply_rope.default, (*rg(qd, kd, cosd, sind), 1)),
        (torch.ops.ropekit.apply_rope.default, (*rg(qb, kb), cosb.float(), sinb.float(), 1)),
        (torch.ops.ropekit.apply_rope.default, (*rg(q.transpose(1, 2), k.transpose(1, 2)), cos, sin, 2)),
        (torch.ops.ropekit.apply_rope_backward.default, (q, k, cos, sin, 1, torch.float32)),
        # GPT-J style (GLM-4V): every apply_rope variant again with is_neox=False
        (torch.ops.ropekit.apply_rope.default, (*rg(q, k), cos, sin, 1, False)),
        (torch.ops.ropekit.apply_rope.default, (*rg(qd, kd, cosd, sind), 1, False)),
        (torch.ops.ropekit.apply_rope.default, (*rg(qb, kb), cosb.float(), sinb.float(), 1, False)),
        (torch.ops.ropekit.apply_rope.default, (*rg(q.transpose(1, 2), k.transpose(1, 2)), cos, sin, 2, False)),
        (torch.ops.ropekit.apply_rope_backward.default, (q, k, cos, sin, 1, torch.float32, False)),
        *rope_index_cases(device),
        *qk_norm_rope_cases(device),
        *vision_cases(device),
    ]


def vision_cases(device):
    """apply_rope_vision on the towers' strided q/k views (bf16 with fp32 cos/sin, fp32, fp64 with grads), its
    backward through apply_rope_backward with gradients in q's dtype, and the position ops (host path)."""
    from test_vision import _cos_sin, _qkv

    rg = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    qb, kb = _qkv(9, 2, 80, torch.bfloat16, "qkv", device)
    cos, sin = _cos_sin(9, 80, torch.float32, device)
    qf, kf = _qkv(9, 3, 16, torch.float32, "heads_first", device)
    cf, sf = _cos_sin(9, 16, torch.float32, device)
    qd, kd = _qkv(4, 2, 8, torch.float64, "contiguous", device)
    cd, sd = _cos_sin(4, 8, torch.float64, device)
    op = torch.ops.ropekit.apply_rope_vision.default
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]], device=device)
    return [
        (op, (qb, kb, cos, sin)),
        (op, (*rg(qb, kb), cos, sin)),
        (op, (*rg(qf, kf), cf, sf)),
        (op, (*rg(qd, kd, cd, sd), False)),
        (torch.ops.ropekit.apply_rope_backward.default,
         (qb.unsqueeze(0), kb.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0), 2, torch.bfloat16)),
        (torch.ops.ropekit.vision_position_ids.default, (grid, 2)),
        (torch.ops.ropekit.vision_position_ids.default, (grid, 2, 32)),
        (torch.ops.ropekit.vision_window_index.default, (grid, 2, 16, 4)),
        (torch.ops.ropekit.vision_pos_embed_interp.default, (grid, 8, 2)),
    ]


def qk_norm_rope_cases(device):
    from test_qk_norm_rope import make

    rg = lambda ts: [t.detach().clone().requires_grad_(i < 4) for i, t in enumerate(ts)]  # noqa: E731
    f32 = make(dtype=torch.float32, device=device, seq=5)
    f64 = make(dtype=torch.float64, device=device, batch=1, seq=3, heads=2, kv_heads=1, head_dim=16, rot_dim=8)
    mixed = make(dtype=torch.bfloat16, w_dtype=torch.float32, cos_dtype=torch.float32, device=device, seq=4)
    zc = make(dtype=torch.float32, device=device, head_dim=64, rot_dim=16, zero_centered=True, seq=4, flat=False)
    op = torch.ops.ropekit.qk_norm_rope.default
    q, k, qw, kw, cos, sin = make(dtype=torch.bfloat16, device=device, seq=1, batch=3)
    qkv = torch.cat([q, k, torch.randn_like(k)], -1)
    gq = torch.randn(2, 4, 5, 128, device=device)
    gk = torch.randn(2, 2, 5, 128, device=device)
    return [
        (op, (*f32, 1e-6, False)),
        (op, (*rg(f32), 1e-6, False)),
        (op, (*rg(f64), 1e-6, False)),
        (op, (*rg(mixed), 1e-6, False)),
        (op, (*rg(zc), 1e-5, True)),
        (torch.ops.ropekit.qk_norm_rope_backward.default, (gq, gk, *f32, 1e-6, False)),
        (torch.ops.ropekit.qk_norm_rope_qkv_.default, (qkv, qw, kw, cos, sin, 1e-6, 4, 2, False)),
        # GPT-J style (GLM-4V)
        (op, (*rg(f32), 1e-6, False, False)),
        (op, (*rg(f64), 1e-6, False, False)),
        (op, (*rg(mixed), 1e-6, False, False)),
        (op, (*rg(zc), 1e-5, True, False)),
        (torch.ops.ropekit.qk_norm_rope_backward.default, (gq, gk, *f32, 1e-6, False, False)),
        (torch.ops.ropekit.qk_norm_rope_qkv_.default, (qkv, qw, kw, cos, sin, 1e-6, 4, 2, False, False)),
    ]


def rope_index_cases(device):
    """A text / image / text row and a left-padded text / video-frame row (merge size 2; ids 9 image, 8 video,
    7 vision start)."""
    ids = torch.tensor([[1, 7, 9, 9, 9, 9, 6], [0, 0, 7, 8, 8, 8, 8]], device=device)
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5], device=device)
    types = torch.where(ids == 9, 1, torch.where(ids == 8, 2, 0))
    grid = torch.tensor([[1, 4, 4]], device=device)
    op = torch.ops.ropekit.rope_index.default
    return [
        (op, (ids, grid, grid, mask, types, 2, 9, 8, 7, convention, on_host))
        for convention in ("token_types", "vision_start")
        for on_host in (True, False)
    ] + [(op, (ids, None, None, None, None, 2, 9, 8, 7, "vision_start", True))] + [
        # HY-V4-VL's frame blocks: a (1, 4, 4) image is 2 rows of 3 tokens (a newline column per row)
        (op, (fb_ids, grid, None, None, fb_types, 2, 9, 8, 7, "frame_blocks", on_host))
        for fb_types in [torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]], device=device)]
        for fb_ids in [fb_types * 9 + 1]
        for on_host in (True, False)
    ]


def test_opcheck(device):
    for op, args in op_cases(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_no_graph_break(device):
    torch._dynamo.reset()
    inv, cos_t, sin_t = table(device, half=32)

    def step(q, k, position_ids, position_ids_3d):
        c, s = ops.rope_cache(inv, 128)
        cos, sin = ops.rope_cos_sin(c, s, position_ids, q.dtype, inv)
        cos3, sin3 = ops.mrope_cos_sin(c, s, position_ids_3d, [12, 10, 10], q.dtype)
        cos_j, sin_j = ops.mrope_cos_sin(c, s, position_ids_3d, [16, 8, 8], q.dtype, mrope_interleaved=False,
                                         is_neox=False)
        q1, k1 = ops.apply_rope(q, k, cos, sin)
        q2, k2 = ops.apply_rope(q1, k1, cos3, sin3)
        return ops.apply_rope(q2, k2, cos_j, sin_j, is_neox=False)

    q, k, _, _ = make_inputs(device=device, seq=9)
    q.requires_grad_()
    pos = torch.randint(0, 300, (2, 9), device=device)
    pos3 = torch.randint(0, 128, (3, 2, 9), device=device)
    explanation = torch._dynamo.explain(step)(q, k, pos, pos3)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(q, k, pos, pos3)
    ref = step(q, k, pos, pos3)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    out[0].sum().backward()
    grad_compiled = q.grad.clone()
    q.grad = None
    ref[0].sum().backward()
    assert torch.equal(grad_compiled, q.grad)


def test_compile_qk_norm_rope_fullgraph(device):
    from test_qk_norm_rope import make

    torch._dynamo.reset()
    q, k, qw, kw, cos, sin = make(dtype=torch.float32, device=device, seq=7)
    q.requires_grad_()
    qw.requires_grad_()
    fn = lambda *a: (*ops.qk_norm_rope(*a, 1e-6), *ops.qk_norm_rope(*a, 1e-6, is_neox=False))  # noqa: E731
    explanation = torch._dynamo.explain(fn)(q, k, qw, kw, cos, sin)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(fn, fullgraph=True)(q, k, qw, kw, cos, sin)
    ref = fn(q, k, qw, kw, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    out[0].sum().backward()
    compiled_grads = (q.grad.clone(), qw.grad.clone())
    q.grad = qw.grad = None
    ref[0].sum().backward()
    assert torch.equal(compiled_grads[0], q.grad) and torch.equal(compiled_grads[1], qw.grad)


def test_compile_vision_fullgraph(device):
    """A vision block's rotation and the tower-shaped position inputs compile whole; the rotation matches eager,
    forward and backward."""
    from test_vision import _cos_sin, _qkv

    torch._dynamo.reset()
    q, k = _qkv(9, 2, 80, torch.bfloat16, "qkv", device)
    cos, sin = _cos_sin(9, 80, torch.float32, device)
    q.requires_grad_()
    fn = lambda q, k, cos, sin: ops.apply_rope_vision(q, k, cos, sin)  # noqa: E731
    explanation = torch._dynamo.explain(fn)(q, k, cos, sin)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(fn, fullgraph=True)(q, k, cos, sin)
    ref = fn(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    out[0].float().sum().backward()
    compiled_grad = q.grad.clone()
    q.grad = None
    ref[0].float().sum().backward()
    assert torch.equal(compiled_grad, q.grad)
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]], device=device)
    positions = torch.compile(lambda g: ops.vision_position_ids(g, 2, 32), fullgraph=True)(grid)
    assert torch.equal(positions, ops.vision_position_ids(grid, 2))


def test_compile_rope_index_fullgraph(device):
    torch._dynamo.reset()
    for op, args in rope_index_cases(device):
        compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
        for a, b in zip(compiled(*args), op(*args)):
            assert torch.equal(a, b) and a.dtype == b.dtype


@pytest.mark.parametrize("dynamic", [True])
def test_compile_dynamic_shapes(device, dynamic):
    torch._dynamo.reset()

    def f(q, k, cos, sin):
        return ops.apply_rope(q, k, cos, sin)

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for seq in (5, 9, 17):
        q, k, cos, sin = make_inputs(device=device, seq=seq)
        for a, b in zip(compiled(q, k, cos, sin), f(q, k, cos, sin)):
            assert torch.equal(a, b)
