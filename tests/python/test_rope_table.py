"""rope_cache / rope_cos_sin / mrope_cos_sin: bit-identical to transformers' rotary forward, growth, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import ropekit
from ropekit import ops
from ropekit.modules import RopeTable
from ropekit.transformers._patching import original

from conftest import requires_cuda, tiny_qwen3_config, tiny_qwen3_vl_text_config

pytestmark = pytest.mark.transformers

HALF = 16  # tiny configs: head_dim 32
LONGROPE = {
    "short_factor": [1.0 + 0.05 * i for i in range(HALF)],
    "long_factor": [1.0 + 0.3 * i for i in range(HALF)],
    "original_max_position_embeddings": 64,
    "factor": 2.0,  # 4.57 requires it; 5.x derives it from the two lengths
}
ROPE_TYPES = {
    "default": {},
    "linear": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "dynamic": {"factor": 2.0},  # switches at max_position_embeddings = 128
    "longrope": LONGROPE,  # switches at original_max_position_embeddings = 64
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def qwen3_rotary(config):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return Qwen3RotaryEmbedding(config)


def qwen3_vl_rotary(config):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    return Qwen3VLTextRotaryEmbedding(config)


def reference(module, x, position_ids):
    """The unpatched transformers forward, whether or not ropekit is patched in right now."""
    return original(type(module), "forward")(module, x, position_ids)


def positions(batch, seq, top, device, generator):
    """Random positions in [0, top), always including top - 1 so the largest position is exercised."""
    pos = torch.randint(0, top, (batch, seq), generator=generator)
    pos[:, -1] = top - 1
    return pos.to(device)


def assert_same_cos_sin(ours, ref):
    for a, b, name in zip(ours, ref, ("cos", "sin")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # NaN equals NaN here: a buffer left uninitialised (to_empty on 4.57) can hold NaN or inf, and transformers'
        # cos/sin of those is NaN; everything else must match bit for bit.
        same = (a == b) | (a.isnan() & b.isnan())
        assert bool(same.all()), f"{name}: {(~same).sum().item()} of {a.numel()} elements differ"


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_qwen3_rotary_bit_identical(unpatch_after, device, rope_type, dtype, batch):
    gen = torch.Generator().manual_seed(0)
    ref_module = qwen3_rotary(tiny_qwen3_config(rope_type, **ROPE_TYPES[rope_type])).to(device)
    our_module = copy.deepcopy(ref_module)
    ropekit.apply_to_qwen3()
    # Below and above every switch point (64, 128) and past the first table size (256), then back down.
    for top, seq in ((40, 40), (100, 37), (200, 64), (700, 33), (50, 9)):
        x = torch.randn(batch, seq, 8, dtype=dtype, device=device)
        pos = positions(batch, seq, top, device, gen)
        assert_same_cos_sin(our_module(x, pos), reference(ref_module, x, pos))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["3BS", "1BS", "BS"])
@pytest.mark.parametrize("batch", [1, 2])
def test_qwen3_vl_rotary_bit_identical(unpatch_after, device, dtype, layout, batch):
    gen = torch.Generator().manual_seed(1)
    ref_module = qwen3_vl_rotary(tiny_qwen3_vl_text_config()).to(device)
    our_module = copy.deepcopy(ref_module)
    ropekit.apply_to_qwen3_vl()
    seq = 45
    for top in (60, 500):
        x = torch.randn(batch, seq, 8, dtype=dtype, device=device)
        if layout == "3BS":  # distinct temporal / height / width positions
            pos = torch.stack([positions(batch, seq, top, device, gen) for _ in range(3)])
        elif layout == "1BS":
            pos = positions(batch, seq, top, device, gen)[None]
        else:
            pos = positions(batch, seq, top, device, gen)
        # transformers 5.x takes (3|1, B, S); 4.57 also expands (B, S). Reference on the 3-row form.
        ref_pos = pos if pos.dim() == 3 else pos[None].expand(3, -1, -1)
        assert_same_cos_sin(our_module(x, pos), reference(ref_module, x, ref_pos))


def test_qwen3_5_style_mrope_sections(device):
    """Qwen3.5's [11, 11, 10] sections over 32 frequencies, against the interleaving rule directly."""
    gen = torch.Generator().manual_seed(2)
    inv = 1.0 / (1e7 ** (torch.arange(0, 64, 2).float() / 64))
    cos_t, sin_t = ops.rope_cache(inv.to(device), 300)
    pos = torch.randint(0, 300, (3, 2, 17), generator=gen).to(device)
    cos, sin = ops.mrope_cos_sin(cos_t, sin_t, pos, [11, 11, 10], torch.float32)
    axis = [1 if (j % 3 == 1 and j < 33) else 2 if (j % 3 == 2 and j < 30) else 0 for j in range(32)]
    expect_cos = torch.stack([cos_t[pos[axis[j]], j] for j in range(32)], -1)
    expect_sin = torch.stack([sin_t[pos[axis[j]], j] for j in range(32)], -1)
    assert torch.equal(cos, torch.cat([expect_cos, expect_cos], -1))
    assert torch.equal(sin, torch.cat([expect_sin, expect_sin], -1))


