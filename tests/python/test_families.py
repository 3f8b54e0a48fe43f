"""Model level, for the mRoPE families beyond Qwen3-VL / Qwen3.5: Qwen2-VL, Qwen2.5-VL, Qwen4-Exp (5.x), GLM-4V,
GLM-4V-MoE and GLM-4.6V (5.x), and the 5.x model types (PaddleOCR-VL, GLM-OCR, Cosmos3, Cohere Compass, ERNIE-4.5-VL,
HunYuan-VL, HY-V4-VL: only its rotary and index are ropekit's, its MLA rotation stays transformers'). Tiny models
built from their config classes with random weights (norm weights included), shared across tests
(family_models.shared_model); every test runs under whichever transformers line is installed (CI: 5.18.0, 5.25.0 and
4.57.6) and checks against the unpatched model:

- the patched rotary forward returns exactly (``torch.equal``, same shape and dtype) what the family's own rotary
  forward returns: 5.x's recomposed (B, S, D) cos/sin, 4.57's per-axis (3, B, S, D) ones; fp32, bf16, fp16;
- ``apply_rotary_pos_emb`` / 4.57's ``apply_multimodal_rotary_pos_emb``: bit-identical in fp32, forward and backward;
  Qwen4-Exp's ``k=None`` form (its sparse-attention indexer) included;
- fp32 logits within 1e-5 (images, multi-frame videos, text only; left padding), the same rope deltas;
- one training step's loss and every parameter gradient, gradient checkpointing on and off;
- greedy generate: the same tokens and rope deltas (Qwen2.5-VL with second_per_grid_ts not 1);
- packed batches: several samples per row with ropekit.data's packed positions and a mask that keeps them apart give
  each sample's own logits;
- every test asserts the patch ran: the table was built, the ops were called as often as the layers ask.

GLM-4V takes images or videos in one batch, not both: its placeholder mask counts every image token as an image and
as a video token (video frames carry image_token_id), so transformers itself rejects a batch with both. Its tests
use an images batch and a videos batch.

With ``ROPEKIT_FAMILY_DIFFS=<file>`` the measured maximum differences are appended to that file as a table.
"""

from __future__ import annotations

import copy
import functools
import os
import re

import pytest
import torch

import ropekit
from conftest import requires_cuda
from family_models import (FAMILIES, PAD, assert_inputs_unchanged, clone_inputs, family_params, has_module,
                           language_model, multimodal_inputs, reset, shared_model)
from ropekit.transformers._patching import original

pytestmark = pytest.mark.transformers

ALL = family_params()
DIFFS: list[tuple[str, str, float]] = []

IMAGE_ROWS = [[("text", 3), ("image", 4, 6), ("text", 2), ("image", 4, 4), ("text", 2)],
              [("text", 2), ("image", 4, 4), ("text", 3)]]
VIDEO_ROWS = [[("text", 3), ("video", 2, 4, 4), ("text", 2), ("video", 3, 4, 6), ("text", 2)],
              [("text", 2), ("video", 2, 4, 4), ("text", 3)]]


@pytest.fixture(scope="module", autouse=True)
def diff_table():
    yield
    path = os.environ.get("ROPEKIT_FAMILY_DIFFS")
    if not path or not DIFFS:
        return
    import transformers

    lines = [f"\ntorch {torch.__version__}, transformers {transformers.__version__}: max |patched - unpatched|\n",
             "| family | what | max abs difference |", "|---|---|---|"]
    lines += [f"| {family} | {what} | {diff:.3g} |" for family, what, diff in DIFFS]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def record(family, what, ours, ref):
    diff = (ours.double() - ref.double()).nan_to_num().abs().max().item() if ours.numel() else 0.0
    DIFFS.append((family.id, what, diff))
    return diff


def batches(family, config, seed=0):
    """name -> inputs: images and multi-frame videos with a left-padded row (GLM-4V: one batch of each)."""
    if family.layout == "glm":
        return {"images": multimodal_inputs(family, config, seed, rows=IMAGE_ROWS),
                "videos": multimodal_inputs(family, config, seed + 1, rows=VIDEO_ROWS)}
    return {"images+videos": multimodal_inputs(family, config, seed)}


def text_inputs(seed=0, lengths=(19, 12, 7)):
    """A ragged text batch, left-padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(2, 240, (n,), generator=gen)
        mask[row, -n:] = 1
    return dict(input_ids=ids, attention_mask=mask)


def rotary_module(family):
    config = family.config()
    return getattr(family.modeling(), family.rotary)(config.text_config)


def rotary_calls(family):
    """The ways the text model calls its rotary: ``module(x, pos)``, or once per layer type (Cohere Compass)."""
    return [(layer_type,) for layer_type in family.layer_types] or [()]


def served_from_table(module) -> bool:
    """The patched rotary forward built its table (one per layer type for a rotary per layer type) and read it."""
    tables = [vars(module).get("_ropekit_table")] + list(vars(module).get("_ropekit_tables", {}).values())
    return any(table is not None and table.rows > 0 for table in tables)


def spy_get_rope_index(model):
    """Counts this instance's get_rope_index calls, whichever implementation its class has."""
    calls = []
    inner = model.model

    def spy(*args, **kwargs):
        calls.append(1)
        return type(inner).get_rope_index(inner, *args, **kwargs)

    inner.get_rope_index = spy
    return calls


def unspy(model):
    vars(model.model).pop("get_rope_index", None)


def attention_layers(model):
    return sum(hasattr(layer, "self_attn") for layer in language_model(model).layers)


