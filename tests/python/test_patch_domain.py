"""Calls that transformers' code takes but ropekit's ops do not: the patch hands them to the original, so the
patched function returns the same result (or raises the same exception) as unpatched transformers.

Each case here made the patch raise before: broadcast shapes in apply_rotary_pos_emb (cos/sin of seq 1, a q of
batch 1 against a batch of cos/sin, an odd rotary dim), positions that are not int64/int32, an inv_freq that
requires grad, cos/sin that require grad in the fused attention, and DTensor inputs (torch's tensor / sequence
parallelism), for which the ops have no sharding rule."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import ropekit
from ropekit.transformers import _FAMILIES, _rope_function
from ropekit.transformers._patching import import_optional

from conftest import tiny_qwen3_config

pytestmark = pytest.mark.transformers

APPLY = ropekit.transformers._APPLY
# each modeling module once, under the first family that patches it (Cosmos3 runs Qwen3-VL's text model), where the
# rotation ropekit replaces is apply_rotary_pos_emb (4.57's sectioned families replace
# apply_multimodal_rotary_pos_emb; 4.57's Qwen2.5-Omni module's apply_rotary_pos_emb is its Token2Wav DiT's, left
# alone)
MODULES = []
for _family, _specs in _FAMILIES.items():
    for _spec in _specs:
        _module = import_optional(_spec.name)
        if (_module is not None and _spec.rotary is not None
                and _rope_function(_module, _spec)[0] == "apply_rotary_pos_emb"
                and "apply_rotary_pos_emb" in vars(_module)
                and _spec.name not in {name for _, name in MODULES}):
            MODULES.append((_family, _spec.name))


def outcome(fn, *args, **kwargs):
    """fn's result, or the type of what it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the exception type is what is compared
        return type(error)


def assert_same(expected, got):
    if isinstance(expected, type) or isinstance(got, type):
        assert expected == got, f"transformers: {expected}, patched: {got}"
        return
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype, (e.shape, g.shape, e.dtype, g.dtype)
        assert torch.equal(e, g), f"max |difference| {(e.double() - g.double()).abs().max()}"


def rope_inputs(seed=0, batch=2, heads=4, kv_heads=2, seq=5, head_dim=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen)
    cos = torch.randn(batch, seq, head_dim, generator=gen)
    sin = torch.randn(batch, seq, head_dim, generator=gen)
    return q, k, cos, sin