@pytest.mark.parametrize("huge", [33, 2**40, 2**62, 2**63 - 1])
def test_interleaved_sections_past_the_frequencies_cover_them(device, huge):
    """transformers' slice(offset, 3 * section, 3) stops at the last frequency however large the section; the op's
    axis rule must not overflow computing 3 * section (2^62 once wrapped to a negative bound)."""
    inv = 1.0 / (1e7 ** (torch.arange(0, 64, 2).float() / 64))
    cos_t, sin_t = ops.rope_cache(inv.to(device), 300)
    pos = torch.randint(0, 300, (3, 2, 17), generator=torch.Generator().manual_seed(3)).to(device)
    expected = ops.mrope_cos_sin(cos_t, sin_t, pos, [11, 32, 32], torch.float32)
    got = ops.mrope_cos_sin(cos_t, sin_t, pos, [11, huge, huge], torch.float32)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert not torch.equal(got[0], ops.mrope_cos_sin(cos_t, sin_t, pos, [11, 0, 0], torch.float32)[0])


@pytest.mark.parametrize("section", [[2**62, 2**62, 32], [2**63 - 1, 2**63 - 1, 34], [-1, 17, 16], [40, 0, -8]])
def test_sectioned_sections_must_split_the_frequencies(section):
    inv = 1.0 / (1e7 ** (torch.arange(0, 64, 2).float() / 64))
    cos_t, sin_t = ops.rope_cache(inv, 8)
    pos = torch.zeros(3, 1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="mrope_section: "):
        ops.mrope_cos_sin(cos_t, sin_t, pos, section, torch.float32, mrope_interleaved=False)


def test_bf16_model_reads_cast_inv_freq(unpatch_after, device):
    """model.to(bf16) rounds inv_freq; transformers then computes with the rounded values, and so must we."""
    ref_module = qwen3_rotary(tiny_qwen3_config()).to(device).to(torch.bfloat16)
    assert ref_module.inv_freq.dtype == torch.bfloat16
    our_module = copy.deepcopy(ref_module)
    ropekit.apply_to_qwen3()
    x = torch.randn(2, 30, 8, dtype=torch.bfloat16, device=device)
    pos = torch.arange(30, device=device)[None].expand(2, -1) * 7
    assert_same_cos_sin(our_module(x, pos), reference(ref_module, x, pos))


def test_inv_freq_refilled_in_place_is_never_stale(unpatch_after, device):
    """_init_weights refills inv_freq in place (e.g. after meta-device init): the cached table must follow."""
    module = qwen3_rotary(tiny_qwen3_config()).to(device)
    good = module.inv_freq.clone()
    ropekit.apply_to_qwen3()
    x = torch.randn(1, 20, 8, device=device)
    pos = torch.arange(20, device=device)[None]
    with torch.no_grad():
        module.inv_freq.copy_(torch.rand_like(good))  # uninitialised garbage, as to_empty leaves it
    stale = module(x, pos)
    with torch.no_grad():
        module.inv_freq.copy_(good)
    fresh = module(x, pos)
    assert not torch.equal(stale[0], fresh[0])
    assert_same_cos_sin(fresh, reference(module, x, pos))