def assert_patch_ran(family, model, counts, forwards, rope_index_calls=None, get_rope_index_calls=None):
    """The table was built; every attention layer of every forward rotated through ropekit (the fused q/k norm +
    RoPE where the family has q/k norms, apply_rope otherwise); every get_rope_index call went to rope_index."""
    fused, applied = counts
    assert served_from_table(language_model(model).rotary_emb), "the patched rotary forward did not serve from its table"
    layers = attention_layers(model)
    if family.fused:
        assert len(fused) == forwards * layers, "a forward skipped the fused q/k norm + RoPE"
        # Qwen4-Exp's indexer rotates its queries through apply_rotary_pos_emb(q, k=None); nothing else rotates
        indexer = forwards * layers if family.id == "qwen4_exp" else 0
        assert len(applied) == indexer, "the indexer's k=None rotation bypassed ropekit.apply_rope"
    elif family.rotation:
        assert not fused and len(applied) == forwards * layers, "a layer bypassed ropekit.apply_rope"
    else:  # HY-V4-VL: its MLA rotation stays transformers' (only the rotary is served)
        assert not fused and not applied
    if get_rope_index_calls is not None:
        assert get_rope_index_calls, "get_rope_index was not called"
        assert len(rope_index_calls) == len(get_rope_index_calls), "a get_rope_index call bypassed ropekit"


# ------------------------------------------------------------------------------------------------------------------
# The rotary forward and apply_rotary_pos_emb, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", ALL)
def test_rotary_forward_bit_identical(unpatch_after, device, family, dtype):
    """Positions (3, B, S) and (1, B, S), past the table's first rows and negative (5.x's padding slots after
    negative deltas): the patched forward returns transformers' own tensors, shape, dtype and bits; also with an
    inv_freq cast to bf16 by model.to(). On CUDA too where there is one (the gather kernel vs torch's cosf)."""
    module = rotary_module(family).to(device)
    family.apply()
    rotary_cls = type(module)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, dtype=dtype, device=device)
    positions = [torch.randint(-5, 700, (family.axes, 2, 40), generator=gen).to(device),
                 torch.randint(0, 300, (1, 2, 40), generator=gen).to(device)]
    for inv_freq_dtype in (torch.float32, torch.bfloat16):
        if inv_freq_dtype != torch.float32:
            module = copy.deepcopy(module).to(inv_freq_dtype)
        for pos in positions:
            for layer_type in rotary_calls(family):
                ours = module(x, pos, *layer_type)
                ref = original(rotary_cls, "forward")(module, x, pos, *layer_type)
                for a, b in zip(ours, ref):
                    assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
                    assert torch.equal(a, b)
    # (4, B, S) positions (what 5.18's Cosmos3-Edge text model passes when packing): transformers' code, its error
    four_rows = torch.randint(0, 300, (4, 2, 40), generator=gen).to(device)
    for layer_type in rotary_calls(family):
        outcomes = []
        for forward in (module.forward, functools.partial(original(rotary_cls, "forward"), module)):
            try:
                outcomes.append(forward(x, four_rows, *layer_type))
            except Exception as error:  # noqa: BLE001 - transformers' exception is the expected outcome
                outcomes.append(error)
        if isinstance(outcomes[1], Exception):
            assert type(outcomes[0]) is type(outcomes[1]) and str(outcomes[0]) == str(outcomes[1])
        else:
            assert all(torch.equal(a, b) for a, b in zip(*outcomes))
    per_axis = has_module(family.module) and hasattr(family.modeling(), "apply_multimodal_rotary_pos_emb")
    assert ours[0].dim() == (4 if per_axis else 3), "4.57's per-axis layout is (3, B, S, D)"
    assert served_from_table(module)
    if family.layer_types:  # one table per layer type, each built from its own inv_freq
        assert set(vars(module)["_ropekit_tables"]) == set(family.layer_types)


@pytest.mark.parametrize("family", family_params(ids={"cohere_compass", "ernie4_5_vl_moe", "hunyuan_vl", "hy_v4_vl"}))
def test_recomposing_rotary_runs_transformers_under_another_recomposition(unpatch_after, family):
    """A rotary whose recomposition_frequencies lays its axes out (Cohere Compass per layer type, ERNIE-4.5-VL) is
    served with the checked class's method; an instance or subclass with another one gets transformers' forward
    (which calls the override), and no table."""
    module = rotary_module(family)
    family.apply()
    pos = torch.randint(0, 90, (family.axes, 2, 11), generator=torch.Generator().manual_seed(8))
    module.recomposition_frequencies = lambda freq, *layer_type: torch.cat((freq[1], freq[1]), dim=-1)
    for layer_type in rotary_calls(family):
        ours = module(torch.zeros(1), pos, *layer_type)
        ref = original(type(module), "forward")(module, torch.zeros(1), pos, *layer_type)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert not served_from_table(module)


# ERNIE-4.5-VL's rotary raises ValueError for any rope type but "default" (transformers' own check): nothing to compare
@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
@pytest.mark.parametrize("family", family_params(needs=lambda family: family.id != "ernie4_5_vl_moe"))
def test_rotary_forward_other_rope_types(unpatch_after, family, rope_type):
    """yarn (static, attention_scaling != 1): served from the table, bit-identical. dynamic NTK (inv_freq depends on
    the largest position): transformers' own forward runs, on both sides of the switch, and no table is built."""
    from conftest import uses_rope_parameters

    text_config = family.config().text_config
    params = {"factor": 4.0, "original_max_position_embeddings": 64} if rope_type == "yarn" else {"factor": 2.0}
    if family.layer_types:  # one set of rope parameters per layer type
        text_config.rope_parameters = {layer_type: dict(text_config.rope_parameters[layer_type], rope_type=rope_type,
                                                        **params) for layer_type in family.layer_types}
    elif uses_rope_parameters():
        text_config.rope_parameters = dict(text_config.rope_parameters, rope_type=rope_type, **params)
    else:
        text_config.rope_scaling = dict(text_config.rope_scaling, rope_type=rope_type, **params)
    module = getattr(family.modeling(), family.rotary)(text_config)
    reference = copy.deepcopy(module)
    family.apply()
    x = torch.zeros(1)
    for top in (100, 600):  # below and past max_position_embeddings (256): dynamic NTK switches
        pos = torch.randint(0, top, (family.axes, 2, 30), generator=torch.Generator().manual_seed(top))
        for layer_type in rotary_calls(family):
            ours, ref = module(x, pos, *layer_type), original(type(module), "forward")(reference, x, pos, *layer_type)
            assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(ours, ref)), top
    if rope_type == "yarn":
        scaling = [getattr(module, f"{t}_attention_scaling") for t in family.layer_types] or [module.attention_scaling]
        assert all(s != 1.0 for s in scaling) and served_from_table(module)
    else:
        assert "_ropekit_table" not in vars(module) and not vars(module).get("_ropekit_tables")


