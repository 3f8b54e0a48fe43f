"""qk_norm_rope: fused per-head RMSNorm + RoPE, against transformers' eager q_norm/k_norm + apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch

from ropekit import ops

from conftest import requires_cuda, same_bits
from test_apply_rope import cos_sin_layout, eager_rope, rel_err

EPS = 1e-6


def eager_norm(x, weight, eps, zero_centered):
    """Qwen3RMSNorm (two roundings) or Qwen3_5RMSNorm (zero-centred, one rounding), as transformers writes them."""
    x32 = x.float()
    n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (n * (1.0 + weight.float())).type_as(x)
    return weight * n.to(x.dtype)


def ref_norm64(x, weight, eps, zero_centered):
    x = x.double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return n * (1.0 + weight.double()) if zero_centered else weight.double() * n


def eager_qk_norm_rope(q, k, qw, kw, cos, sin, eps=EPS, zero_centered=False, norm=eager_norm, is_neox=True):
    d = qw.shape[0]
    qh = norm(q.unflatten(-1, (-1, d)) if q.dim() == 3 else q, qw, eps, zero_centered).transpose(1, 2)
    kh = norm(k.unflatten(-1, (-1, d)) if k.dim() == 3 else k, kw, eps, zero_centered).transpose(1, 2)
    return eager_rope(qh, kh, cos, sin, is_neox=is_neox)


def ref_qk_norm_rope64(q, k, qw, kw, cos, sin, eps=EPS, zero_centered=False, is_neox=True):
    return eager_qk_norm_rope(q, k, qw, kw, cos.double(), sin.double(), eps, zero_centered, ref_norm64, is_neox)


def make(batch=2, seq=9, heads=4, kv_heads=2, head_dim=128, rot_dim=None, dtype=torch.bfloat16, w_dtype=None,
         cos_dtype=None, zero_centered=False, device="cpu", seed=0, flat=True, is_neox=True):
    gen = torch.Generator().manual_seed(seed)
    rot_dim = head_dim if rot_dim is None else rot_dim
    shape = lambda h: (batch, seq, h * head_dim) if flat else (batch, seq, h, head_dim)  # noqa: E731
    q = (torch.randn(shape(heads), generator=gen) * 3 + 0.5).to(device, dtype)
    k = (torch.randn(shape(kv_heads), generator=gen) * 3 - 0.5).to(device, dtype)
    scale = 0.2 if zero_centered else 1.0  # Qwen3.5 weights sit around 0, Qwen3's around 1
    qw = (torch.randn(head_dim, generator=gen) * scale + (0 if zero_centered else 1)).to(device, w_dtype or dtype)
    kw = (torch.randn(head_dim, generator=gen) * scale + (0 if zero_centered else 1)).to(device, w_dtype or dtype)
    pos = torch.randint(0, 8192, (batch, seq), generator=gen).double()
    inv = 1.0 / (1e6 ** (torch.arange(0, rot_dim, 2).double() / rot_dim))
    emb = cos_sin_layout(pos[..., None] * inv, is_neox)
    cd = cos_dtype or dtype
    return q, k, qw, kw, emb.cos().to(device, cd), emb.sin().to(device, cd)


CASES = [  # head_dim, rot_dim, heads, kv_heads, zero_centered
    (128, 128, 4, 2, False),
    (64, 64, 3, 1, False),
    (256, 256, 2, 1, False),
    (128, 64, 4, 1, False),
    (256, 64, 2, 2, True),  # Qwen3.5: partial rotary 0.25, zero-centred norm
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,rot_dim,heads,kv_heads,zero_centered", CASES)
def test_forward_accuracy(device, dtype, head_dim, rot_dim, heads, kv_heads, zero_centered):
    args = make(head_dim=head_dim, rot_dim=rot_dim, heads=heads, kv_heads=kv_heads, dtype=dtype,
                zero_centered=zero_centered, device=device)
    ours = ops.qk_norm_rope(*args, EPS, zero_centered)
    eager = eager_qk_norm_rope(*args, zero_centered=zero_centered)
    ref = ref_qk_norm_rope64(*args, zero_centered=zero_centered)
    for o, e, r in zip(ours, eager, ref):
        assert o.dtype == e.dtype and o.shape == e.shape
        if dtype == torch.float32:
            assert rel_err(o, r) <= 1e-6
        else:
            assert rel_err(o, r) <= rel_err(e, r)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_fp32_master_weights_and_cos_promote(device, zero_centered):
    """Autocast training: bf16 projections, fp32 norm weights and fp32 cos/sin -> fp32 out, as in eager."""
    args = make(dtype=torch.bfloat16, w_dtype=torch.float32, cos_dtype=torch.float32, zero_centered=zero_centered,
                device=device)
    ours = ops.qk_norm_rope(*args, EPS, zero_centered)
    eager = eager_qk_norm_rope(*args, zero_centered=zero_centered)
    for o, e in zip(ours, eager):
        assert o.dtype == e.dtype == torch.float32
        # Same rounding points as eager (the norm rounds to bf16, the rotation runs in fp32), so the only
        # difference is the fp32 summation order of mean(x^2): it can move the bf16 rounding of a normalised value
        # by one ulp, rarely. Everything else must agree to fp32 precision.
        close = torch.isclose(o, e, rtol=1e-6, atol=1e-6)
        assert close.float().mean() > 0.99
        torch.testing.assert_close(o, e, rtol=2 ** -7, atol=1e-6)


def grads(fn, args, gq, gk, zero_centered):
    q, k, qw, kw, cos, sin = [a.detach().requires_grad_(i < 4) for i, a in enumerate(args)]
    out_q, out_k = fn(q, k, qw, kw, cos, sin, EPS, zero_centered)
    return torch.autograd.grad([out_q, out_k], [q, k, qw, kw], [gq.to(out_q.dtype), gk.to(out_k.dtype)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,rot_dim,heads,kv_heads,zero_centered", CASES)
def test_backward_accuracy(device, dtype, head_dim, rot_dim, heads, kv_heads, zero_centered):
    args = make(head_dim=head_dim, rot_dim=rot_dim, heads=heads, kv_heads=kv_heads, dtype=dtype, seq=17,
                zero_centered=zero_centered, device=device, seed=1)
    gen = torch.Generator().manual_seed(2)
    gq = torch.randn(2, heads, 17, head_dim, generator=gen).to(device)
    gk = torch.randn(2, kv_heads, 17, head_dim, generator=gen).to(device)
    eager_fn = lambda q, k, qw, kw, c, s, eps, zc: eager_qk_norm_rope(q, k, qw, kw, c, s, eps, zc)  # noqa: E731
    ref_fn = lambda q, k, qw, kw, c, s, eps, zc: ref_qk_norm_rope64(q, k, qw, kw, c, s, eps, zc)  # noqa: E731
    ours = grads(ops.qk_norm_rope, args, gq, gk, zero_centered)
    eager = grads(eager_fn, args, gq, gk, zero_centered)
    ref = grads(ref_fn, [a.double() for a in args], gq.double(), gk.double(), zero_centered)
    for name, o, e, r in zip(("dq", "dk", "dq_weight", "dk_weight"), ours, eager, ref):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        if dtype == torch.float32:
            assert rel_err(o, r) <= 1e-6, name
        else:
            assert rel_err(o, r) <= rel_err(e, r), name


@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("rot_dim", [8, 4])
def test_gradcheck_fp64(zero_centered, rot_dim):
    args = make(batch=2, seq=3, heads=2, kv_heads=1, head_dim=8, rot_dim=rot_dim, dtype=torch.float64,
                zero_centered=zero_centered)
    q, k, qw, kw, cos, sin = [a.detach().requires_grad_(i < 4) for i, a in enumerate(args)]
    assert torch.autograd.gradcheck(lambda *a: ops.qk_norm_rope(*a, cos, sin, EPS, zero_centered), (q, k, qw, kw))


def test_weight_grads_are_deterministic(device):
    args = make(batch=3, seq=300, heads=4, kv_heads=2, dtype=torch.bfloat16, device=device, seed=4)
    gen = torch.Generator().manual_seed(5)
    gq = torch.randn(3, 4, 300, 128, generator=gen).to(device)
    gk = torch.randn(3, 2, 300, 128, generator=gen).to(device)
    first = grads(ops.qk_norm_rope, args, gq, gk, False)
    for _ in range(2):
        again = grads(ops.qk_norm_rope, args, gq, gk, False)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_mrope_cos_sin_with_distinct_axes(device):
    """The fused op takes interleaved-mRoPE cos/sin as they come from mrope_cos_sin."""
    q, k, qw, kw, _, _ = make(head_dim=128, device=device, dtype=torch.bfloat16)
    inv = (1.0 / (5e6 ** (torch.arange(0, 128, 2).float() / 128))).to(device)
    tables = ops.rope_cache(inv, 64)
    pos = torch.randint(0, 64, (3, 2, 9), generator=torch.Generator().manual_seed(6)).to(device)
    cos, sin = ops.mrope_cos_sin(*tables, pos, [24, 20, 20], torch.bfloat16)
    assert not torch.equal(cos, ops.rope_cos_sin(*tables, pos[0], torch.bfloat16)[0])
    ours = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    eager = eager_qk_norm_rope(q, k, qw, kw, cos, sin)
    ref = ref_qk_norm_rope64(q, k, qw, kw, cos, sin)
    for o, e, r in zip(ours, eager, ref):
        assert rel_err(o, r) <= rel_err(e, r)


def test_layouts_and_no_mutation(device):
    """(B, S, H, D) and flat (B, S, H*D) inputs, slices of a packed qkv projection, broadcast cos; inputs untouched;
    outputs are (B, H, S, D) views of (B, S, H, D) storage."""
    q, k, qw, kw, cos, sin = make(dtype=torch.float32, device=device, heads=4, kv_heads=2)
    v = torch.randn_like(k)
    packed = torch.cat([q, k, v], -1)
    q_view, k_view = packed[..., : q.shape[-1]], packed[..., q.shape[-1]: q.shape[-1] + k.shape[-1]]
    before = [t.clone() for t in (packed, qw, kw, cos, sin)]
    expected = eager_qk_norm_rope(q, k, qw, kw, cos, sin)
    for args in ((q, k), (q_view, k_view), (q.unflatten(-1, (4, 128)), k.unflatten(-1, (2, 128)))):
        out = ops.qk_norm_rope(*args, qw, kw, cos, sin, EPS)
        for o, e in zip(out, expected):
            assert o.shape == e.shape and o.transpose(1, 2).is_contiguous()
            torch.testing.assert_close(o, e, rtol=0, atol=1e-5)
    for t, b in zip((packed, qw, kw, cos, sin), before):
        assert torch.equal(t, b)
    out = ops.qk_norm_rope(q, k, qw, kw, cos[:1].expand(2, -1, -1), sin[:1].expand(2, -1, -1), EPS)
    torch.testing.assert_close(out[0], eager_qk_norm_rope(q, k, qw, kw, cos[:1], sin[:1])[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_empty(device, shape):
    q, k, qw, kw, cos, sin = make(batch=shape[0], seq=shape[1], device=device, dtype=torch.float32)
    q.requires_grad_()
    qw.requires_grad_()
    out_q, out_k = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    assert out_q.shape == (shape[0], 4, shape[1], 128) and out_k.shape == (shape[0], 2, shape[1], 128)
    out_q.sum().backward()
    assert q.grad.shape == q.shape and torch.count_nonzero(qw.grad) == 0


@pytest.mark.parametrize("zero_centered", [False, True])
def test_inplace_qkv_matches_out_of_place(device, zero_centered):
    q, k, qw, kw, cos, sin = make(dtype=torch.bfloat16, device=device, zero_centered=zero_centered, seq=1,
                                  batch=8)  # decode: one token per row
    v = torch.randn_like(k)
    qkv = torch.cat([q, k, v], -1)
    version = qkv._version
    out = ops.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, EPS, 4, 2, zero_centered)
    assert out is qkv and qkv._version > version
    ref_q, ref_k = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS, zero_centered)
    assert torch.equal(qkv[..., :512].unflatten(-1, (4, 128)), ref_q.transpose(1, 2))
    assert torch.equal(qkv[..., 512:768].unflatten(-1, (2, 128)), ref_k.transpose(1, 2))
    assert torch.equal(qkv[..., 768:], v)
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.qk_norm_rope_qkv_(qkv.clone().requires_grad_(), qw, kw, cos, sin, EPS, 4, 2)
    with pytest.raises(RuntimeError, match="in qkv's dtype"):
        ops.qk_norm_rope_qkv_(qkv, qw.float(), kw.float(), cos, sin, EPS, 4, 2)
    with pytest.raises(RuntimeError, match="num_q_heads"):
        ops.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, EPS, 5, 2)


def test_bad_input():
    q, k, qw, kw, cos, sin = make(dtype=torch.float32)
    cases = [
        (lambda: ops.qk_norm_rope(q, k, qw[:96], kw[:96], cos[..., :96], sin[..., :96]), "not a multiple of head_dim"),
        (lambda: ops.qk_norm_rope(q.unflatten(-1, (4, 128)), k, qw[:64], kw[:64], cos[..., :64], sin[..., :64]),
         "q: expected head_dim 64"),
        (lambda: ops.qk_norm_rope(q, k, qw, kw[:64], cos, sin), "k_weight: expected shape"),
        (lambda: ops.qk_norm_rope(q, k, qw[None], kw, cos, sin), "q_weight: expected a 1-D"),
        (lambda: ops.qk_norm_rope(q, k.double(), qw, kw, cos, sin), "k: expected the dtype of q"),
        (lambda: ops.qk_norm_rope(q, k, qw.half(), kw.half(), cos, sin), "q_weight: expected the dtype of q"),
        (lambda: ops.qk_norm_rope(q.bfloat16(), k.bfloat16(), qw, kw, cos.half(), sin.half()), "cos: expected the dtype"),
        (lambda: ops.qk_norm_rope(q, k, qw, kw, cos[:, :3], sin[:, :3]), "cos: expected seq 9"),
        (lambda: ops.qk_norm_rope(q, k, qw, kw, cos, sin[..., :64]), "sin: expected the shape of cos"),
        (lambda: ops.qk_norm_rope(q, k, qw, kw, cos[..., :63], sin[..., :63]), "even rotary dim"),
        (lambda: ops.qk_norm_rope(q[0], k, qw, kw, cos, sin), "q: expected \\(batch, seq"),
        (lambda: ops.qk_norm_rope(q, k[:1], qw, kw, cos, sin), "k: expected batch 2"),
        (lambda: ops.qk_norm_rope(q, k, qw, kw, cos, sin, -1.0), "eps: expected >= 0"),
        (lambda: ops.qk_norm_rope(q.int(), k.int(), qw, kw, cos, sin), "q: expected float32"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    with pytest.raises(RuntimeError, match="cos/sin require grad"):
        ops.qk_norm_rope(q, k, qw, kw, cos.requires_grad_(), sin)


@requires_cuda
def test_cuda_mismatched_devices():
    q, k, qw, kw, cos, sin = make(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="q_weight: expected device"):
        ops.qk_norm_rope(q.cuda(), k.cuda(), qw, kw.cuda(), cos.cuda(), sin.cuda())
    with pytest.raises(RuntimeError, match="cos: expected device"):
        ops.qk_norm_rope(q.cuda(), k.cuda(), qw.cuda(), kw.cuda(), cos, sin.cuda())


@requires_cuda
def test_cuda_no_host_sync():
    args = [a.cuda() for a in make(dtype=torch.bfloat16)]
    args[0].requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out_q, out_k = ops.qk_norm_rope(*args, EPS)
        (out_q.float().sum() + out_k.float().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _double_backward(fn, args, trainable, zero_centered, is_neox, q_loss, create_graph=True):
    """First-order gradients of a loss and, under create_graph, second-order ones of a penalty on them, for the
    inputs marked trainable. q_loss "zero": q's output weighted by 0 (zero gradients, -0 from negative weights)."""
    inputs = [a.detach().requires_grad_(t) for a, t in zip(args[:4], trainable)]
    wrt = [x for x in inputs if x.requires_grad]
    out_q, out_k = fn(*inputs, *args[4:], EPS, zero_centered, is_neox=is_neox)
    loss = (out_q * 0 if q_loss == "zero" else out_q.square() * 0.5).sum() + out_k.pow(3).sum()
    first = torch.autograd.grad(loss, wrt, create_graph=create_graph)
    if not create_graph:
        return first, ()
    return first, torch.autograd.grad(sum(g.square().sum() for g in first), wrt)