# name -> (q, k, cos, sin, kwargs) from the base inputs; each broadcasts in transformers' code
SHAPES = {
    "base": lambda q, k, c, s: (q, k, c, s, {}),
    "cos/sin batch 1": lambda q, k, c, s: (q, k, c[:1], s[:1], {}),
    "q and k batch 1, cos/sin batch 2": lambda q, k, c, s: (q[:1], k[:1], c, s, {}),
    "k batch 1": lambda q, k, c, s: (q, k[:1], c, s, {}),
    "cos/sin seq 1": lambda q, k, c, s: (q, k, c[:, :1], s[:, :1], {}),
    "q and k seq 1, cos/sin seq 5": lambda q, k, c, s: (q[:, :, :1], k[:, :, :1], c, s, {}),
    "odd rotary dim": lambda q, k, c, s: (q, k, c[..., :15], s[..., :15], {}),
    "half rotary dim": lambda q, k, c, s: (q, k, c[..., :8], s[..., :8], {}),
    "cos requires grad": lambda q, k, c, s: (q, k, c.clone().requires_grad_(), s, {}),
    "sin float64, cos float32": lambda q, k, c, s: (q, k, c, s.double(), {}),
    "(batch, seq, heads, dim), unsqueeze_dim=2": lambda q, k, c, s: (q.transpose(1, 2), k.transpose(1, 2), c, s,
                                                                     {"unsqueeze_dim": 2}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family,module_name", MODULES, ids=[m.rsplit(".", 1)[-1] for _, m in MODULES])
def test_apply_rotary_pos_emb_takes_what_transformers_takes(unpatch_after, family, module_name, shape):
    module = import_optional(module_name)
    APPLY[family]()
    patched = module.apply_rotary_pos_emb
    original = patched.__ropekit_original__
    assert patched is not original
    q, k, cos, sin, kwargs = SHAPES[shape](*rope_inputs())
    expected = outcome(original, q, k, cos, sin, **kwargs)
    got = outcome(patched, q, k, cos, sin, **kwargs)
    if shape == "base":
        assert not isinstance(expected, type), "the base case must run"
    assert_same(expected, got)


def qwen3_attention():
    from transformers.models.qwen3 import modeling_qwen3

    config = tiny_qwen3_config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attention = modeling_qwen3.Qwen3Attention(config, 0)
    for norm in (attention.q_norm, attention.k_norm):
        norm.weight.data.uniform_(0.5, 1.5)
    rotary = modeling_qwen3.Qwen3RotaryEmbedding(config)
    x = torch.randn(2, 7, config.hidden_size)
    cos, sin = rotary(x, torch.arange(7)[None].expand(2, 7))
    return attention, x, cos, sin


def test_attention_with_cos_sin_that_require_grad(unpatch_after):
    """A caller that scales cos/sin by a trainable factor: the fused op takes no cos/sin gradient, so the patched
    attention runs the unfused steps, and the output and the factor's gradient equal transformers'."""
    attention, x, cos, sin = qwen3_attention()
    results = []
    for patched in (False, True):
        ropekit.unpatch()
        if patched:
            ropekit.apply_to_qwen3()
        scale = torch.tensor(0.9, requires_grad=True)
        out, _ = attention(x, (cos * scale, sin * scale), None)
        (grad,) = torch.autograd.grad(out.square().sum(), scale)
        results.append((out.detach(), grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][1] != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.uint8, torch.bool])
def test_rotary_forward_takes_any_position_dtype(unpatch_after, dtype):
    from transformers.models.qwen3 import modeling_qwen3

    rotary = modeling_qwen3.Qwen3RotaryEmbedding(tiny_qwen3_config())
    x = torch.randn(2, 6, 8)
    positions = torch.arange(6)[None].expand(2, 6).to(dtype)
    expected = outcome(rotary, x, positions)
    ropekit.apply_to_qwen3()
    assert type(rotary).forward is not modeling_qwen3.Qwen3RotaryEmbedding.forward.__ropekit_original__
    assert_same(expected, outcome(rotary, x, positions))


def test_rotary_forward_with_an_inv_freq_that_requires_grad(unpatch_after):
    from transformers.models.qwen3 import modeling_qwen3

    rotary = modeling_qwen3.Qwen3RotaryEmbedding(tiny_qwen3_config())
    rotary.inv_freq.requires_grad_(True)
    x, positions = torch.randn(2, 6, 8), torch.arange(6)[None].expand(2, 6)
    expected = outcome(rotary, x, positions)
    ropekit.apply_to_qwen3()
    assert_same(expected, outcome(rotary, x, positions))


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_inputs_run_transformers_code(unpatch_after, one_process_group):
    """torch's own tensor parallelism (parallelize_module without local outputs) hands the attention DTensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from transformers.models.qwen3 import modeling_qwen3

    mesh = one_process_group
    attention, x, cos, sin = qwen3_attention()
    for module in attention.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, torch.nn.Parameter(distribute_tensor(param.detach(), mesh, [Replicate()])))
    xd, cd, sd = (distribute_tensor(t, mesh, [Replicate()]) for t in (x, cos, sin))
    rotary = modeling_qwen3.Qwen3RotaryEmbedding(tiny_qwen3_config())
    positions = torch.arange(7)[None].expand(2, 7)  # DTensor positions fail in transformers' own matmul
    q, k, c, s = (distribute_tensor(t, mesh, [Replicate()]) for t in rope_inputs())

    def run():
        out, _ = attention(xd, (cd, sd), None)
        rotated = modeling_qwen3.apply_rotary_pos_emb(q, k, c, s)
        assert all(isinstance(t, DTensor) for t in (out, *rotated))
        return (*(t.full_tensor() for t in (out, *rotated)), *rotary(xd, positions))

    expected = run()
    ropekit.apply_to_qwen3()
    assert_same(expected, run())


# name -> (cos, sin) from the rotary embedding's; transformers' attention broadcasts each
ATTENTION_CASES = {
    "as the model passes them": lambda c, s: (c, s),
    "cos/sin batch 1": lambda c, s: (c[:1], s[:1]),
    "cos/sin seq 1": lambda c, s: (c[:, :1], s[:, :1]),
    "sin batch 1, cos batch 2": lambda c, s: (c, s[:1]),
    "bf16 sin, fp32 cos": lambda c, s: (c, s.bfloat16()),
    "half rotary dim (Qwen3 rotates whole heads)": lambda c, s: (c[..., :16], s[..., :16]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_fused_attention_takes_what_transformers_takes(unpatch_after, count_fused, case):
    """The fused attention runs only on cos/sin the op takes as they are; other shapes and dtypes take the unfused
    steps, whose broadcasting is transformers'."""
    attention, x, cos, sin = qwen3_attention()
    cos, sin = ATTENTION_CASES[case](cos, sin)
    expected = outcome(lambda: attention(x, (cos, sin), None)[0])
    ropekit.apply_to_qwen3()
    got = outcome(lambda: attention(x, (cos, sin), None)[0])
    if isinstance(expected, type) or isinstance(got, type):
        assert expected == got, f"transformers: {expected}, patched: {got}"
        return
    fused = case in ("as the model passes them", "cos/sin batch 1")
    assert len(count_fused) == (1 if fused else 0)
    if fused:  # fp32 fusion: the norm's sum runs in another order (DESIGN 3); within the fp32 model tolerance
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        assert_same(expected, got)


def test_non_strict_export_keeps_the_ops(unpatch_after):
    """torch.export's default (non-strict) runs the patched Python on FakeTensors: they count as plain tensors, so
    the exported graph calls the fused op and apply_rope, and computes what the patched eager model computes."""
    from transformers.models.qwen3 import modeling_qwen3

    attention, x, cos, sin = qwen3_attention()
    ropekit.apply_to_qwen3()

    class Prologue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x, cos, sin):
            q = x.view(2, 7, -1, 16)[:, :, :4].transpose(1, 2)
            rotated = modeling_qwen3.apply_rotary_pos_emb(q, q, cos[..., :16], sin[..., :16])[0]
            return self.attention(x, (cos, sin), None)[0], rotated

    model = Prologue()
    exported = torch.export.export(model, (x, cos, sin), strict=False)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("ropekit.qk_norm_rope" in t for t in targets), sorted(targets)
    assert any("ropekit.apply_rope" in t for t in targets), sorted(targets)
    for got, expected in zip(exported.module()(x, cos, sin), model(x, cos, sin)):
        assert torch.equal(got, expected)
