"""CUDA kernels: both paths of every op (the 16-byte fast path and the generic one, told apart by the kernel names
the profiler records), against a float64 reference and transformers' eager formulas; no host syncs; CUDA-graph
capture; deterministic weight gradients; launch counts; memory; 64-bit offsets. Skips without a GPU."""

from __future__ import annotations

import pytest
import torch

from ropekit import ops

from conftest import requires_cuda
from test_accuracy_claims import check as check_bound
from test_apply_rope import eager_rope, make_inputs, rel_err
from test_qk_norm_rope import EPS, eager_qk_norm_rope, make, ref_qk_norm_rope64

pytestmark = requires_cuda


def cuda_kernels(fn):
    """Names of the CUDA kernels fn launches (profiler), and fn's result."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if "Memcpy" not in n and "Memset" not in n], result


def unaligned(x):
    """The same values at an address 2 bytes past a 16-byte boundary: only the generic path can read it."""
    flat = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
    view = flat[1: 1 + x.numel()].view(x.shape)
    view.copy_(x)
    return view


def expect_vector_path(head_dim, rot_dim, is_neox, *dtypes):
    """The host's rule: 16 bytes of the narrowest dtype per lane, a power-of-two number of lanes (<= 32) per row,
    rotary pairs that line up with lanes; fp64 always takes the generic path."""
    if torch.float64 in dtypes:
        return False
    elems = 16 // min(torch.tensor([], dtype=d).element_size() for d in dtypes)
    lanes = head_dim // elems
    if head_dim % elems or lanes > 32 or lanes & (lanes - 1):
        return False
    return (rot_dim // 2) % elems == 0 if is_neox else rot_dim % elems == 0


def check_accuracy(ours, eager, ref, dtype, names=None, bound=None):
    """fp32 within 1e-6 of float64; bf16 / fp16 no worse than eager in relative RMS error, or, with ``bound``, under
    that check (check_documented_bound)."""
    names = names or [str(i) for i in range(len(ours))]
    for name, o, e, r in zip(names, ours, eager, ref):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        assert torch.isfinite(o).all(), name
        if dtype == torch.float32:
            assert rel_err(o, r) <= 1e-6, name
        elif bound is not None:
            bound(o, e, r.to(o.device), dtype, name)
        else:
            assert rel_err(o, r) <= rel_err(e, r), (name, rel_err(o, r), rel_err(e, r))


def check_documented_bound(ours, eager, ref, dtype, names):
    """The bound the README states for the fused q/k norm + RoPE (test_accuracy_claims): bf16 / fp16 max error <=
    eager's + 1 ulp and RMS <= eager's (fp32: within 1e-6). CUDA and the CPU kernel each meet it against the same
    float64 reference; they are not compared with each other (they sum squares in different orders, and CUDA's
    rsqrtf is not the CPU's 1 / sqrt)."""
    check_accuracy(ours, eager, ref, dtype, names, bound=check_bound)


# --------------------------------------------------------------------------------------------------------------
# qk_norm_rope


QK_CASES = [  # head_dim, rot_dim, heads, kv_heads, zero_centered, is_neox
    (128, 128, 32, 8, False, True),  # Qwen3-8B
    (128, 128, 5, 1, False, True),  # 6 rows per token, two per warp iteration (bf16: 16 lanes a row)
    (128, 128, 5, 2, False, True),  # 7 rows: the last warp iteration is half empty (rows % (32 / G) != 0)
    (128, 128, 3, 2, False, True),  # 5 rows: the same on another count
    (256, 64, 4, 2, True, True),  # Qwen3.5: partial rotary 0.25, zero-centred norm (fp32: 64 lanes, generic)
    (64, 64, 3, 1, False, True),
    (128, 64, 4, 2, False, False),  # GLM-4V: GPT-J pairs, partial rotary 0.5
    (128, 24, 4, 2, False, True),  # R/2 = 12: generic in bf16 (8 elements per lane), vector in fp32
    (40, 40, 4, 2, False, True),  # head_dim 40 = 5 lanes of 8 (10 of 4): generic
    (36, 20, 3, 1, False, False),  # odd sizes, GPT-J: generic
]


def qk_grads(fn, args, gq, gk, **kw):
    q, k, qw, kw_, cos, sin = [a.detach().requires_grad_(i < 4) for i, a in enumerate(args)]
    out_q, out_k = fn(q, k, qw, kw_, cos, sin, **kw)
    grads = torch.autograd.grad([out_q, out_k], [q, k, qw, kw_], [gq.to(out_q.dtype), gk.to(out_k.dtype)])
    return (out_q, out_k), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,rot_dim,heads,kv_heads,zero_centered,is_neox", QK_CASES)
@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
def test_qk_norm_rope_paths(dtype, head_dim, rot_dim, heads, kv_heads, zero_centered, is_neox, layout):
    args = make(batch=2, seq=37, head_dim=head_dim, rot_dim=rot_dim, heads=heads, kv_heads=kv_heads, dtype=dtype,
                zero_centered=zero_centered, device="cuda", seed=11, is_neox=is_neox)
    if layout == "unaligned":
        args = [unaligned(args[0]), unaligned(args[1]), *args[2:]]
    gen = torch.Generator().manual_seed(12)
    gq = torch.randn(2, heads, 37, head_dim, generator=gen).cuda()
    gk = torch.randn(2, kv_heads, 37, head_dim, generator=gen).cuda()

    def ours_fn(*a):
        return ops.qk_norm_rope(*a, EPS, zero_centered, is_neox=is_neox)

    names, ((out, grads)) = cuda_kernels(lambda: qk_grads(ours_fn, args, gq, gk))
    vector = layout == "aligned" and expect_vector_path(head_dim, rot_dim, is_neox, dtype)
    expected = "qk_norm_rope_vec_kernel" if vector else "qk_norm_rope_generic_kernel"
    expected_bwd = "qk_norm_rope_backward_vec_kernel" if vector else "qk_norm_rope_backward_generic_kernel"
    assert any(expected in n for n in names) and any(expected_bwd in n for n in names), names
    assert any("sum_partials_kernel" in n for n in names), names

    def eager_fn(q, k, qw, kw, c, s):
        return eager_qk_norm_rope(q, k, qw, kw, c, s, EPS, zero_centered, is_neox=is_neox)

    def ref_fn(q, k, qw, kw, c, s):
        return ref_qk_norm_rope64(q, k, qw, kw, c, s, EPS, zero_centered, is_neox=is_neox)

    e_out, e_grads = qk_grads(eager_fn, args, gq, gk)
    r_out, r_grads = qk_grads(ref_fn, [a.double() for a in args], gq.double(), gk.double())
    check_documented_bound(out, e_out, r_out, dtype, ["q", "k"])
    check_documented_bound(grads, e_grads, r_grads, dtype, ["dq", "dk", "dq_weight", "dk_weight"])
    # the CPU kernel meets the same bound against the same reference (the CPU tests run it on every shape in CI)
    cpu_args = [a.cpu() for a in args]
    cpu_out, cpu_grads = qk_grads(ours_fn, cpu_args, gq.cpu(), gk.cpu())
    e_cpu, e_cpu_grads = qk_grads(eager_fn, cpu_args, gq.cpu(), gk.cpu())
    check_documented_bound(cpu_out, e_cpu, [r.cpu() for r in r_out], dtype, ["cpu q", "cpu k"])
    check_documented_bound(cpu_grads, e_cpu_grads, [r.cpu() for r in r_grads], dtype,
                           ["cpu dq", "cpu dk", "cpu dq_weight", "cpu dk_weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_whole_token_forward(dtype):
    """B4 S1024 with Qwen3-8B heads: enough tokens that each warp takes a whole token (parts == 1), against the
    float64 reference under the documented bound."""
    args = make(batch=4, seq=1024, heads=32, kv_heads=8, dtype=dtype, device="cuda", seed=21)
    names, out = cuda_kernels(lambda: ops.qk_norm_rope(*args, EPS))
    assert any("qk_norm_rope_vec_kernel" in n for n in names), names
    eager = eager_qk_norm_rope(*args, EPS)
    ref = ref_qk_norm_rope64(*[a.double() for a in args], EPS)
    check_documented_bound(out, eager, ref, dtype, ["q", "k"])


@pytest.mark.parametrize("vector", [True, False])
def test_qk_norm_rope_weight_grads_bitwise_reproducible(vector):
    args = make(batch=3, seq=700, heads=8, kv_heads=2, dtype=torch.bfloat16, device="cuda", seed=13)
    if not vector:
        args = [unaligned(args[0]), unaligned(args[1]), *args[2:]]
    gq = torch.randn(3, 8, 700, 128, device="cuda")
    gk = torch.randn(3, 2, 700, 128, device="cuda")
    fn = lambda *a: ops.qk_norm_rope(*a, EPS)  # noqa: E731
    _, first = qk_grads(fn, args, gq, gk)
    for _ in range(3):
        _, again = qk_grads(fn, args, gq, gk)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_qk_norm_rope_no_host_sync_and_cuda_graph():
    """Forward and backward under sync-debug 'error', then captured in a CUDA graph and replayed on new inputs."""
    args = list(make(batch=4, seq=16, heads=8, kv_heads=2, dtype=torch.bfloat16, device="cuda", seed=14))
    q, k = args[0].requires_grad_(), args[1]
    qw = args[2].requires_grad_()
    gq = torch.randn(4, 8, 16, 128, device="cuda", dtype=torch.bfloat16)
    gk = torch.randn(4, 2, 16, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        out_q, out_k = ops.qk_norm_rope(q, k, qw, *args[3:], EPS)
        return (out_q, out_k, *torch.autograd.grad([out_q, out_k], [q, qw], [gq, gk]))

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        qkv = torch.cat([args[0].detach(), k, torch.randn_like(k)], -1)
        ops.qk_norm_rope_qkv_(qkv, args[2].detach(), *args[3:], EPS, 8, 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    new = make(batch=4, seq=16, heads=8, kv_heads=2, dtype=torch.bfloat16, device="cuda", seed=15)
    with torch.no_grad():
        q.copy_(new[0])
        k.copy_(new[1])
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


def test_decode_is_one_launch():
    """Qwen3-8B decode, B64 S1: norm + RoPE of q and k is one kernel; the in-place qkv form too."""
    q, k, qw, kw, cos, sin = make(batch=64, seq=1, heads=32, kv_heads=8, dtype=torch.bfloat16, device="cuda")
    ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)  # warm-up
    with torch.no_grad():
        names, _ = cuda_kernels(lambda: ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS))
    assert names == [n for n in names if "qk_norm_rope_vec_kernel" in n] and len(names) == 1, names
    qkv = torch.cat([q, k, torch.randn_like(k)], -1)
    names, _ = cuda_kernels(lambda: ops.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, EPS, 32, 8))
    assert len(names) == 1 and "qk_norm_rope_vec_kernel" in names[0], names


def test_backward_memory_has_no_forward_outputs():
    """Peak memory of the backward op: dq + dk + the small weight-gradient workspace, no copy of the outputs."""
    q, k, qw, kw, cos, sin = make(batch=4, seq=1024, heads=32, kv_heads=8, dtype=torch.bfloat16, device="cuda")
    gq = torch.randn(4, 32, 1024, 128, device="cuda", dtype=torch.bfloat16)
    gk = torch.randn(4, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.ropekit.qk_norm_rope_backward.default
    op(gq, gk, q, k, qw, kw, cos, sin, EPS, False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = op(gq, gk, q, k, qw, kw, cos, sin, EPS, False)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = (q.numel() + k.numel()) * 2
    workspace = (4 * 1024 // 8 + 1) * 2 * 128 * 4 * 2  # partials + level-2 sums, generously
    assert grads <= peak <= grads + workspace + (1 << 20), (peak, grads)
    del out


def test_inplace_qkv_fast_and_generic_paths():
    q, k, qw, kw, cos, sin = make(batch=8, seq=3, heads=4, kv_heads=2, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    for make_qkv, kernel in ((lambda t: t, "qk_norm_rope_vec_kernel"), (unaligned, "qk_norm_rope_generic_kernel")):
        qkv = make_qkv(torch.cat([q, k, v], -1))
        names, _ = cuda_kernels(lambda: ops.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, EPS, 4, 2))
        assert len(names) == 1 and kernel in names[0], names
        ref_q, ref_k = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
        torch.testing.assert_close(qkv[..., :512].unflatten(-1, (4, 128)), ref_q.transpose(1, 2), rtol=2 ** -7,
                                   atol=0)
        torch.testing.assert_close(qkv[..., 512:768].unflatten(-1, (2, 128)), ref_k.transpose(1, 2),
                                   rtol=2 ** -7, atol=0)
        assert torch.equal(qkv[..., 768:], v)
    with pytest.raises(RuntimeError, match="qkv: the in-place op writes every element once"):
        ops.qk_norm_rope_qkv_(torch.cat([q, k, v], -1)[:1].expand(8, -1, -1), qw, kw, cos, sin, EPS, 4, 2)


def test_int64_offsets():
    """Row offsets past 2^31 elements (a batch stride of 2^31) are computed in 64 bits."""
    free, _ = torch.cuda.mem_get_info()
    if free < 10 * 2 ** 30:
        pytest.skip("needs 10 GiB of free GPU memory")
    heads, d = 4, 128
    storage = torch.empty(2 ** 31 + heads * d, dtype=torch.bfloat16, device="cuda")
    q = storage.as_strided((2, 1, heads * d), (2 ** 31, heads * d, 1))
    q.copy_(torch.randn(2, 1, heads * d, device="cuda").bfloat16())
    _, k, qw, kw, cos, sin = make(batch=2, seq=1, heads=heads, kv_heads=2, dtype=torch.bfloat16, device="cuda")
    out_q, _ = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    ref_q, _ = ops.qk_norm_rope(q.contiguous(), k, qw, kw, cos, sin, EPS)
    assert torch.equal(out_q, ref_q)
    rot_q, _ = ops.apply_rope(q.unflatten(-1, (heads, d)), k.unflatten(-1, (2, d)), cos, sin, unsqueeze_dim=2)
    ref_rot, _ = ops.apply_rope(q.contiguous().unflatten(-1, (heads, d)), k.unflatten(-1, (2, d)), cos, sin, 2)
    assert torch.equal(rot_q, ref_rot)
    del storage


# --------------------------------------------------------------------------------------------------------------
# apply_rope


@pytest.mark.parametrize("dtype,cos_dtype", [(torch.bfloat16, None), (torch.float16, None), (torch.float32, None),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("head_dim,rot_dim,is_neox", [(128, 128, True), (128, 64, True), (256, 64, True),
                                                      (128, 64, False), (64, 40, False), (48, 48, True)])
@pytest.mark.parametrize("layout", ["bhsd", "unaligned"])
def test_apply_rope_paths(dtype, cos_dtype, head_dim, rot_dim, is_neox, layout):
    q, k, cos, sin = make_inputs(batch=2, seq=33, heads=8, kv_heads=2, head_dim=head_dim, rot_dim=rot_dim,
                                 dtype=dtype, cos_dtype=cos_dtype, device="cuda", is_neox=is_neox, seed=21)
    gq, gk = torch.randn_like(q, dtype=cos_dtype or dtype), torch.randn_like(k, dtype=cos_dtype or dtype)
    if layout == "unaligned":  # the backward's input (the gradients) too, so both directions take the generic path
        q, k, gq, gk = unaligned(q), unaligned(k), unaligned(gq), unaligned(gk)
    q, k = q.requires_grad_(), k.requires_grad_()

    def run():
        out = ops.apply_rope(q, k, cos, sin, is_neox=is_neox)
        return out, torch.autograd.grad(out, [q, k], [gq, gk])

    names, (out, grads) = cuda_kernels(run)
    vector = layout != "unaligned" and expect_vector_path(head_dim, rot_dim, is_neox, dtype, out[0].dtype)
    kernel = "apply_rope_vec_kernel" if vector else "apply_rope_generic_kernel"
    assert sum(kernel in n for n in names) == 2, names
    eager = eager_rope(q, k, cos, sin, is_neox=is_neox)
    ref = eager_rope(q.double(), k.double(), cos.double(), sin.double(), is_neox=is_neox)
    check_accuracy(out, eager, ref, dtype if cos_dtype is None else torch.float32)
    if dtype == torch.float32 or cos_dtype == torch.float32:
        for o, e in zip(out, eager):
            assert torch.equal(o, e), "fp32 math rounds like eager"
    e_grads = torch.autograd.grad(eager, [q, k], [gq, gk])
    r_grads = torch.autograd.grad(ref, [q, k], [gq.double(), gk.double()])
    check_accuracy(grads, e_grads, r_grads, dtype)


def test_apply_rope_large_rotary_dim():
    """Rotary dims past 6144 used to ask for more than 48 KiB of shared memory; no kernel uses any now."""
    for head_dim in (8192, 12288):
        q, k, cos, sin = make_inputs(batch=1, seq=3, heads=2, kv_heads=1, head_dim=head_dim, device="cuda")
        for o, e in zip(ops.apply_rope(q, k, cos, sin), eager_rope(q, k, cos, sin)):
            assert torch.equal(o, e)


def test_apply_rope_no_host_sync_and_cuda_graph():
    q, k, cos, sin = make_inputs(batch=2, seq=9, heads=8, kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                                 device="cuda")
    ops.apply_rope(q, k, cos, sin)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        qr = q.detach().requires_grad_()
        out = ops.apply_rope(qr, k, cos, sin, is_neox=False)
        torch.autograd.grad(out[0].float().sum(), qr)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.apply_rope(q, k, cos, sin)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        static = ops.apply_rope(q, k, cos, sin)
    q.copy_(torch.randn_like(q))
    graph.replay()
    for a, b in zip(static, ops.apply_rope(q, k, cos, sin)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# cos/sin gather


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("half", [64, 12])
@pytest.mark.parametrize("section,interleaved,is_neox", [((24, 20, 20), True, True), ((16, 24, 24), False, True),
                                                         ((8, 28, 28), False, False)])
def test_gather_paths_bit_identical(dtype, half, section, interleaved, is_neox):
    """Both gather kernels (16-byte and scalar) against transformers' formulas computed on the GPU; positions past
    the table, negative ones and stale columns are computed exactly, inside the same single launch."""
    from test_rope_table import assert_same_cos_sin, transformers_mrope

    if half == 12:
        section = (4, 4, 4)
    inv = (1.0 / (1e6 ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))).cuda()
    tables = ops.rope_cache(inv, 4096, 0.75)
    gen = torch.Generator().manual_seed(31)
    pos = torch.randint(0, 4096, (3, 4, 300), generator=gen).cuda()
    pos[:, :, :100] = pos[0, :, :100]  # text tokens
    elems = 16 // torch.tensor([], dtype=dtype).element_size()
    vector = dtype != torch.float64 and half % elems == 0
    kernel = "gather_cos_sin_vec_kernel" if vector else "gather_cos_sin_scalar_kernel"
    names, ours = cuda_kernels(lambda: ops.mrope_cos_sin(*tables, pos, list(section), dtype,
                                                         mrope_interleaved=interleaved, is_neox=is_neox))
    assert len(names) == 1 and kernel in names[0], names
    expect = [t.to(dtype) for t in transformers_mrope(inv, pos, section, interleaved, is_neox, 0.75)]
    assert_same_cos_sin(ours, expect)
    far = pos.clone()
    far[:, 1, 40:44] = torch.tensor([4096, 200000, -3, 9999], device="cuda")
    far[2, 2, 250] = 70000
    now = inv.clone()
    now[5] *= 1.25
    names, ours = cuda_kernels(lambda: ops.mrope_cos_sin(*tables, far, list(section), dtype, now, 0.75, inv,
                                                         mrope_interleaved=interleaved, is_neox=is_neox))
    assert len(names) == 1 and kernel in names[0], names  # one launch: the exact rows are computed inside it
    expect = [t.to(dtype) for t in transformers_mrope(now, far, section, interleaved, is_neox, 0.75)]
    assert_same_cos_sin(ours, expect)


@pytest.mark.transformers
@pytest.mark.parametrize("where", ["in the table", "past the table", "negative"])
def test_patched_rotary_forward_is_one_launch(unpatch_after, where):
    """A patched rotary forward is one kernel launch at any position: rows the table cannot serve are computed
    inside the 16-byte gather kernel."""
    import ropekit
    from transformers import Qwen3ForCausalLM

    from conftest import build, tiny_qwen3_config

    ropekit.apply_to_qwen3()
    rotary = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cuda").model.rotary_emb
    x = torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(16, device="cuda").expand(2, 16).clone()
    pos += {"in the table": 0, "past the table": 100_000, "negative": -8}[where]
    rotary(x, pos)  # builds the table
    names, (cos, sin) = cuda_kernels(lambda: rotary(x, pos))
    assert len(names) == 1 and "gather_cos_sin_vec_kernel" in names[0], names
    ropekit.unpatch()
    expected = rotary(x, pos)
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])


def test_gather_no_host_sync_and_cuda_graph():
    inv = (1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))).cuda()
    tables = ops.rope_cache(inv, 1024)
    pos = torch.randint(0, 2048, (3, 2, 64), device="cuda")
    ops.mrope_cos_sin(*tables, pos, [24, 20, 20], torch.bfloat16, inv)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.mrope_cos_sin(*tables, pos, [24, 20, 20], torch.bfloat16, inv, 1.0, inv)
        ops.rope_cos_sin(*tables, pos[0], torch.bfloat16, inv, is_neox=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.rope_cos_sin(*tables, pos[0], torch.bfloat16, inv)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        static = ops.rope_cos_sin(*tables, pos[0], torch.bfloat16, inv)
    pos.copy_(torch.randint(0, 2048, (3, 2, 64), device="cuda"))
    graph.replay()
    for a, b in zip(static, ops.rope_cos_sin(*tables, pos[0], torch.bfloat16, inv)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_launch_bounds_knob_gives_the_same_bits(dtype):
    """4 or 5 resident blocks per SM (`_cuda_forward_min_blocks`) changes register allocation only."""
    args = make(batch=2, seq=300, heads=32, kv_heads=8, dtype=dtype, device="cuda", seed=23)
    knob = torch.ops.ropekit._cuda_forward_min_blocks
    before = knob(4)
    try:
        four = ops.qk_norm_rope(*args, EPS)
        knob(5)
        five = ops.qk_norm_rope(*args, EPS)
    finally:
        knob(before)
    assert all(torch.equal(a, b) for a, b in zip(four, five))