@pytest.mark.parametrize("zero_centered, is_neox, rot_dim", [(False, True, 8), (True, True, 8), (False, False, 4)])
@pytest.mark.parametrize("trainable", [(True, True, True, True), (False, True, False, True), (True, True, False, False)],
                         ids=["all", "k-side", "q-and-k"])
@pytest.mark.parametrize("q_loss", ["square", "zero"])
def test_double_backward(device, zero_centered, is_neox, rot_dim, trainable, q_loss):
    """create_graph=True (a gradient penalty), one side frozen or not: the first-order gradients are the kernel's
    bits (as without create_graph, -0 included), the second-order ones those of transformers' eager steps (all in
    float64: agreement to rounding)."""
    args = list(make(dtype=torch.float64, batch=1, seq=3, heads=2, kv_heads=1, head_dim=8, rot_dim=rot_dim,
                     zero_centered=zero_centered, device=device, is_neox=is_neox))
    args[2] = -args[2]  # negative q-norm weights: the backward gives -0 where q's output gradient is 0
    first, second = _double_backward(ops.qk_norm_rope, args, trainable, zero_centered, is_neox, q_loss)
    # transformers' steps in float64 (its norm upcasts to fp32)
    ref_first, ref_second = _double_backward(ref_qk_norm_rope64, args, trainable, zero_centered, is_neox, q_loss)
    assert first and len(first) == len(ref_first) and len(second) == len(ref_second)
    for g, r in zip(first + second, ref_first + ref_second):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    plain, _ = _double_backward(ops.qk_norm_rope, args, trainable, zero_centered, is_neox, q_loss, create_graph=False)
    assert all(same_bits(a, b) for a, b in zip(plain, first)), "create_graph leaves the values as they were"


