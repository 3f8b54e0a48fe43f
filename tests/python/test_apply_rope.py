"""apply_rope: accuracy against a float64 reference (no worse than transformers eager), gradients, layouts."""

from __future__ import annotations

import pytest
import torch

from ropekit import ops

from conftest import requires_cuda, same_bits


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_llm(x):
    """GLM-4V's GPT-J-style rotation (transformers.models.glm4v.modeling_glm4v.rotate_half_llm)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def eager_rope(q, k, cos, sin, unsqueeze_dim=1, is_neox=True):
    """transformers' apply_rotary_pos_emb, with Qwen3.5's / GLM-4V's partial-rotary pass-through when cos is
    narrower; is_neox=False is GLM-4V's form (rotate_half_llm on repeat_interleave(2) cos/sin)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]
    rotate = rotate_half if is_neox else rotate_half_llm

    def one(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat([x_rot * cos + rotate(x_rot) * sin, x_pass], dim=-1)

    return one(q), one(k)


def cos_sin_layout(freqs, is_neox):
    """transformers' duplicated layout: cat((f, f)) for neox, repeat_interleave(2) for GPT-J (GLM-4V)."""
    return torch.cat([freqs, freqs], -1) if is_neox else freqs.repeat_interleave(2, dim=-1)


def make_inputs(batch=2, seq=11, heads=4, kv_heads=2, head_dim=64, rot_dim=None, dtype=torch.float32,
                cos_dtype=None, cos_batch=None, device="cpu", layout="bhsd", seed=0, is_neox=True):
    """q/k as transformers hands them over: transposed (B, H, S, D) views of (B, S, H, D) projections."""
    gen = torch.Generator().manual_seed(seed)
    rot_dim = head_dim if rot_dim is None else rot_dim
    q = torch.randn(batch, seq, heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen).to(device, dtype)
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = torch.randint(0, 4096, (cos_batch or batch, seq), generator=gen).double()
    inv = 1.0 / (1e6 ** (torch.arange(0, rot_dim, 2).double() / rot_dim))
    freqs = pos[..., None] * inv
    emb = cos_sin_layout(freqs, is_neox)
    cos_dtype = cos_dtype or dtype
    return q, k, emb.cos().to(device, cos_dtype), emb.sin().to(device, cos_dtype)


def rel_err(out, ref64):
    return ((out.double() - ref64).norm() / ref64.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rot_dim", [64, 32])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_forward_accuracy(device, dtype, rot_dim, kv_heads):
    q, k, cos, sin = make_inputs(head_dim=64, rot_dim=rot_dim, kv_heads=kv_heads, dtype=dtype, device=device)
    ours = ops.apply_rope(q, k, cos, sin)
    eager = eager_rope(q, k, cos, sin)
    ref = eager_rope(q.double(), k.double(), cos.double(), sin.double())
    for x, o, e, r in zip((q, k), ours, eager, ref):
        assert o.dtype == e.dtype and o.shape == e.shape
        assert o.stride() == x.stride(), "the output keeps the input's (B, S, H, D) storage order: no transpose pass"
        if dtype == torch.float32:
            assert torch.equal(o, e), "fp32 rounds exactly like eager: no FMA, same product/sum order"
            assert rel_err(o, r) <= 1e-6
        else:
            assert rel_err(o, r) <= rel_err(e, r)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_fp32_cos_promotes_like_eager(device, q_dtype):
    q, k, cos, sin = make_inputs(dtype=q_dtype, cos_dtype=torch.float32, device=device)
    ours, eager = ops.apply_rope(q, k, cos, sin), eager_rope(q, k, cos, sin)
    for o, e in zip(ours, eager):
        assert o.dtype == torch.float32
        assert torch.equal(o, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_backward_accuracy(device, dtype):
    q, k, cos, sin = make_inputs(kv_heads=1, dtype=dtype, device=device, seed=3)
    gen = torch.Generator().manual_seed(4)
    gq = torch.randn(q.shape, generator=gen).to(device, dtype)
    gk = torch.randn(k.shape, generator=gen).to(device, dtype)

    def grads(fn, q, k, cos, sin):
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        out_q, out_k = fn(q, k, cos, sin)
        torch.autograd.backward([out_q, out_k], [gq.to(out_q.dtype), gk.to(out_k.dtype)])
        return q.grad, k.grad

    ours = grads(ops.apply_rope, q, k, cos, sin)
    eager = grads(eager_rope, q, k, cos, sin)
    ref = grads(eager_rope, q.double(), k.double(), cos.double(), sin.double())
    for o, e, r in zip(ours, eager, ref):
        assert o.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(o, r) <= 1e-6
        else:
            assert rel_err(o, r) <= rel_err(e, r)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("cos_batch", [None, 1])
@pytest.mark.parametrize("rot_dim", [8, 4])
def test_gradcheck_fp64(unsqueeze_dim, cos_batch, rot_dim):
    layout = "bhsd" if unsqueeze_dim == 1 else "bshd"
    q, k, cos, sin = make_inputs(batch=2, seq=3, heads=3, kv_heads=1, head_dim=8, rot_dim=rot_dim,
                                 dtype=torch.float64, cos_batch=cos_batch, layout=layout)
    args = [t.detach().requires_grad_() for t in (q, k, cos, sin)]
    assert torch.autograd.gradcheck(lambda *a: ops.apply_rope(*a, unsqueeze_dim=unsqueeze_dim), args)


def test_only_one_output_used(device):
    q, k, cos, sin = make_inputs(device=device)
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    out_q, _ = ops.apply_rope(q, k, cos, sin)
    out_q.sum().backward()
    assert torch.count_nonzero(k.grad) == 0
    assert torch.allclose(q.grad, eager_rope(torch.ones_like(q), k, cos, -sin)[0], atol=1e-6)


def test_inputs_not_mutated(device):
    q, k, cos, sin = make_inputs(dtype=torch.bfloat16, device=device)
    q, k = q.requires_grad_(), k.requires_grad_()
    before = [t.detach().clone() for t in (q, k, cos, sin)]
    out_q, out_k = ops.apply_rope(q, k, cos, sin)
    (out_q.float().square().sum() + out_k.float().sum()).backward()
    for t, b in zip((q, k, cos, sin), before):
        assert torch.equal(t.detach(), b)
    assert out_q.data_ptr() != q.data_ptr() and out_k.data_ptr() != k.data_ptr()


def test_non_contiguous_inputs(device):
    base_q, base_k, cos, sin = make_inputs(batch=2, seq=9, heads=6, kv_heads=4, head_dim=64, device=device,
                                           layout="bshd")
    views = {
        "transposed": (base_q.transpose(1, 2), base_k.transpose(1, 2)),
        "head slice": (base_q[:, :, 1:5].transpose(1, 2), base_k[:, :, ::2].transpose(1, 2)),
        "seq stride": (base_q[:, ::2].transpose(1, 2), base_k[:, ::2].transpose(1, 2)),
    }
    for name, (q, k) in views.items():
        c, s = (cos[:, ::2], sin[:, ::2]) if name == "seq stride" else (cos, sin)
        for o, e in zip(ops.apply_rope(q, k, c, s), eager_rope(q, k, c, s)):
            assert torch.equal(o, e), name
    # head_dim with a non-unit stride: copied once, same numbers
    wide = torch.randn(2, 4, 9, 128, device=device)
    q = wide[..., ::2]
    k = wide[:, :2, :, 1::2]
    for o, e in zip(ops.apply_rope(q, k, cos, sin), eager_rope(q, k, cos, sin)):
        assert torch.equal(o, e)
    # cos broadcast over the batch, given as an expanded view
    c1, s1 = cos[:1].expand(2, -1, -1), sin[:1].expand(2, -1, -1)
    q, k = base_q.transpose(1, 2), base_k.transpose(1, 2)
    for o, e in zip(ops.apply_rope(q, k, c1, s1), eager_rope(q, k, c1, s1)):
        assert torch.equal(o, e)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty(device, shape):
    batch, seq = shape
    q, k, cos, sin = make_inputs(batch=batch, seq=seq, device=device)
    q.requires_grad_()
    out_q, out_k = ops.apply_rope(q, k, cos, sin)
    assert out_q.shape == q.shape and out_k.shape == k.shape
    out_q.sum().backward()
    assert q.grad.shape == q.shape


def test_unsqueeze_dim_two_matches_one(device):
    q, k, cos, sin = make_inputs(layout="bshd", device=device, dtype=torch.bfloat16)
    a = ops.apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    b = ops.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=1)
    for x, y in zip(a, b):
        assert torch.equal(x, y.transpose(1, 2))
    for x, y in zip(a, eager_rope(q, k, cos, sin, unsqueeze_dim=2)):
        assert x.shape == y.shape


def test_bad_input():
    q, k, cos, sin = make_inputs(head_dim=64)
    cases = [
        (lambda: ops.apply_rope(q[0], k, cos, sin), "q: expected a 4-D"),
        (lambda: ops.apply_rope(q, k[0], cos, sin), "k: expected a 4-D"),
        (lambda: ops.apply_rope(q, k, cos[0], sin[0]), "cos: expected a 3-D"),
        (lambda: ops.apply_rope(q, k, cos, sin[..., :32]), "sin: expected the shape of cos"),
        (lambda: ops.apply_rope(q.int(), k.int(), cos, sin), "q: expected float32"),
        (lambda: ops.apply_rope(q, k.double(), cos, sin), "k: expected the dtype of q"),
        (lambda: ops.apply_rope(q.bfloat16(), k.bfloat16(), cos.half(), sin.half()), "cos: expected the dtype of q"),
        (lambda: ops.apply_rope(q, k, cos, sin.double()), "sin: expected the dtype of cos"),
        (lambda: ops.apply_rope(q, k, cos[..., :31], sin[..., :31]), "expected an even rotary dim"),
        (lambda: ops.apply_rope(q[..., :63], k[..., :63], cos[..., :63], sin[..., :63]), "expected an even rotary dim"),
        (lambda: ops.apply_rope(q[..., :32], k[..., :32], cos, sin), "rotary dim 64 exceeds head_dim 32"),
        (lambda: ops.apply_rope(q, k[..., :32], cos, sin), "k: expected head_dim 64"),
        (lambda: ops.apply_rope(q, k, cos[:, :5], sin[:, :5]), "cos: expected seq 11"),
        (lambda: ops.apply_rope(q, k[:1], cos, sin), "k: expected batch 2"),
        (lambda: ops.apply_rope(q, k, torch.cat([cos] * 2), torch.cat([sin] * 2)), "cos: expected batch 1 or 2"),
        (lambda: ops.apply_rope(q, k, cos, sin, unsqueeze_dim=3), "unsqueeze_dim: expected 1"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@requires_cuda
def test_mismatched_devices():
    q, k, cos, sin = make_inputs()
    with pytest.raises(RuntimeError, match="cos: expected device"):
        ops.apply_rope(q.cuda(), k.cuda(), cos, sin)
    with pytest.raises(RuntimeError, match="k: expected device"):
        ops.apply_rope(q.cuda(), k, cos.cuda(), sin.cuda())


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_cpu(dtype):
    q, k, cos, sin = make_inputs(batch=3, seq=33, heads=8, kv_heads=1, head_dim=128, rot_dim=64, dtype=dtype)
    cpu = ops.apply_rope(q, k, cos, sin)
    gpu = ops.apply_rope(q.cuda(), k.cuda(), cos.cuda(), sin.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("vision", [False, True])
@pytest.mark.parametrize("is_neox, rot_dim", [(True, 8), (True, 4), (False, 4)])
@pytest.mark.parametrize("table_grad", [False, True])
def test_double_backward(device, vision, is_neox, rot_dim, table_grad):
    """create_graph=True (a gradient penalty) through the rotation, cos/sin trainable or not: the first-order
    gradients are the kernel's bits, the second-order ones those of the eager formula (float64: to rounding)."""
    q, k, cos, sin = make_inputs(dtype=torch.float64, batch=1, seq=3, heads=2, kv_heads=1, head_dim=8,
                                 rot_dim=rot_dim, device=device, is_neox=is_neox)
    if vision:
        q, k, cos, sin = q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0]

    def eager(q, k, cos, sin):
        if not vision:
            return eager_rope(q, k, cos, sin, is_neox=is_neox)
        out = eager_rope(q.unsqueeze(0), k.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0), unsqueeze_dim=2,
                         is_neox=is_neox)
        return out[0][0], out[1][0]

    fn = (lambda *a: ops.apply_rope_vision(*a, is_neox=is_neox)) if vision else \
        (lambda *a: ops.apply_rope(*a, is_neox=is_neox))
    results = []
    for f in (fn, eager):
        inputs = [q.detach().requires_grad_(), k.detach().requires_grad_(), cos.detach().requires_grad_(table_grad),
                  sin.detach().requires_grad_(table_grad)]
        wrt = inputs if table_grad else inputs[:2]
        out_q, out_k = f(*inputs)
        first = torch.autograd.grad((out_q.square() * 0.5).sum() + out_k.pow(3).sum(), wrt, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), wrt)
        results.append((first, second))
    (first, second), (ref_first, ref_second) = results
    for g, r in zip(first + second, ref_first + ref_second):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    inputs = [q.detach().requires_grad_(), k.detach().requires_grad_()]
    out_q, out_k = fn(*inputs, cos, sin)
    plain = torch.autograd.grad((out_q.square() * 0.5).sum() + out_k.pow(3).sum(), inputs)
    assert all(same_bits(a, b) for a, b in zip(plain, first[:2])), "create_graph leaves the values as they were"


def test_cos_and_sin_with_different_strides(device):
    q, k, cos, sin = make_inputs(device=device, seq=7, cos_batch=1)
    wide = torch.cat([sin, torch.zeros_like(sin)], 1)[:, :7]  # same values, other strides
    assert wide.stride() != cos.stride()
    for o, e in zip(ops.apply_rope(q, k, cos, wide), eager_rope(q, k, cos, sin)):
        assert torch.equal(o, e)


# --------------------------------------------------------------------------------------------------------------
# GPT-J style (is_neox=False): GLM-4V's apply_rotary_pos_emb, rotate_half_llm pairs (2i, 2i+1), partial rotary.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (128, 64), (64, 20), (40, 40)])
def test_gptj_forward_accuracy(device, dtype, head_dim, rot_dim):
    q, k, cos, sin = make_inputs(head_dim=head_dim, rot_dim=rot_dim, dtype=dtype, device=device, is_neox=False)
    ours = ops.apply_rope(q, k, cos, sin, is_neox=False)
    eager = eager_rope(q, k, cos, sin, is_neox=False)
    ref = eager_rope(q.double(), k.double(), cos.double(), sin.double(), is_neox=False)
    neox = ops.apply_rope(q, k, cos, sin)
    for o, e, r, n in zip(ours, eager, ref, neox):
        assert o.dtype == e.dtype and o.shape == e.shape
        assert not torch.equal(o, n), "the two styles must differ on the same inputs"
        if dtype == torch.float32:
            assert torch.equal(o, e), "fp32 GPT-J rounds exactly like eager's q*cos + rotate_half_llm(q)*sin"
            assert rel_err(o, r) <= 1e-6
        else:
            assert rel_err(o, r) <= rel_err(e, r)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
def test_gptj_fp32_cos_and_bshd_layout(device, q_dtype):
    q, k, cos, sin = make_inputs(dtype=q_dtype, cos_dtype=torch.float32, device=device, layout="bshd",
                                 rot_dim=32, is_neox=False)
    ours = ops.apply_rope(q, k, cos, sin, 2, is_neox=False)
    for o, e in zip(ours, eager_rope(q, k, cos, sin, unsqueeze_dim=2, is_neox=False)):
        assert o.dtype == torch.float32 and torch.equal(o, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_gptj_backward_accuracy(device, dtype, rot_dim):
    q, k, cos, sin = make_inputs(kv_heads=1, dtype=dtype, device=device, seed=5, rot_dim=rot_dim, is_neox=False)
    gen = torch.Generator().manual_seed(6)
    gq = torch.randn(q.shape, generator=gen).to(device, dtype)
    gk = torch.randn(k.shape, generator=gen).to(device, dtype)

    def grads(fn, q, k, cos, sin):
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        out_q, out_k = fn(q, k, cos, sin)
        return torch.autograd.grad([out_q, out_k], [q, k], [gq.to(out_q.dtype), gk.to(out_k.dtype)])

    gptj = lambda *a: ops.apply_rope(*a, is_neox=False)  # noqa: E731
    eager = lambda *a: eager_rope(*a, is_neox=False)  # noqa: E731
    ours = grads(gptj, q, k, cos, sin)
    ref = grads(eager, q.double(), k.double(), cos.double(), sin.double())
    theirs = grads(eager, q, k, cos, sin)
    for o, e, r in zip(ours, theirs, ref):
        assert o.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(o, r) <= 1e-6
        else:
            assert rel_err(o, r) <= rel_err(e, r)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("rot_dim", [8, 4])
def test_gptj_gradcheck_fp64(unsqueeze_dim, rot_dim):
    """Gradients in q, k, cos and sin (the cos/sin path uses rotate_half_llm too)."""
    layout = "bhsd" if unsqueeze_dim == 1 else "bshd"
    q, k, cos, sin = make_inputs(batch=2, seq=3, heads=3, kv_heads=1, head_dim=8, rot_dim=rot_dim,
                                 dtype=torch.float64, cos_batch=1, layout=layout, is_neox=False)
    args = [t.detach().requires_grad_() for t in (q, k, cos, sin)]
    assert torch.autograd.gradcheck(
        lambda *a: ops.apply_rope(*a, unsqueeze_dim=unsqueeze_dim, is_neox=False), args)
    # and the cos/sin gradients equal eager's (not only self-consistent)
    ours = torch.autograd.grad(sum(o.sum() for o in ops.apply_rope(*args, unsqueeze_dim, is_neox=False)), args[2:])
    theirs = torch.autograd.grad(sum(o.sum() for o in eager_rope(*args, unsqueeze_dim, is_neox=False)), args[2:])
    for o, e in zip(ours, theirs):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("is_neox", [True, False])
def test_head_dim_zero(device, is_neox):
    q, k, cos, sin = make_inputs(head_dim=0, rot_dim=0, device=device, is_neox=is_neox)
    q.requires_grad_()
    out_q, out_k = ops.apply_rope(q, k, cos, sin, is_neox=is_neox)
    assert out_q.shape == q.shape and out_k.shape == k.shape
    (grad,) = torch.autograd.grad(out_q.sum(), q)
    assert grad.shape == q.shape


@pytest.mark.parametrize("vision", [False, True])
def test_frozen_operand_output_carries_no_grad(device, vision):
    """A q that does not require grad (a frozen projection next to a trainable k) gives a rotated q that does not
    either, as transformers' q * cos + rotate_half(q) * sin does; k's gradient is unchanged by it."""
    q, k, cos, sin = make_inputs(batch=1, seq=5, heads=2, kv_heads=2, head_dim=16, device=device)
    if vision:
        q, k, cos, sin = q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0]
    fn = ops.apply_rope_vision if vision else ops.apply_rope

    def grads(q_grad, k_grad):
        qi, ki = q.detach().requires_grad_(q_grad), k.detach().requires_grad_(k_grad)
        out_q, out_k = fn(qi, ki, cos, sin)
        assert out_q.requires_grad == q_grad and out_k.requires_grad == k_grad
        (out_q.square().sum() + out_k.square().sum()).backward()
        return qi.grad, ki.grad

    both = grads(True, True)
    dq, dk = grads(True, False)
    assert dk is None and torch.equal(dq, both[0])
    dq, dk = grads(False, True)
    assert dq is None and torch.equal(dk, both[1])
    # cos/sin that require grad: both outputs carry it
    out_q, out_k = fn(q, k, cos.detach().requires_grad_(), sin)
    assert out_q.requires_grad and out_k.requires_grad


def _transformers_rotation(name):
    """transformers' own function (unpatched): Qwen3-VL's apply_rotary_pos_emb (neox), GLM-4V's (GPT-J pairs),
    Qwen2-VL's apply_rotary_pos_emb_vision."""
    import importlib

    from ropekit.transformers._patching import original

    module_name, function = {"neox": ("qwen3_vl", "apply_rotary_pos_emb"), "gptj": ("glm4v", "apply_rotary_pos_emb"),
                             "vision": ("qwen2_vl", "apply_rotary_pos_emb_vision")}[name]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    if name == "gptj" and not hasattr(module, function):  # 4.57: only the per-axis mRoPE wrapper; its expression
        rotate_half_llm = module.rotate_half_llm

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            return (q * cos) + (rotate_half_llm(q) * sin), (k * cos) + (rotate_half_llm(k) * sin)

        return apply_rotary_pos_emb
    return original(module, function)


@pytest.mark.transformers
@pytest.mark.parametrize("kind", ["neox", "gptj", "vision"])
def test_gradient_layout_is_autograds(kind):
    """The backward hands q and k their gradients in the layout autograd gives transformers' rotation (contiguous),
    whatever the layout of the incoming gradient (here transposed, as a consumer that transposes the rotated q/k
    makes it): a reduction upstream of the rotation, here the gradient of a per-channel weight as an RMSNorm has,
    then sums in the same order and gets the same bits."""
    gen = torch.Generator().manual_seed(11)
    tokens, heads, head_dim = 37, 4, 16
    x = torch.randn(2, tokens, heads, head_dim, generator=gen)
    angles = torch.rand(2, tokens, head_dim // 2, generator=gen, dtype=torch.float64) * 50
    emb = cos_sin_layout(angles, kind != "gptj")
    cos, sin = emb.cos().float(), emb.sin().float()
    # contiguous in the transposed shape: the gradient arriving at the rotation's outputs is not contiguous in theirs
    probe = torch.randn(2, tokens, heads, head_dim, generator=gen)
    if kind == "vision":
        x, cos, sin, probe = x[0], cos[0], sin[0], probe[0].transpose(0, 1).contiguous()

    def run(rotate):
        weight = torch.linspace(0.5, 1.5, head_dim).requires_grad_()
        q, k = x * weight, x.flip(-1) * weight
        q, k = (q, k) if kind == "vision" else (q.transpose(1, 2), k.transpose(1, 2))
        seen = []
        q.register_hook(lambda g: seen.append(g.stride()))
        out_q, out_k = rotate(q, k, cos, sin)
        # the consumer transposes the rotated tensors: the incoming gradients are not contiguous in their shape
        ((out_q.transpose(-2, -3) * probe).sum() + (out_k.transpose(-2, -3) * probe.flip(0)).sum()).backward()
        return weight.grad, seen[0]

    theirs = _transformers_rotation(kind)
    if kind == "vision":
        ours = ops.apply_rope_vision
    else:
        ours = lambda q, k, cos, sin: ops.apply_rope(q, k, cos, sin, is_neox=kind != "gptj")  # noqa: E731
    (expected, expected_stride), (got, got_stride) = run(theirs), run(ours)
    assert got_stride == expected_stride
    assert same_bits(got, expected)