def test_meta_device_model_materialised(unpatch_after, device):
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config("yarn", **ROPE_TYPES["yarn"])
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model.to_empty(device=device)
    if hasattr(model, "init_weights"):
        model.init_weights()
    rotary = model.model.rotary_emb
    ropekit.apply_to_qwen3()
    x = torch.randn(2, 25, 8, device=device)
    pos = torch.arange(25, device=device)[None].expand(2, -1) + 3
    assert_same_cos_sin(rotary(x, pos), reference(rotary, x, pos))
    fresh = qwen3_rotary(config).to(device)
    if uses_rope_parameters_refill(model):
        assert torch.equal(rotary.inv_freq, fresh.inv_freq)
        assert_same_cos_sin(rotary(x, pos), reference(fresh, x, pos))


def test_non_finite_inv_freq_matches_transformers(unpatch_after):
    """Memory left by to_empty can hold anything; the table must give transformers' values for any inv_freq."""
    ropekit.apply_to_qwen3()
    module = qwen3_rotary(tiny_qwen3_config())
    odd = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38, 9.5e-40, 0.0, -0.0, 3e30,
                        1e-45, 5.0, -7.0, 1e20, 2.0, 1e10, 1e4, 1.0])
    with torch.no_grad():
        module.inv_freq.copy_(odd.repeat(module.inv_freq.numel() // odd.numel() + 1)[: module.inv_freq.numel()])
    x = torch.randn(2, 25, 8)
    pos = torch.arange(25)[None].expand(2, -1) + 3
    ours = module(x, pos)
    assert ours[0].isnan().any()
    assert_same_cos_sin(ours, reference(module, x, pos))


def uses_rope_parameters_refill(model) -> bool:
    # transformers 5.x's _init_weights refills rotary buffers; 4.57 leaves them as to_empty left them.
    return hasattr(model.config, "rope_parameters")


# ------------------------------------------------------------------------------------------------------------
# The ops on their own


def default_inv_freq(half=HALF, base=1e6):
    return 1.0 / (base ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))


def test_table_positions_past_end_are_exact(device):
    """A gather past the table's end (with inv_freq) equals a gather from a table that was big enough."""
    inv = default_inv_freq().to(device)
    small = ops.rope_cache(inv, 64, 0.75)
    big = ops.rope_cache(inv, 5000, 0.75)
    pos = torch.tensor([[0, 63, 64, 65, 4999, 1000]], device=device)
    for dtype in DTYPES:
        ours = ops.rope_cos_sin(*small, pos, dtype, inv, 0.75)
        assert_same_cos_sin(ours, ops.rope_cos_sin(*big, pos, dtype))


def test_negative_positions_match_transformers(unpatch_after, device):
    """transformers 5.x adds negative mRoPE deltas to cumsum positions whose padding slots are 0, so padding can
    carry negative positions; transformers computes cos/sin for them, and so must the patched rotary."""
    gen = torch.Generator().manual_seed(3)
    ref_module = qwen3_vl_rotary(tiny_qwen3_vl_text_config()).to(device)
    our_module = copy.deepcopy(ref_module)
    ref_text = qwen3_rotary(tiny_qwen3_config("yarn", **ROPE_TYPES["yarn"])).to(device)
    our_text = copy.deepcopy(ref_text)
    ropekit.apply_to_qwen3_vl()
    ropekit.apply_to_qwen3()
    pos = torch.randint(-300, 300, (3, 2, 40), generator=gen).to(device)
    x = torch.randn(2, 40, 8, dtype=torch.bfloat16, device=device)
    assert_same_cos_sin(our_module(x, pos), reference(ref_module, x, pos))
    assert_same_cos_sin(our_text(x, pos[0]), reference(ref_text, x, pos[0]))
    inv = default_inv_freq().to(device)
    tables = ops.rope_cache(inv, 64)
    assert_same_cos_sin(ops.rope_cos_sin(*tables, pos[0], torch.float32, inv), reference_rows(inv, pos[0]))


def reference_rows(inv, pos):
    """cos/sin exactly as transformers computes them (matmul of inv_freq and float positions)."""
    freqs = (inv[None, :, None].expand(pos.shape[0], -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


def test_inference_mode_module(unpatch_after):
    """A model built under torch.inference_mode has inference-tensor buffers (no version counter)."""
    ropekit.apply_to_qwen3()
    with torch.inference_mode():
        module = qwen3_rotary(tiny_qwen3_config())
        x = torch.randn(1, 10, 8)
        pos = torch.arange(10)[None]
        assert_same_cos_sin(module(x, pos), reference(module, x, pos))


def test_table_grows_on_cpu():
    table = RopeTable(initial_rows=16)
    inv = default_inv_freq()
    pos = torch.tensor([[3, 700]])
    cos, sin = table.cos_sin(inv, 1.0, pos, torch.float32)
    assert table.rows >= 701
    assert_same_cos_sin((cos, sin), ops.rope_cos_sin(*ops.rope_cache(inv, 701), pos, torch.float32))


def test_position_dtypes_and_strides(device):
    inv = default_inv_freq().to(device)
    tab = ops.rope_cache(inv, 100)
    pos64 = torch.arange(40, device=device).view(2, 20)
    base = ops.rope_cos_sin(*tab, pos64, torch.float32)
    assert_same_cos_sin(ops.rope_cos_sin(*tab, pos64.int(), torch.float32), base)
    wide = torch.arange(80, device=device).view(2, 40)[:, ::2]  # strided view
    assert_same_cos_sin(ops.rope_cos_sin(*tab, wide, torch.float32), ops.rope_cos_sin(*tab, wide.contiguous(), torch.float32))
    expanded = pos64[:1].expand(3, -1)[None].expand(3, -1, -1)  # stride-0 axes and batch
    assert_same_cos_sin(
        ops.mrope_cos_sin(*tab, expanded, [6, 5, 5], torch.float32),
        ops.rope_cos_sin(*tab, expanded[0].contiguous(), torch.float32),
    )


def test_empty_positions(device):
    tab = ops.rope_cache(default_inv_freq().to(device), 10)
    cos, sin = ops.rope_cos_sin(*tab, torch.zeros(0, 5, dtype=torch.long, device=device), torch.bfloat16)
    assert cos.shape == (0, 5, 32) and sin.dtype == torch.bfloat16
    cos, _ = ops.mrope_cos_sin(*tab, torch.zeros(3, 2, 0, dtype=torch.long, device=device), [6, 5, 5], torch.float32)
    assert cos.shape == (2, 0, 32)
    empty_cos, _ = ops.rope_cache(default_inv_freq(), 0)
    assert empty_cos.shape == (0, HALF)


def test_cos_sin_bad_input():
    inv = default_inv_freq()
    cos_t, sin_t = ops.rope_cache(inv, 32)
    pos = torch.arange(8)[None]
    cases = [
        (lambda: ops.rope_cos_sin(cos_t.half(), sin_t, pos, torch.float32), "cos_cache: expected float32"),
        (lambda: ops.rope_cos_sin(cos_t, sin_t[:, :4], pos, torch.float32), "sin_cache: expected the shape"),
        (lambda: ops.rope_cos_sin(cos_t[0], sin_t[0], pos, torch.float32), "cos_cache: expected a 2-D"),
        (lambda: ops.rope_cos_sin(cos_t, sin_t, pos.float(), torch.float32), "position_ids: expected int64 or int32"),
        (lambda: ops.rope_cos_sin(cos_t, sin_t, pos[0], torch.float32), "position_ids: expected a 2-D"),
        (lambda: ops.rope_cos_sin(cos_t, sin_t, pos, torch.int32), "dtype: expected float32"),
        (lambda: ops.rope_cos_sin(cos_t, sin_t, pos - 3, torch.float32), "position -3 is outside the cos/sin table"),
        (lambda: ops.rope_cos_sin(cos_t, sin_t, pos + 30, torch.float32), "position 37 is outside the cos/sin table"),
        (lambda: ops.rope_cos_sin(cos_t, sin_t, pos, torch.float32, inv[:3]), "inv_freq: expected shape"),
        (lambda: ops.mrope_cos_sin(cos_t, sin_t, pos, [6, 5], torch.float32), "mrope_section: expected 3 entries"),
        (lambda: ops.mrope_cos_sin(cos_t, sin_t, pos[None].expand(2, -1, -1), [6, 5, 5], torch.float32), "(3, batch, seq)"),
        (lambda: ops.rope_cache(inv[None], 8), "inv_freq: expected a 1-D"),
        (lambda: ops.rope_cache(inv, -1), "max_position: expected >= 0"),
        (lambda: ops.rope_cache(torch.arange(4), 8), "inv_freq: expected a floating dtype"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_table_ops_refuse_grad():
    inv = default_inv_freq().requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.rope_cache(inv, 8)
    with torch.no_grad():
        cos_t, sin_t = ops.rope_cache(inv, 8)
    assert not cos_t.requires_grad
    with pytest.raises(RuntimeError, match="cos_cache requires grad"):
        ops.rope_cos_sin(cos_t.requires_grad_(), sin_t, torch.zeros(1, 2, dtype=torch.long), torch.float32)


@requires_cuda
def test_cuda_mismatched_devices():
    cos_t, sin_t = ops.rope_cache(default_inv_freq().cuda(), 8)
    with pytest.raises(RuntimeError, match="position_ids: expected device"):
        ops.rope_cos_sin(cos_t, sin_t, torch.zeros(1, 2, dtype=torch.long), torch.float32)
    with pytest.raises(RuntimeError, match="sin_cache: expected device"):
        ops.rope_cos_sin(cos_t, sin_t.cpu(), torch.zeros(1, 2, dtype=torch.long, device="cuda"), torch.float32)


# ------------------------------------------------------------------------------------------------------------
# Sectioned mRoPE (Qwen2-VL, Qwen2.5-VL, GLM-4V) and the GPT-J duplicated layout (GLM-4V), against transformers'
# own formulas written with torch ops on the same device: bit-identical.


def transformers_mrope(inv, pos3, section, interleaved, is_neox, scaling=1.0):
    """(3, B, S) positions -> cos/sin (B, S, 2*half) exactly as the transformers rotary forwards compute them:
    Qwen3-VL (interleaved), Qwen2-VL / Qwen2.5-VL (sectioned, cat((f, f)) then split by mrope_section * 2) and
    GLM-4V (sectioned recomposition of freqs, then repeat_interleave(2))."""
    inv_e = inv[None, None, :, None].float().expand(3, pos3.shape[1], -1, 1)
    freqs = (inv_e @ pos3[:, :, None, :].float()).transpose(2, 3)  # (3, B, S, half), one rounded product each
    if interleaved:  # Qwen3-VL's apply_interleaved_mrope on freqs, then cat((f, f))
        f = freqs[0].clone()
        for axis, length in ((1, section[1]), (2, section[2])):
            idx = slice(axis, length * 3, 3)
            f[..., idx] = freqs[axis, ..., idx]
        emb = torch.cat((f, f), -1) if is_neox else f.repeat_interleave(2, -1)
        return emb.cos() * scaling, emb.sin() * scaling
    if is_neox:  # Qwen2-VL: cos of the duplicated emb, then the sections of mrope_section * 2
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        pick = lambda t: torch.cat([m[i % 3] for i, m in enumerate(t.split(list(section) * 2, -1))], -1)  # noqa: E731
        return pick(cos), pick(sin)
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling  # GLM-4V: recomposition_frequencies
    pick = lambda t: torch.cat([m[i % 3] for i, m in enumerate(t.split(list(section), -1))], -1)  # noqa: E731
    return pick(cos).repeat_interleave(2, -1), pick(sin).repeat_interleave(2, -1)


LAYOUTS = [  # mrope_section (half = 16), interleaved, is_neox
    ((6, 5, 5), True, True),  # Qwen3-VL
    ((4, 6, 6), False, True),  # Qwen2-VL / Qwen2.5-VL (default [16, 24, 24] of 64, scaled down)
    ((8, 4, 4), False, False),  # GLM-4V ([8, 12, 12] of 32, scaled down)
    ((6, 5, 5), True, False),
]


@pytest.mark.parametrize("section,interleaved,is_neox", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_layouts_bit_identical_to_transformers(device, section, interleaved, is_neox, dtype):
    gen = torch.Generator().manual_seed(4)
    inv = default_inv_freq(base=5e6).to(device)
    tables = ops.rope_cache(inv, 300, 0.5)
    pos = torch.randint(0, 300, (3, 2, 33), generator=gen).to(device)
    pos[:, :, :5] = pos[0, :, :5]  # text tokens: every axis equal
    expect = [t.to(dtype) for t in transformers_mrope(inv, pos, section, interleaved, is_neox, 0.5)]
    ours = ops.mrope_cos_sin(*tables, pos, list(section), dtype, mrope_interleaved=interleaved, is_neox=is_neox)
    assert_same_cos_sin(ours, expect)
    # positions outside the table (and negative), computed from inv_freq: still transformers' values
    far = pos.clone()
    far[:, 0, 7:12] = torch.tensor([300, 4000, -5, 123456, 77], device=device)[:, None].T
    far[1, 1, 3], far[2, 1, 4] = 5000, -2  # a vision token with one axis outside the table
    expect = [t.to(dtype) for t in transformers_mrope(inv, far, section, interleaved, is_neox, 0.5)]
    ours = ops.mrope_cos_sin(*tables, far, list(section), dtype, inv, 0.5, mrope_interleaved=interleaved,
                             is_neox=is_neox)
    assert_same_cos_sin(ours, expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gptj_rope_cos_sin_is_repeat_interleave(device, dtype):
    """GLM-4V's text rotary layout: each frequency twice in a row (repeat_interleave(2)), bit-identical."""
    gen = torch.Generator().manual_seed(5)
    inv = default_inv_freq().to(device)
    tables = ops.rope_cache(inv, 128)
    pos = torch.randint(0, 128, (3, 19), generator=gen).to(device)
    pos[0, -3:] = torch.tensor([128, 1000, -7], device=device)
    freqs = (inv[None, :, None].expand(3, -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
    emb = freqs.repeat_interleave(2, -1)
    ours = ops.rope_cos_sin(*tables, pos, dtype, inv, is_neox=False)
    assert_same_cos_sin(ours, (emb.cos().to(dtype), emb.sin().to(dtype)))
    neox = ops.rope_cos_sin(*tables, pos, dtype, inv)
    assert torch.equal(ours[0][..., 0::2], neox[0][..., :HALF]) and torch.equal(ours[0][..., 1::2], neox[0][..., HALF:])


@pytest.mark.parametrize("is_neox", [True, False])
def test_stale_columns_computed_in_either_layout(device, is_neox):
    """A frequency changed since the table was built (table_inv_freq) is computed from inv_freq, in its own
    columns of whichever layout."""
    inv = default_inv_freq().to(device)
    tables = ops.rope_cache(inv, 64)
    now = inv.clone()
    now[3] *= 1.5
    now[HALF - 1] = 0.25
    pos = torch.randint(0, 64, (3, 2, 9), generator=torch.Generator().manual_seed(6)).to(device)
    ours = ops.mrope_cos_sin(*tables, pos, [8, 4, 4], torch.float32, now, 1.0, inv, mrope_interleaved=False,
                             is_neox=is_neox)
    assert_same_cos_sin(ours, transformers_mrope(now, pos, (8, 4, 4), False, is_neox))


def test_sectioned_mrope_section_must_cover_the_frequencies():
    cos_t, sin_t = ops.rope_cache(default_inv_freq(), 32)
    pos = torch.zeros(3, 1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"mrope_section: sectioned mRoPE .* must sum to 16, got \[6, 5, 4\]"):
        ops.mrope_cos_sin(cos_t, sin_t, pos, [6, 5, 4], torch.float32, mrope_interleaved=False)
    ops.mrope_cos_sin(cos_t, sin_t, pos, [6, 5, 4], torch.float32)  # interleaved: any sections (transformers')