def test_double_backward_runs_tensor_hooks_once():
    """The reference graph stops at views of the saved inputs: a hook on q (clipping, scaling) runs once per
    backward, as without create_graph."""
    args = make(dtype=torch.float64, batch=1, seq=3, heads=2, kv_heads=1, head_dim=8)
    q, k, qw, kw = (a.detach().requires_grad_() for a in args[:4])
    calls = []
    q.register_hook(lambda g: calls.append(1))
    out_q, out_k = ops.qk_norm_rope(q, k, qw, kw, *args[4:], EPS)
    torch.autograd.grad(out_q.square().sum() + out_k.square().sum(), (q, k), create_graph=True)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------------------
# GPT-J style (is_neox=False, GLM-4V): the same kernels with pairs (2i, 2i+1).

GPTJ_CASES = [  # head_dim, rot_dim, heads, kv_heads, zero_centered
    (128, 64, 4, 2, False),  # GLM-4V: partial rotary 0.5
    (128, 128, 3, 1, False),
    (64, 20, 2, 1, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,rot_dim,heads,kv_heads,zero_centered", GPTJ_CASES)
def test_gptj_forward_accuracy(device, dtype, head_dim, rot_dim, heads, kv_heads, zero_centered):
    args = make(head_dim=head_dim, rot_dim=rot_dim, heads=heads, kv_heads=kv_heads, dtype=dtype,
                zero_centered=zero_centered, device=device, is_neox=False)
    ours = ops.qk_norm_rope(*args, EPS, zero_centered, is_neox=False)
    eager = eager_qk_norm_rope(*args, zero_centered=zero_centered, is_neox=False)
    ref = ref_qk_norm_rope64(*args, zero_centered=zero_centered, is_neox=False)
    neox = ops.qk_norm_rope(*args, EPS, zero_centered)
    for o, e, r, n in zip(ours, eager, ref, neox):
        assert o.dtype == e.dtype and o.shape == e.shape
        assert not torch.equal(o, n)
        if dtype == torch.float32:
            assert rel_err(o, r) <= 1e-6
        else:
            assert rel_err(o, r) <= rel_err(e, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,rot_dim,heads,kv_heads,zero_centered", GPTJ_CASES)
def test_gptj_backward_accuracy(device, dtype, head_dim, rot_dim, heads, kv_heads, zero_centered):
    args = make(head_dim=head_dim, rot_dim=rot_dim, heads=heads, kv_heads=kv_heads, dtype=dtype, seq=13,
                zero_centered=zero_centered, device=device, seed=7, is_neox=False)
    gen = torch.Generator().manual_seed(8)
    gq = torch.randn(2, heads, 13, head_dim, generator=gen).to(device)
    gk = torch.randn(2, kv_heads, 13, head_dim, generator=gen).to(device)
    ours_fn = lambda *a: ops.qk_norm_rope(*a, is_neox=False)  # noqa: E731
    eager_fn = lambda q, k, qw, kw, c, s, eps, zc: eager_qk_norm_rope(q, k, qw, kw, c, s, eps, zc,  # noqa: E731
                                                                      is_neox=False)
    ref_fn = lambda q, k, qw, kw, c, s, eps, zc: ref_qk_norm_rope64(q, k, qw, kw, c, s, eps, zc,  # noqa: E731
                                                                    is_neox=False)
    ours = grads(ours_fn, args, gq, gk, zero_centered)
    eager = grads(eager_fn, args, gq, gk, zero_centered)
    ref = grads(ref_fn, [a.double() for a in args], gq.double(), gk.double(), zero_centered)
    for name, o, e, r in zip(("dq", "dk", "dq_weight", "dk_weight"), ours, eager, ref):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        if dtype == torch.float32:
            assert rel_err(o, r) <= 1e-6, name
        else:
            assert rel_err(o, r) <= rel_err(e, r), name


@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("rot_dim", [8, 4])
def test_gptj_gradcheck_fp64(zero_centered, rot_dim):
    args = make(batch=2, seq=3, heads=2, kv_heads=1, head_dim=8, rot_dim=rot_dim, dtype=torch.float64,
                zero_centered=zero_centered, is_neox=False)
    q, k, qw, kw, cos, sin = [a.detach().requires_grad_(i < 4) for i, a in enumerate(args)]
    assert torch.autograd.gradcheck(
        lambda *a: ops.qk_norm_rope(*a, cos, sin, EPS, zero_centered, is_neox=False), (q, k, qw, kw))


def test_gptj_inplace_qkv_matches_out_of_place(device):
    q, k, qw, kw, cos, sin = make(dtype=torch.bfloat16, device=device, seq=1, batch=5, rot_dim=64, is_neox=False)
    v = torch.randn_like(k)
    qkv = torch.cat([q, k, v], -1)
    ops.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, EPS, 4, 2, is_neox=False)
    ref_q, ref_k = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS, is_neox=False)
    assert torch.equal(qkv[..., :512].unflatten(-1, (4, 128)), ref_q.transpose(1, 2))
    assert torch.equal(qkv[..., 512:768].unflatten(-1, (2, 128)), ref_k.transpose(1, 2))
    assert torch.equal(qkv[..., 768:], v)


# --------------------------------------------------------------------------------------------------------------
# Edge cases: overlapping in-place buffers, head_dim 0, memory of the backward.


def test_inplace_qkv_rejects_overlapping_buffers(device):
    q, k, qw, kw, cos, sin = make(dtype=torch.float32, device=device, seq=3, batch=1)
    qkv = torch.cat([q, k, torch.randn_like(k)], -1)
    cos2, sin2 = cos.expand(2, -1, -1), sin.expand(2, -1, -1)
    with pytest.raises(RuntimeError, match="qkv: the in-place op writes every element once"):
        ops.qk_norm_rope_qkv_(qkv.expand(2, -1, -1), qw, kw, cos2, sin2, EPS, 4, 2)
    wide = torch.randn(1, 3, 2 * qkv.shape[-1], device=device)
    overlapping = wide.as_strided(qkv.shape, (wide.shape[1] * wide.shape[2], 64, 1))  # rows 64 apart, 1024 long
    with pytest.raises(RuntimeError, match="qkv: the in-place op writes every element once"):
        ops.qk_norm_rope_qkv_(overlapping, qw, kw, cos, sin, EPS, 4, 2)
    shared = qkv[0, 0, :128].clone()
    buf = torch.cat([qkv.flatten(), shared])
    with pytest.raises(RuntimeError, match="qkv: shares memory with q_weight"):
        ops.qk_norm_rope_qkv_(buf[: qkv.numel()].view(qkv.shape), buf[:128], kw, cos, sin, EPS, 4, 2)
    # A slice of a wider buffer (strided but not overlapping) is fine and leaves the rest alone.
    padded = torch.randn(1, 3, qkv.shape[-1] + 16, device=device)
    padded[..., : qkv.shape[-1]] = qkv
    tail = padded[..., qkv.shape[-1]:].clone()
    ops.qk_norm_rope_qkv_(padded[..., : qkv.shape[-1]], qw, kw, cos, sin, EPS, 4, 2)
    ops.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, EPS, 4, 2)
    assert torch.equal(padded[..., : qkv.shape[-1]], qkv) and torch.equal(padded[..., qkv.shape[-1]:], tail)