def _apply_fn(family):
    """(patched function, original, extra args) of the family's text rotation in the installed line."""
    module = family.modeling()
    if hasattr(module, "apply_multimodal_rotary_pos_emb"):  # 4.57
        section = family.config().text_config.rope_scaling["mrope_section"]
        return module.apply_multimodal_rotary_pos_emb, original(module, "apply_multimodal_rotary_pos_emb"), (section,)
    return module.apply_rotary_pos_emb, original(module, "apply_rotary_pos_emb"), ()


@pytest.mark.parametrize("family", family_params(needs=lambda family: family.rotation))
def test_apply_rotary_pos_emb_bit_identical(unpatch_after, count_apply_rope, device, family):
    """fp32 q/k as the attention passes them (transposed (B, H, S, D) views, GQA), cos/sin from the rotary forward:
    outputs and the gradients of q and k equal transformers' bit for bit (GLM-4V: GPT-J pairs with partial rotary;
    GLM-4V-MoE and Qwen4-Exp: partial rotary; 4.57: the sections picked from per-axis cos/sin)."""
    config = family.config().text_config
    module = rotary_module(family).to(device)
    family.apply()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(2)
    pos = torch.randint(0, 90, (family.axes, 2, 17), generator=gen).to(device)
    cos, sin = module(torch.zeros(1, device=device), pos, *rotary_calls(family)[0])
    patched, unpatched, extra = _apply_fn(family)
    assert patched is not unpatched

    def run(fn):
        q = torch.randn(2, 17, 4, head_dim, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_()
        k = torch.randn(2, 17, 2, head_dim, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
        out_q, out_k = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin, *extra)
        (out_q * torch.linspace(-1, 1, out_q.numel(), device=device).view_as(out_q)).sum().backward(retain_graph=True)
        (out_k * torch.linspace(1, -2, out_k.numel(), device=device).view_as(out_k)).sum().backward()
        return out_q.detach(), out_k.detach(), q.grad, k.grad

    for ours, ref, name in zip(run(patched), run(unpatched), ("q", "k", "dq", "dk")):
        assert ours.shape == ref.shape and torch.equal(ours, ref), name
    assert len(count_apply_rope) == 1


@pytest.mark.parametrize("cos_dtype", ["float32", "q"], ids=["fp32_cos", "q_dtype_cos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", family_params(ids={"ernie4_5_vl_moe", "hunyuan_vl"}))
def test_float32_rotation_cast_back(unpatch_after, count_apply_rope, family, dtype, cos_dtype):
    """Rotations computed in float32 and cast back to q's dtype. ERNIE-4.5-VL: ``q.float() * cos +
    rotate_half(q).float() * sin`` (GPT-J pairs); HunYuan-VL: ``q.float()`` first, then ``q * cos + rotate_half(q) *
    sin``. Outputs equal transformers' bit for bit for every q dtype, with the rotary's cos/sin in float32 and in q's
    dtype (which the float32 products widen); so do all gradients for float32 q, and HunYuan-VL's in every dtype
    (its q gradient is summed in float32 and rounded once, as the op does). For ERNIE-4.5-VL's bf16 / fp16 q,
    autograd rounds the q gradient of each product to q's dtype and sums the two in q's dtype; ops.apply_rope sums in
    float32 and rounds once. There the rule of DESIGN §3 for apply_rope holds: each gradient's relative error against
    a float64 reference is at most transformers' own."""
    config = family.config().text_config
    module = rotary_module(family)
    family.apply()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pos = torch.randint(0, 90, (family.axes, 2, 17), generator=torch.Generator().manual_seed(2))
    cos, sin = module(torch.zeros(1), pos)
    assert cos.dtype == torch.float32  # a float32 x: both rotaries give float32 cos/sin
    if cos_dtype == "q":
        cos, sin = cos.to(dtype), sin.to(dtype)
    patched, unpatched, _ = _apply_fn(family)
    q0 = torch.randn(2, 17, 4, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    k0 = torch.randn(2, 17, 2, head_dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    gptj = family.id == "ernie4_5_vl_moe"

    def rotate(x):
        if gptj:
            return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    def float64_rotation(q, k, c, s_):  # the same function without its float32 / q-dtype roundings
        c, s_ = c.unsqueeze(1), s_.unsqueeze(1)
        return q * c + rotate(q) * s_, k * c + rotate(k) * s_

    def run(fn, wide=False):
        convert = (lambda t: t.detach().double()) if wide else (lambda t: t.detach().clone())
        q, k, c, s_ = (convert(t).requires_grad_() for t in (q0, k0, cos, sin))
        out_q, out_k = fn(q.transpose(1, 2), k.transpose(1, 2), c, s_)
        loss = (out_q.double() * torch.linspace(-1, 1, out_q.numel(), dtype=torch.float64).view_as(out_q)).sum() + \
            (out_k.double() * torch.linspace(1, -2, out_k.numel(), dtype=torch.float64).view_as(out_k)).sum()
        loss.backward()
        return out_q.detach(), out_k.detach(), q.grad, k.grad, c.grad, s_.grad

    ours, theirs, exact = run(patched), run(unpatched), run(float64_rotation, wide=True)
    for name, o, t, e in zip(("q", "k", "dq", "dk", "dcos", "dsin"), ours, theirs, exact):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        if dtype == torch.float32 or name in ("q", "k") or not gptj:
            assert torch.equal(o, t), name
        else:
            rel = lambda x: ((x.double() - e).norm() / e.norm()).item()  # noqa: E731
            assert rel(o) <= rel(t), (name, rel(o), rel(t))
    assert len(count_apply_rope) == 1
    # float64 q: transformers narrows it to float32 inside; its own code runs
    q64 = torch.randn(2, 4, 17, head_dim, dtype=torch.float64)
    ours, ref = patched(q64, q64, cos, sin), unpatched(q64, q64, cos, sin)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ours, ref))
    assert len(count_apply_rope) == 1


@pytest.mark.parametrize("family", family_params(ids={"qwen4_exp"}))
def test_qwen4_exp_rotation_of_queries_alone(unpatch_after, count_apply_rope, family):
    """Qwen4-Exp's indexer calls apply_rotary_pos_emb(q, cos=..., sin=..., unsqueeze_dim=2) with no k on (B, S, H,
    D) queries, and on pooled block keys as 3-D (n, 1, D) with 2-D cos/sin: both keep working, return a single
    tensor, and equal transformers (the 3-D call runs transformers' code, outside the op's shapes)."""
    module = family.modeling()
    rotary = rotary_module(family)
    ropekit.apply_to_qwen4_exp()
    cos, sin = rotary(torch.zeros(1), torch.randint(0, 60, (3, 2, 9), generator=torch.Generator().manual_seed(5)))
    unpatched = original(module, "apply_rotary_pos_emb")

    def run(fn):
        q = torch.randn(2, 9, 2, 32, generator=torch.Generator().manual_seed(6)).requires_grad_()
        out = fn(q, cos=cos, sin=sin, unsqueeze_dim=2)
        assert isinstance(out, torch.Tensor)
        out.pow(2).sum().backward()
        return out.detach(), q.grad

    for ours, ref in zip(run(module.apply_rotary_pos_emb), run(unpatched)):
        assert torch.equal(ours, ref)
    assert len(count_apply_rope) == 1
    keys = torch.randn(4, 32, generator=torch.Generator().manual_seed(7)).unsqueeze(1)
    block_cos, block_sin = cos[0, :4], sin[0, :4]
    assert torch.equal(module.apply_rotary_pos_emb(keys, cos=block_cos, sin=block_sin),
                       unpatched(keys, cos=block_cos, sin=block_sin))
    q, k = (torch.randn(2, 4, 9, 64, generator=torch.Generator().manual_seed(s)) for s in (8, 9))
    ours, ref = module.apply_rotary_pos_emb(q, k, cos, sin), unpatched(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


# ------------------------------------------------------------------------------------------------------------------
# Model level


@pytest.mark.parametrize("family", ALL)
def test_logits_match(unpatch_after, count_fused, count_apply_rope, count_rope_index, family):
    """fp32 logits within 1e-5 of the unpatched model's (NaN where transformers gives NaN: Qwen4-Exp's padding
    slots), for images + multi-frame videos with a left-padded row and for a left-padded text batch; the same rope
    deltas; the caller's tensors untouched."""
    model = shared_model(family)
    cases = dict(batches(family, model.config), text=text_inputs())
    refs = {}
    with torch.no_grad():
        for name, inputs in cases.items():
            reset(model)
            refs[name] = model(**inputs).logits, model.model.rope_deltas
        ropekit.apply_to_model(model)
        calls = spy_get_rope_index(model)
        forwards = 0
        for name, inputs in cases.items():
            before = clone_inputs(inputs)
            reset(model)
            ours = model(**inputs).logits
            forwards += 1
            ref, ref_deltas = refs[name]
            assert torch.equal(ours.isnan(), ref.isnan())
            assert record(family, f"fp32 logits ({name})", ours, ref) <= 1e-5, name
            if ref_deltas is not None:
                assert torch.equal(model.model.rope_deltas, ref_deltas), name
            assert_inputs_unchanged(inputs, before)
    unspy(model)
    assert_patch_ran(family, model, (count_fused, count_apply_rope), forwards, count_rope_index, calls)


@pytest.mark.parametrize("seconds", ["fp64", "absent", "fractional"])
@pytest.mark.parametrize("family", family_params(ids={"qwen2_5_vl"}))
def test_qwen2_5_vl_second_per_grid_ts(unpatch_after, count_rope_index, family, seconds):
    """Qwen2.5-VL's temporal scaling at model level, beyond the fp32 (1.5, 0.5) of the other tests: fp64 timestamps
    (transformers' arithmetic in fp64), none (the factor is tokens_per_second alone), and fractional ones (1/3, 2.7:
    4.57 truncates each to an integer first, 5.x scales in floating point). The same logits (bit for bit here: no
    fused norm) and rope deltas; images are never scaled."""
    model = shared_model(family)
    inputs = batches(family, model.config, seed=6)["images+videos"]
    if seconds == "absent":
        del inputs["second_per_grid_ts"]
    else:
        values, dtype = ((2.5, 1 / 3), torch.float64) if seconds == "fp64" else ((1 / 3, 2.7), torch.float32)
        inputs["second_per_grid_ts"] = torch.tensor(values, dtype=dtype)
    with torch.no_grad():
        reset(model)
        ref, ref_deltas = model(**inputs).logits, model.model.rope_deltas
        ropekit.apply_to_model(model)
        reset(model)
        ours = model(**inputs).logits
    assert count_rope_index
    assert torch.equal(ours, ref) and torch.equal(model.model.rope_deltas, ref_deltas)


@requires_cuda
@pytest.mark.parametrize("family", ALL)
def test_logits_match_on_cuda(unpatch_after, count_fused, count_apply_rope, count_rope_index, family):
    """The same on a GPU: the table gather and rotation kernels, the fused kernel where the family has q/k norms, and
    get_rope_index on the device algorithm (no host sync), against the unpatched model on the same GPU."""
    model = copy.deepcopy(shared_model(family)).cuda()
    cases = {name: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
             for name, inputs in dict(batches(family, model.config), text=text_inputs()).items()}
    with torch.no_grad():
        refs = {}
        for name, inputs in cases.items():
            reset(model)
            refs[name] = model(**inputs).logits, model.model.rope_deltas
        ropekit.apply_to_model(model)
        for name, inputs in cases.items():
            reset(model)
            ours = model(**inputs).logits
            ref, ref_deltas = refs[name]
            assert torch.equal(ours.isnan(), ref.isnan())
            assert record(family, f"fp32 logits on CUDA ({name})", ours, ref) <= 1e-5, name
            if ref_deltas is not None:
                assert torch.equal(model.model.rope_deltas, ref_deltas), name
    assert_patch_ran(family, model, (count_fused, count_apply_rope), len(cases))
    assert count_rope_index


@pytest.mark.parametrize("family", ALL)
def test_generate_same_tokens(unpatch_after, count_fused, count_apply_rope, count_rope_index, family):
    """Greedy generate of 16 tokens after images and multi-frame videos with a left-padded row (Qwen2.5-VL: videos
    of second_per_grid_ts 1.5 and 0.5), patched through apply_to_model: the same tokens and rope deltas (4.57
    decodes from the deltas; 5.x continues from the prompt's last positions)."""
    import transformers
    from packaging.version import Version

    model = shared_model(family)
    greedy = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, eos_token_id=1, pad_token_id=PAD)
    cases = batches(family, model.config, seed=3)
    # transformers 5.16-5.18's Cohere Compass generate with images raises (pixel_values and mm_encoder_outputs);
    # the patched model must raise the same, and a text batch still generates
    fails_with_images = family.id == "cohere_compass" and Version(transformers.__version__) < Version("5.19")
    if fails_with_images:
        cases["text"] = text_inputs(seed=3)
    refs = {}
    with torch.no_grad():
        for name, inputs in cases.items():
            reset(model)
            try:
                refs[name] = model.generate(**inputs, **greedy), model.model.rope_deltas
            except ValueError as error:
                if not (fails_with_images and name != "text"):
                    raise
                refs[name] = error
        ropekit.apply_to_model(model)
        calls = spy_get_rope_index(model)
        for name, inputs in cases.items():
            before = clone_inputs(inputs)
            reset(model)
            if isinstance(refs[name], ValueError):  # the patched model fails the same way
                with pytest.raises(ValueError, match=re.escape(str(refs[name]))):
                    model.generate(**inputs, **greedy)
                continue
            ours = model.generate(**inputs, **greedy)
            assert ours.shape[1] == inputs["input_ids"].shape[1] + 16
            assert torch.equal(ours, refs[name][0]), name
            deltas = model.model.rope_deltas
            assert (deltas is None) == (refs[name][1] is None), name  # a text batch computes no deltas
            assert deltas is None or torch.equal(deltas, refs[name][1]), name
            assert_inputs_unchanged(inputs, before)
    unspy(model)
    generated = [name for name, ref in refs.items() if not isinstance(ref, ValueError)]
    assert generated, "no batch generated"
    multimodal = [name for name in generated if name != "text"]
    assert_patch_ran(family, model, (count_fused, count_apply_rope), 16 * len(generated), count_rope_index,
                     calls if multimodal else None)


def training_inputs(family, config):
    """Images and videos (GLM-4V: videos) with a left-padded row; Qwen4-Exp without padding: transformers' indexed
    attention gives NaN at fully masked padding queries, and its loss and gradients with them."""
    if family.id == "qwen4_exp":
        row = [("text", 3), ("image", 4, 6), ("text", 2), ("video", 2, 4, 4), ("text", 2)]
        inputs = multimodal_inputs(family, config, 4, rows=[row, row])
    else:
        inputs = batches(family, config, seed=4)["videos" if family.layout == "glm" else "images+videos"]
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", ALL)
def test_training_step_matches(unpatch_after, count_fused, count_apply_rope, family, checkpointing):
    """One training step on images and videos, with and without gradient checkpointing: the same loss and the same
    gradient for every parameter (vision tower included)."""
    base = shared_model(family)
    inputs = training_inputs(family, base.config)

    def step():
        model = copy.deepcopy(base).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(**inputs).loss
        loss.backward()
        return model, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    _, ref_loss, ref_grads = step()
    assert torch.isfinite(ref_loss)
    ropekit.apply_to_model(base)
    model, loss, grads = step()
    assert set(grads) == set(ref_grads)
    assert record(family, "fp32 loss" + (" (checkpointing)" if checkpointing else ""), loss, ref_loss) <= 1e-5
    worst = 0.0
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        worst = max(worst, (grads[name] - ref_grads[name]).abs().max().item())
    DIFFS.append((family.id, "fp32 gradients" + (" (checkpointing)" if checkpointing else ""), worst))
    if family.fused:
        assert any("q_norm" in name for name in grads)
    assert_patch_ran(family, model, (count_fused, count_apply_rope), 2 if checkpointing else 1)


# ------------------------------------------------------------------------------------------------------------------
# Packed batches


def packed_samples(family):
    """name -> (row 0's samples, row 1's samples): each sample a list of items, as multimodal_inputs takes them.
    GLM-4V: an images case and a videos case (one batch never holds both)."""
    image_a, image_b = [("text", 3), ("image", 4, 6), ("text", 2)], [("text", 2), ("image", 4, 4), ("text", 4)]
    video_a, video_b = [("text", 2), ("video", 2, 4, 4), ("text", 3)], [("text", 3), ("video", 3, 4, 6), ("text", 1)]
    text = [("text", 5)]
    if family.layout == "glm":
        return {"images": ([image_a, text, image_b], [image_b, image_a]),
                "videos": ([video_a, text], [video_b, video_a])}
    return {"images+videos": ([image_a, video_a, text], [video_b, image_b])}


def pack(family, config, rows_of_samples, seed):
    """Each sample alone (its own B=1 inputs) and the packed batch: samples concatenated per row, right-padded,
    attention_mask holding segment ids (1, 2, ... per sample in a row, 0 for padding), grids, pixels and
    timestamps in the samples' order."""
    alone, rows, segments = [], [], []
    for row in rows_of_samples:
        ids, segs = [], []
        for samples_in_row, items in enumerate(row, start=1):
            sample = multimodal_inputs(family, config, seed + len(alone), rows=[items])
            alone.append(sample)
            ids.append(sample)
            segs.append(torch.full((sample["input_ids"].shape[1],), samples_in_row))
        rows.append(ids)
        segments.append(torch.cat(segs))
    seq = max(len(s) for s in segments)
    batch = {}
    for key in ("input_ids", "mm_token_type_ids"):
        if key in alone[0]:
            fill = PAD if key == "input_ids" else 0
            batch[key] = torch.stack([torch.nn.functional.pad(torch.cat([s[key][0] for s in row]),
                                                              (0, seq - len(seg)), value=fill)
                                      for row, seg in zip(rows, segments)])
    batch["attention_mask"] = torch.stack([torch.nn.functional.pad(seg, (0, seq - len(seg))) for seg in segments])
    for key in ("image_grid_thw", "pixel_values", "video_grid_thw", "pixel_values_videos", "second_per_grid_ts"):
        parts = [s[key] for s in alone if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return alone, batch


def block_diagonal_mask(segments, dtype=torch.float32):
    """(B, 1, S, S) additive mask: causal inside each sample, nothing across samples; a padding slot sees itself."""
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril()
    allowed = (same & causal & (segments[:, :, None] > 0)) | torch.eye(segments.shape[1], dtype=torch.bool)
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


def splits_text_positions(family) -> bool:
    """Whether the family's text model splits a (4, B, S) position tensor into text positions (row 0, for masks and
    packed-sequence detection) and mRoPE positions: every family in 5.x and 4.57's Qwen2-VL / Qwen2.5-VL; not 4.57's
    GLM-4V text models, which hand all rows to the mask code and the rotary embedding, nor Cosmos3-Edge's, which
    reads row 0 as text positions and hands all four rows to the rotary embedding (it uses the first three), nor
    HunYuan-VL's, which reads row 0 of num_axes + 1 rows as text positions and then refuses them (ValueError)."""
    import inspect as inspect_

    text_model = type(language_model(shared_model(family)))
    return "position_ids.shape[0] == 4" in inspect_.getsource(text_model.forward)


def packed_model(family):
    """The shared model; for Qwen4-Exp one whose layers are all indexed attention: transformers' linear-attention
    layers (GatedDeltaNet) carry their recurrent and convolution state across the samples of a row (its CPU
    reference ignores cu_seqlens), so no mask keeps packed samples apart there."""
    if family.id != "qwen4_exp":
        return shared_model(family)
    config = family.config()
    config.text_config.layer_types = ["indexed_attention", "indexed_attention"]
    return family.build(seed=1, config=config).eval()


@pytest.mark.parametrize("route", ["4d_mask", "packed_positions"])
@pytest.mark.parametrize("family", ALL)
def test_packed_batch_matches_samples_alone(unpatch_after, count_fused, count_apply_rope, family, route):
    """Several samples per row, positions from ropekit.data.mrope_position_ids(packed=True, text_positions=True),
    and a mask that keeps the samples apart, given to transformers either way it takes one on CPU:
    ``4d_mask``: a (B, 1, S, S) block-diagonal causal mask (transformers uses a 4-D mask as it is) with the (3, B, S)
    mRoPE positions; ``packed_positions``: attention_mask=None and the (4, B, S) positions, whose row 0 (each token's
    index in its sample) transformers' mask code reads as packed sequences (position restarting at 0 = a new
    sample). Every sample's logits equal the sample run alone (the model's own get_rope_index, patched), and the
    patched packed forward equals the unpatched one on the same inputs."""
    model = packed_model(family)
    config = model.config
    if route == "packed_positions" and not splits_text_positions(family):
        # 4.57's GLM-4V text models hand the whole (4, B, S) tensor to the mask code, whose packed-sequence
        # detection fails on it (and the rotary embedding would take all four rows): transformers raises, with and
        # without ropekit. So does 5.18's Cosmos3-Edge text model, which hands all four rows to its rotary embedding
        # (the patched forward runs transformers' code on them). There the 4-D mask is the way.
        alone, batch = pack(family, config, packed_samples(family)[next(iter(packed_samples(family)))], seed=20)
        positions, _ = ropekit.data.mrope_position_ids(batch, config, packed=True, text_positions=True)
        inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
        raised = []
        for patched in (False, True):
            if patched:
                ropekit.apply_to_model(model)
            with pytest.raises((RuntimeError, ValueError)) as info, torch.no_grad():
                model(**inputs, position_ids=positions, use_cache=False)
            raised.append((type(info.value), str(info.value)))
        assert raised[0] == raised[1], raised  # the patched model raises transformers' own error
        return
    ropekit.apply_to_model(model)
    forwards = 0
    for name, rows_of_samples in packed_samples(family).items():
        alone, batch = pack(family, config, rows_of_samples, seed=20)
        segments = batch["attention_mask"]
        positions, _ = ropekit.data.mrope_position_ids(batch, config, packed=True, text_positions=True)
        inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
        if route == "4d_mask":
            inputs.update(attention_mask=block_diagonal_mask(segments), position_ids=positions[1:])
        else:
            inputs.update(position_ids=positions)
        with torch.no_grad():
            reset(model)
            packed = model(**inputs, use_cache=False).logits
            forwards += 1
            logits_alone = []
            for sample in alone:
                reset(model)
                logits_alone.append(model(**sample, use_cache=False).logits[0])
                forwards += 1
            ropekit.unpatch()
            unpatched = model(**inputs, use_cache=False).logits
            ropekit.apply_to_model(model)
        assert record(family, f"packed fp32 logits vs unpatched ({name}, {route})", packed, unpatched) <= 1e-5
        if route == "4d_mask":  # the check has teeth: a 2-D padding mask lets a row's later samples see earlier ones
            with torch.no_grad():
                leaky = model(**dict(inputs, attention_mask=(segments > 0).long()), use_cache=False).logits
                forwards += 1
            later = segments[0] > 1
            assert not torch.allclose(leaky[0, later], packed[0, later], atol=1e-3)
        worst, sample = 0.0, 0
        for row in range(segments.shape[0]):
            for seg in range(1, int(segments[row].max()) + 1):
                ours = packed[row, segments[row] == seg]
                ref = logits_alone[sample]
                assert ours.shape == ref.shape
                torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5, msg=f"row {row} sample {seg}")
                worst = max(worst, (ours - ref).abs().max().item())
                sample += 1
        assert sample == len(alone)
        DIFFS.append((family.id, f"packed vs alone fp32 logits ({name}, {route})", worst))
    assert_patch_ran(family, model, (count_fused, count_apply_rope), forwards)


# ------------------------------------------------------------------------------------------------------------------
# Patching: entry points, dispatch, idempotence, unpatch, switches, PEFT, hooks


NEW_FAMILIES = ("Qwen2-VL", "Qwen2.5-VL", "Qwen4-Exp", "GLM-4V")


def patched_attributes():
    """(owner, name) -> object, for everything ropekit patches for the new families in the installed transformers."""
    from ropekit.transformers import _FAMILIES
    from ropekit.transformers._patching import import_optional

    out = {}
    for family in NEW_FAMILIES:
        for spec in _FAMILIES[family]:
            module = import_optional(spec.name)
            if module is None:
                continue
            if spec.rotary:
                rotary = getattr(module, spec.rotary)
                out[(rotary, "forward")] = rotary.__dict__["forward"]
                name = ("apply_multimodal_rotary_pos_emb" if hasattr(module, "apply_multimodal_rotary_pos_emb")
                        else "apply_rotary_pos_emb")
                out[(module, name)] = getattr(module, name)
            if spec.attention:
                attention = getattr(module, spec.attention)
                out[(attention, "forward")] = attention.__dict__["forward"]
            model_cls = getattr(module, spec.vl_model)
            out[(model_cls, "get_rope_index")] = model_cls.__dict__["get_rope_index"]
    return out


def test_patch_is_idempotent_and_unpatch_restores_identity(unpatch_after):
    before = patched_attributes()
    assert before
    for _ in range(2):
        for apply in (ropekit.apply_to_qwen2_vl, ropekit.apply_to_qwen2_5_vl, ropekit.apply_to_glm4v):
            apply()
        if has_module("qwen4_exp"):
            ropekit.apply_to_qwen4_exp()
    patched = patched_attributes()
    for key, old in before.items():
        assert patched[key] is not old and patched[key].__ropekit_original__ is old, key
    ropekit.unpatch()
    after = patched_attributes()
    assert all(after[key] is old for key, old in before.items())


@pytest.mark.parametrize("family", ALL)
def test_apply_to_model_dispatches_on_every_model_type(unpatch_after, family):
    """The conditional-generation model and its text model (the text sub-config's model type) are both recognised,
    instances included (model=); a model of another family is refused."""
    from ropekit.transformers import _FAMILY_MODEL_TYPES, _MODEL_TYPES

    model = shared_model(family)
    rotary = getattr(family.modeling(), family.rotary)
    # Cosmos3-Omni's text model is Qwen3-VL's (model type qwen3_vl_text)
    text_apply = ropekit.apply_to_qwen3_vl if family.id == "cosmos3_omni" else family.apply
    for target, apply in ((model, family.apply), (language_model(model), text_apply)):
        assert target.config.model_type in _MODEL_TYPES, target.config.model_type
        ropekit.unpatch()
        ropekit.apply_to_model(target)
        assert rotary.__dict__["forward"].__ropekit_original__ is not None
        assert _MODEL_TYPES[target.config.model_type] is apply
    covered = {t for family_, types in _FAMILY_MODEL_TYPES.items() for t in types if _MODEL_TYPES[t] is family.apply}
    assert model.config.model_type in covered
    assert text_apply is not family.apply or model.config.text_config.model_type in covered
    other = shared_model(FAMILIES["qwen2_vl" if family.id != "qwen2_vl" else "glm4v"])
    with pytest.raises(ValueError, match=rf"{family.apply.__name__} patches model types .*{other.config.model_type!r}"):
        family.apply(other)


def test_switches(unpatch_after):
    """rope / rope_index switch their parts; families without q/k norms have no qk_norm_rope switch of their own,
    and apply_to_model drops it for them (nothing to fuse)."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m

    name = "apply_rotary_pos_emb"
    if hasattr(m, "apply_multimodal_rotary_pos_emb"):  # 4.57
        name = "apply_multimodal_rotary_pos_emb"
    apply, get_rope_index = getattr(m, name), m.Qwen2VLModel.get_rope_index
    ropekit.apply_to_qwen2_vl(rope=False)
    assert getattr(m, name) is apply and m.Qwen2VLModel.get_rope_index is not get_rope_index
    ropekit.unpatch()
    ropekit.apply_to_qwen2_vl(rope_index=False)
    assert getattr(m, name) is not apply and m.Qwen2VLModel.get_rope_index is get_rope_index
    ropekit.unpatch()
    with pytest.raises(TypeError):
        ropekit.apply_to_qwen2_vl(qk_norm_rope=True)
    ropekit.apply_to_model(shared_model(FAMILIES["qwen2_vl"]), qk_norm_rope=False)
    assert getattr(m, name) is not apply
    with pytest.raises(TypeError):
        ropekit.apply_to_model(shared_model(FAMILIES["qwen2_vl"]), no_such_switch=True)


@pytest.mark.skipif(has_module("cosmos3_omni"), reason="checks the error on a transformers without these types (4.57)")
def test_families_of_later_releases_say_which(unpatch_after):
    """Where the installed transformers lacks a family's own modeling module, its apply_to_* raises and patches
    nothing, also when the family runs another family's module that is there (Cosmos3-Omni: Qwen3-VL's)."""
    from ropekit.transformers import _patching

    for apply, family, first in ((ropekit.apply_to_cosmos3, "Cosmos3", r"5\.11\.0"),
                                 (ropekit.apply_to_cohere_compass, "Cohere-Compass", r"5\.16\.0"),
                                 (ropekit.apply_to_paddleocr_vl, "PaddleOCR-VL", r"5\.0\.0"),
                                 (ropekit.apply_to_glm_ocr, "GLM-OCR", r"5\.1\.0"),
                                 (ropekit.apply_to_ernie4_5_vl, "ERNIE-4.5-VL", r"5\.0\.0"),
                                 (ropekit.apply_to_hunyuan_vl, "HunYuan-VL", r"5\.13\.0"),
                                 (ropekit.apply_to_hy_v4_vl, "HY-V4-VL", r"5\.24\.0")):
        with pytest.raises(RuntimeError, match=rf"no {family} modeling module; .*needs transformers {first}"):
            apply()
        assert not _patching._ORIGINALS, f"{family}: nothing was patched"


@pytest.mark.skipif(has_module("qwen4_exp"), reason="checks the error on a transformers without Qwen4-Exp (4.57)")
def test_qwen4_exp_needs_transformers_5(unpatch_after):
    from ropekit.transformers import _patching

    with pytest.raises(RuntimeError, match=r"no Qwen4-Exp modeling module; .* \(Qwen4-Exp needs transformers 5\.x\)"):
        ropekit.apply_to_qwen4_exp()
    assert not _patching._ORIGINALS, "nothing was patched"
    ropekit.apply_to_glm4v()  # GLM-4V and GLM-4V-MoE exist in 4.57; GLM-4.6V (5.x only) is skipped
    assert _patching._ORIGINALS


@pytest.mark.parametrize("family", family_params(ids={"qwen4_exp"}))
def test_qwen4_exp_switches_and_hooks(unpatch_after, count_fused, family):
    """qk_norm_rope=False leaves the attention alone; a forward hook on q_norm makes the layer run the unfused
    steps (the hook fires, the numbers are the same)."""
    from transformers.models.qwen4_exp import modeling_qwen4_exp as m

    forward = m.Qwen4ExpTextAttention.forward
    ropekit.apply_to_qwen4_exp(qk_norm_rope=False)
    assert m.Qwen4ExpTextAttention.forward is forward
    ropekit.unpatch()
    model = shared_model(family)
    inputs = text_inputs(lengths=(9, 9))
    seen = []
    attention = next(layer.self_attn for layer in language_model(model).layers if hasattr(layer, "self_attn"))
    handle = attention.q_norm.register_forward_hook(lambda *a: seen.append(1))
    try:
        with torch.no_grad():
            ref = model(**inputs).logits
            ropekit.apply_to_model(model)
            ours = model(**inputs).logits
    finally:
        handle.remove()
    assert len(seen) == 2 and not count_fused
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        model(**inputs)
    assert len(count_fused) == attention_layers(model), "without the hook the layer fuses again"


@pytest.mark.parametrize("family", ALL)
def test_peft_lora(unpatch_after, count_fused, count_apply_rope, family):
    """LoRA on q_proj / k_proj (HY-V4-VL's MLA: q_b_proj / kv_b_proj; and, where the family has q/k norms,
    trainable modules_to_save copies of them, which the fused op uses): the same loss and trainable gradients
    patched (model=) and unpatched."""
    peft = pytest.importorskip("peft", reason="PEFT integration: peft is in requirements/dev.txt")
    modules_to_save = ["q_norm", "k_norm"] if family.fused else None
    targets = ["q_proj", "k_proj"] if family.id != "hy_v4_vl" else ["q_b_proj", "kv_b_proj"]
    model = peft.get_peft_model(copy.deepcopy(shared_model(family)),
                                peft.LoraConfig(r=4, target_modules=targets, modules_to_save=modules_to_save))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    inputs = training_inputs(family, model.config)
    model.train()

    def loss_and_grads():
        model.zero_grad()
        reset(model.base_model.model)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    family.apply(model)
    loss, grads = loss_and_grads()
    assert any("lora_A" in name for name in grads)
    if family.fused:
        assert count_fused and any("modules_to_save" in name and "q_norm" in name for name in grads)
    elif family.rotation:
        assert count_apply_rope
    else:  # only the rotary is ropekit's
        assert served_from_table(language_model(model.base_model.model).rotary_emb)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