# (8, 2**56): (8 + 2 * 2**56) * 128 wraps to exactly 1024, the width of this qkv
@pytest.mark.parametrize("heads", [(5, 2), (4, 3), (8, 2**56), (1, 2**62), (2**62, 1), (2**63 - 1, 2**62), (0, 2),
                                   (4, -1)])
def test_inplace_qkv_checks_head_counts(device, heads):
    """Head counts that do not split qkv's last dimension are refused by name, including counts whose
    (q_heads + 2 * kv_heads) * head_dim would overflow into the right width."""
    q, k, qw, kw, cos, sin = make(dtype=torch.float32, device=device, seq=3, batch=1)
    qkv = torch.cat([q, k, torch.randn_like(k)], -1)  # 4 q heads, 2 kv heads of 128
    with pytest.raises(RuntimeError, match=r"qkv: last dimension|num_q_heads / num_kv_heads: expected positive"):
        ops.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, EPS, *heads)


@pytest.mark.parametrize("is_neox", [True, False])
def test_head_dim_zero(device, is_neox):
    q, k, qw, kw, cos, sin = make(head_dim=0, rot_dim=0, dtype=torch.float32, device=device, flat=False,
                                  is_neox=is_neox)
    q.requires_grad_()
    qw.requires_grad_()
    out_q, out_k = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS, is_neox=is_neox)
    assert out_q.shape == (2, 4, 9, 0) and out_k.shape == (2, 2, 9, 0)
    dq, dqw = torch.autograd.grad(out_q.sum() + out_k.sum(), [q, qw], allow_unused=True)
    assert dq.shape == q.shape and dqw.shape == (0,)
    qkv = torch.empty(2, 9, 0, device=device)
    ops.qk_norm_rope_qkv_(qkv, qw.detach(), kw, cos, sin, EPS, 4, 2, is_neox=is_neox)
    with pytest.raises(RuntimeError, match="head_dim is 0"):
        ops.qk_norm_rope(q.detach().flatten(2), k.flatten(2), qw, kw, cos, sin, EPS)


def _cpu_bytes_allocated(fn):
    """Bytes of CPU memory the ops inside fn allocate (each op's own allocations, from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def test_backward_allocates_no_forward_outputs():
    """The backward reads q and k; it allocates dq, dk and the small weight-gradient partials, never a copy of the
    forward's outputs (which would double its footprint)."""
    q, k, qw, kw, cos, sin = make(batch=2, seq=64, heads=8, kv_heads=4, dtype=torch.float32)
    gq = torch.randn(2, 8, 64, 128)
    gk = torch.randn(2, 4, 64, 128)
    op = torch.ops.ropekit.qk_norm_rope_backward.default
    allocated = _cpu_bytes_allocated(lambda: op(gq, gk, q, k, qw, kw, cos, sin, EPS, False))
    grads_bytes = (q.numel() + k.numel()) * 4
    assert grads_bytes <= allocated < grads_bytes + 64 * 1024, (allocated, grads_bytes)


def test_cuda_forward_min_blocks_knob_validates_and_restores():
    """The launch-bounds knob of the CUDA forward (a benchmark setting, csrc/qk_norm_rope.h): 4 or 5, 0 reads it,
    anything else is a ValueError naming the argument; it returns the previous value."""
    knob = torch.ops.ropekit._cuda_forward_min_blocks
    before = knob(0)
    assert before in (4, 5)
    try:
        assert knob(5) == before and knob(0) == 5
        assert knob(4) == 5 and knob(0) == 4
        with pytest.raises(ValueError, match=r"blocks: expected 4 or 5 \(or 0 to only read the setting\), got 3"):
            knob(3)
        assert knob(0) == 4
    finally:
        knob(before)


def test_frozen_operand_output_carries_no_grad(device):
    """q and q_norm frozen next to a trainable k (or the other way round): the frozen side's output does not require
    grad, as transformers' q_norm(q) does not; the trainable side's gradients are unchanged by it."""
    args = make(dtype=torch.float32, batch=1, seq=3, heads=2, kv_heads=1, head_dim=16, device=device)

    def grads(train_q: bool, train_k: bool):
        q, k, qw, kw = (a.detach().requires_grad_(t) for a, t in zip(args[:4], (train_q, train_k) * 2))
        out_q, out_k = ops.qk_norm_rope(q, k, qw, kw, *args[4:], EPS)
        assert out_q.requires_grad == train_q and out_k.requires_grad == train_k
        (out_q.square().sum() + out_k.square().sum()).backward()
        return q.grad, k.grad, qw.grad, kw.grad

    both = grads(True, True)
    only_k = grads(False, True)
    assert only_k[0] is None and only_k[2] is None
    assert torch.equal(only_k[1], both[1]) and torch.equal(only_k[3], both[3])
    only_q = grads(True, False)
    assert only_q[1] is None and only_q[3] is None
    assert torch.equal(only_q[0], both[0]) and torch.equal(only_q[2], both[2])
