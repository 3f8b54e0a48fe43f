"""The Omni thinkers patched (apply_to_qwen2_5_omni, apply_to_qwen3_omni_moe): their get_rope_index replaced by
ropekit.rope_index, against the unpatched function and model. Tiny thinkers built from their config classes (random
weights, real transformers code); the prompts hold image, video and audio spans (their placeholder tokens and grids;
no pixels or audio features are needed for the positions)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import ropekit
from ropekit.transformers._patching import original

from omni_cases import (AUDIO_END, FAMILIES, VISION_END, VISION_START, make_case, same, stand_in,
                        transformers_outcome)
from test_vision import _outputs, _pixels  # the tower helpers of the vision suite

pytestmark = pytest.mark.transformers

AVAILABLE = [f for f in FAMILIES if f.model_class() is not None]
APPLY = {"qwen2_5_omni": ropekit.apply_to_qwen2_5_omni, "qwen3_omni": ropekit.apply_to_qwen3_omni_moe}


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    ropekit.unpatch()


def _patched_outcome(family, case, keyword: bool):
    cls, me = stand_in(family, case)
    args = (case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask, case.use_audio_in_video,
            case.audio_seqlens, case.second_per_grids)
    try:
        with torch.no_grad():
            if keyword:
                names = ("input_ids", "image_grid_thw", "video_grid_thw", "attention_mask", "use_audio_in_video",
                         "audio_seqlens", "second_per_grids")
                return cls.get_rope_index(me, **dict(zip(names, args))), None
            return cls.get_rope_index(me, *args), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_patched_get_rope_index_matches_transformers(family, monkeypatch):
    """The replacement, called as the models call it (positionally and by keyword), returns what the original
    returns, through ropekit (counted), and raises where it raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the installed code is known: nothing declined
        APPLY[family.name]()
    cls = family.model_class()
    assert original(cls, "get_rope_index") is not vars(cls)["get_rope_index"]
    calls = []
    real = ropekit.ops.rope_index
    monkeypatch.setattr(ropekit.ops, "rope_index", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = random.Random(f"{family.name}-patched")
    results = 0
    for k in range(300):
        case = make_case(rng, family, use_audio_in_video=k % 2 == 1, perturb=k % 3 == 2)
        ropekit.unpatch()
        ref, ref_error = transformers_outcome(family, case)
        APPLY[family.name]()
        for keyword in (False, True):
            got, error = _patched_outcome(family, case, keyword)
            if ref is None:
                assert got is None, f"transformers raised ({ref_error}), the patched function returned"
                continue
            assert got is not None, error
            assert same(got[0], ref[0]) and same(got[1], ref[1])
            results += 1
    assert results > 300 and len(calls) >= results  # ropekit computed them (not the original)


def _tiny_thinker(family):
    import inspect

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=152000)
    text_config_class = family.config_class()().text_config.__class__
    if "rope_parameters" in inspect.signature(text_config_class.__init__).parameters:  # 5.x
        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
    else:  # 4.57
        text.update(rope_theta=10000.0, rope_scaling=dict(type="default", mrope_section=[2, 3, 3]))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    audio = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64)
    if family.float_positions:
        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)
    else:
        vision["fullatt_block_indexes"] = [0]
    config = family.config_class()(text_config=text, vision_config=vision, audio_config=audio)
    config.vision_start_token_id, config.vision_end_token_id = VISION_START, VISION_END
    config.position_id_per_seconds = 13  # 0.3 s grids: fractional temporal positions for Qwen3-Omni
    import importlib

    module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    cls = getattr(module, family.model.replace("PreTrainedModelForConditionalGeneration",
                                               "ThinkerForConditionalGeneration"))
    torch.manual_seed(0)
    return cls(config).eval(), config


def _prompt(config, family, batch_pad: bool):
    image, video, audio = config.image_token_id, config.video_token_id, config.audio_token_id
    n_audio = 13 if family.float_positions else 25  # 100 feature frames
    row = ([5, VISION_START] + [image] * 4 + [VISION_END, 6, config.audio_start_token_id] + [audio] * n_audio
           + [AUDIO_END, 7, VISION_START] + [video] * 6 + [VISION_END, 8, 9])
    ids = torch.tensor([row, [0, 0] + row[:-2]]) if batch_pad else torch.tensor([row])
    mask = torch.ones_like(ids)
    if batch_pad:
        mask[1, :2] = 0  # left padding
    batch = ids.shape[0]
    return dict(input_ids=ids, attention_mask=mask, image_grid_thw=torch.tensor([[1, 4, 4]] * batch),
                video_grid_thw=torch.tensor([[3, 2, 4]] * batch),
                video_second_per_grid=torch.tensor([0.3] * batch),
                feature_attention_mask=torch.ones(batch, 100, dtype=torch.long))


def _switches(family):
    """(apply_to_* keyword switches, fused): Qwen3-Omni's text attention fuses q/k norm + RoPE (ropekit's documented
    fp32 tolerance: computed in float32, rounded once) and is also run unfused, where every patched part is exact;
    Qwen2.5-Omni has no q/k norms."""
    if family.float_positions:
        return [(dict(qk_norm_rope=False), False), (dict(), True)]
    return [(dict(), False)]


# the fused families' fp32 criteria (tests/python/test_families.py): logits and loss within 1e-5, gradients
# rtol 1e-4 / atol 1e-6
FUSED_ATOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-4, 1e-6


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_thinker_logits_loss_and_generate(family, monkeypatch, count_fused):
    """fp32 logits, loss and 8-token greedy generate of the patched thinker against the unpatched one: identical
    unfused, within the fused op's tolerance (the same tokens) where Qwen3-Omni fuses q/k norm + RoPE."""
    model, config = _tiny_thinker(family)
    inputs = _prompt(config, family, batch_pad=True)
    labels = inputs["input_ids"].clone()

    def run():
        model.rope_deltas = None
        with torch.no_grad():
            out = model(**inputs, labels=labels)
            model.rope_deltas = None
            generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        return out.logits, out.loss, generated

    ref = run()
    calls = []
    real = ropekit.ops.rope_index
    monkeypatch.setattr(ropekit.ops, "rope_index", lambda *a, **k: calls.append(1) or real(*a, **k))
    for switches, fused in _switches(family):
        ropekit.unpatch()
        calls.clear()
        count_fused.clear()
        APPLY[family.name](model, **switches)
        got = run()
        assert calls, "the patched get_rope_index did not run"
        assert bool(count_fused) == fused, "the fused q/k norm + RoPE ran where switched on, only there"
        if fused:
            torch.testing.assert_close(got[0], ref[0], rtol=0, atol=FUSED_ATOL)
            torch.testing.assert_close(got[1], ref[1], rtol=0, atol=FUSED_ATOL)
        else:
            assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        assert torch.equal(ref[2], got[2])


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_apply_to_model_dispatches_and_unpatch_restores(family):
    model, _ = _tiny_thinker(family)
    cls = family.model_class()
    before = vars(cls)["get_rope_index"]
    ropekit.apply_to_model(model)
    assert vars(cls)["get_rope_index"] is not before
    ropekit.unpatch()
    assert vars(cls)["get_rope_index"] is before


@pytest.mark.parametrize("use_audio_in_video", [False, True], ids=["no_aiv", "aiv"])
@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_collator_positions_are_the_thinkers(family, use_audio_in_video):
    """ropekit.data.MRopeCollator on a thinker batch (audio lengths from feature_attention_mask, as the thinker sums
    them): the thinker's own get_rope_index result; the thinker, given those position_ids, skips its own and returns
    the same logits."""
    model, config = _tiny_thinker(family)
    inputs = _prompt(config, family, batch_pad=True)
    if use_audio_in_video:  # the video becomes a clip: vision_start, audio_start, video and audio, audio_end, end
        ids = inputs["input_ids"]
        video = (ids == config.video_token_id).nonzero()
        rows = []
        n_audio = 13 if family.float_positions else 25
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            first = row.index(config.video_token_id)
            row[first:first] = [config.audio_start_token_id]
            last = len(row) - row[::-1].index(config.video_token_id)
            row[last:last] = [config.audio_token_id] * n_audio + [AUDIO_END]
            rows.append(row)
        assert len(video) > 0
        inputs["input_ids"] = torch.tensor(rows)
        inputs["attention_mask"] = torch.cat(
            [inputs["attention_mask"], torch.ones(ids.shape[0], n_audio + 2, dtype=torch.long)], 1)
        inputs["feature_attention_mask"] = torch.ones(ids.shape[0] * 2, 100, dtype=torch.long)
    forward_kwargs = dict(use_audio_in_video=use_audio_in_video)
    cls = family.model_class()
    expected = original(cls, "get_rope_index")(
        model, inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["attention_mask"],
        use_audio_in_video, inputs["feature_attention_mask"].sum(-1), inputs["video_second_per_grid"])
    collate = ropekit.data.MRopeCollator(config, collate_fn=lambda features: dict(features[0]),
                                         use_audio_in_video=use_audio_in_video, rope_deltas_key="rope_deltas")
    batch = collate([inputs])
    assert same(batch["position_ids"], expected[0]) and same(batch["rope_deltas"], expected[1])
    with torch.no_grad():
        model.rope_deltas = None
        ref = model(**inputs, **forward_kwargs).logits
        given = {k: v for k, v in batch.items() if k != "rope_deltas"}
        got = model(**given, **forward_kwargs).logits
    assert torch.equal(ref, got)


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_collator_packed_samples(family):
    """Segment-id packing: each sample's positions are its own, text positions (row 0) restart per sample."""
    _, config = _tiny_thinker(family)
    one = _prompt(config, family, batch_pad=False)
    ids = one["input_ids"]
    S = ids.shape[1]
    batch = dict(input_ids=torch.cat([ids, ids], 1), attention_mask=torch.tensor([[1] * S + [2] * S]),
                 image_grid_thw=one["image_grid_thw"].repeat(2, 1), video_grid_thw=one["video_grid_thw"].repeat(2, 1),
                 video_second_per_grid=one["video_second_per_grid"].repeat(2),
                 feature_attention_mask=one["feature_attention_mask"].repeat(2, 1))
    position_ids, _ = ropekit.data.mrope_position_ids(batch, config, packed=True, text_positions=True)
    alone, _ = ropekit.data.mrope_position_ids(one, config)
    assert position_ids.shape[0] == 4
    assert same(position_ids[1:, :, :S], alone) and same(position_ids[1:, :, S:], alone)
    assert torch.equal(position_ids[0, 0, S:], torch.arange(S, dtype=position_ids.dtype))


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_training_step_gradients(family, count_fused):
    """A training step's loss and every parameter gradient, patched (rotary, rotation, index) against unpatched,
    bit for bit in fp32, gradient checkpointing on and off; with Qwen3-Omni's fused q/k norm + RoPE, within the fused
    op's tolerance (the q/k norm weights' gradients come from the fused backward)."""
    for (switches, fused), checkpointing in [(s, c) for s in _switches(family) for c in (False, True)]:
        model, config = _tiny_thinker(family)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = _prompt(config, family, batch_pad=True)

        def step():
            model.zero_grad(set_to_none=True)
            model.rope_deltas = None
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        ref_loss, ref_grads = step()
        count_fused.clear()
        APPLY[family.name](model, **switches)
        loss, grads = step()
        ropekit.unpatch()
        assert bool(count_fused) == fused
        assert grads.keys() == ref_grads.keys() and len(grads) > 10
        if fused:
            assert any("q_norm" in name for name in grads)
            torch.testing.assert_close(loss, ref_loss, rtol=0, atol=FUSED_ATOL)
            for name in grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)
            continue
        assert torch.equal(loss, ref_loss)
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_text_rotary_bit_identical(family, dtype):
    """The thinker's text rotary, patched: integer positions from the cached table, bit for bit; Qwen3-Omni's float32
    positions too where (CPU tensors) they all hold integers; with fractional ones, transformers' own code, no table
    built."""
    from ropekit.transformers.rotary import _TABLE_ATTR

    model, config = _tiny_thinker(family)
    text_rotary = {"qwen2_5_omni": "Qwen2_5OmniRotaryEmbedding", "qwen3_omni": "Qwen3OmniMoeThinkerTextRotaryEmbedding"}
    rotary = next(m for m in model.modules() if type(m).__name__ == text_rotary[family.name])
    x = torch.randn(2, 5, 64, dtype=dtype)
    positions = {"int": torch.randint(0, 3000, (3, 2, 37))}
    if family.float_positions:
        positions["float"] = torch.randint(0, 3000, (3, 2, 37)).float() + torch.tensor([0.0, 0.5, 0.9])[
            torch.randint(0, 3, (3, 2, 37))]
        positions["float_int"] = torch.randint(-3, 3000, (3, 2, 37)).float()  # a text-only or integral prompt
    reference = {key: rotary(x, p) for key, p in positions.items()}
    APPLY[family.name](model)
    for key, p in positions.items():
        rotary.__dict__.pop(_TABLE_ATTR, None)
        got = rotary(x, p)
        for a, b in zip(got, reference[key]):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        assert (_TABLE_ATTR in rotary.__dict__) == (key != "float"), key  # the table served integer values only


def _vision_tower(family, model):
    """The thinker's vision encoder module."""
    import importlib

    module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    tower_cls = getattr(module, "Qwen2_5OmniVisionEncoder" if family.name == "qwen2_5_omni"
                        else "Qwen3OmniMoeVisionEncoder")
    return next(m for m in model.modules() if isinstance(m, tower_cls))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_vision_tower_rotation_bit_identical(family, dtype, monkeypatch):
    """The thinker's vision tower on an image and a 2-frame video (window and full attention blocks for
    Qwen2.5-Omni): patched, its apply_rotary_pos_emb_vision is ropekit.apply_rope_vision, and every output (merged
    features, hidden states, Qwen3-Omni's deepstack features) and the pixels' gradient are transformers' bit for bit.
    Qwen2.5-Omni up to transformers 5.16 rotates one tensor by its freqs, a form the op does not replace: left alone
    without a warning (a row in the support report says so), nothing changes."""
    import importlib
    import inspect

    model, _ = _tiny_thinker(family)
    tower = _vision_tower(family, model).to(dtype)
    grid = torch.tensor([[1, 4, 4], [2, 4, 6]])
    pixels = _pixels(tower, grid, dtype, seed=5)

    def run():
        x = pixels.clone().requires_grad_()
        out = _outputs(tower(x, grid_thw=grid))
        sum(o.float().sum() * (i + 1) for i, o in enumerate(out) if o.is_floating_point()).backward()
        return out, x.grad

    ref, ref_grad = run()
    calls = []
    real = ropekit.ops.apply_rope_vision
    monkeypatch.setattr(ropekit.ops, "apply_rope_vision", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    replaceable = list(inspect.signature(module.apply_rotary_pos_emb_vision).parameters) == ["q", "k", "cos", "sin"]
    APPLY[family.name](model)  # no warning (the suite makes warnings errors)
    got, got_grad = run()
    assert len(ref) == len(got) >= 1  # 4.57's towers return the merged features alone
    for a, b in zip(ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(ref_grad, got_grad)
    if replaceable:
        assert calls, "the tower's rotation did not run through ropekit.apply_rope_vision"
    else:
        rows = [row for row in ropekit.transformers.support_report()
                if row.switch == "vision_rope" and row.module == family.module]
        assert not calls and rows and rows[0].left and not rows[0].patched and "(tensor, freqs) form" in rows[0].reason


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_vision_inputs_feed_the_tower(family, monkeypatch):
    """transformers 5.x: ropekit.data's precomputed tower inputs (``MRopeCollator(vision=thinker)``: rotary position
    ids, attention boundaries, Qwen2.5-Omni's window order, Qwen3-Omni's interpolation taps) are what the Omni tower
    computes itself: it hands back the very objects given, and its outputs are bit for bit those it computes alone.
    4.57's towers take none: VisionInputsUnavailable."""
    import importlib

    from ropekit.transformers.vision import VisionInputs, VisionInputsUnavailable

    model, _ = _tiny_thinker(family)
    module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    tower = _vision_tower(family, model)
    try:
        inputs = VisionInputs(model)
    except VisionInputsUnavailable:
        assert hasattr(type(tower), "rot_pos_emb"), "a tower that computes its positions by helpers was refused"
        pytest.skip("transformers 4.57's Omni towers take no precomputed inputs (their rot_pos_emb computes them)")
    grid = torch.tensor([[1, 4, 4], [2, 4, 6]])
    pixels = _pixels(tower, grid, torch.float32, seed=6)
    given = {k[len("image_"):]: v for k, v in inputs(image_grid_thw=inputs.grids["image"](grid)).items()}
    assert "position_ids" in given and "cu_seqlens" in given
    handed = []
    for step in inputs.steps:
        real = getattr(module, step.name)

        def spy(*args, _real=real, _step=step, kwargs=None, **rest):
            offered = {k: kwargs[k] for k in _step.keys if kwargs and kwargs.get(k) is not None}  # the helper pops
            result = _real(*args, kwargs=kwargs, **rest)
            results = result if len(_step.targets) > 1 else (result,)
            handed.extend(offered[k] is r for k, r in zip(_step.keys, results) if k in offered)
            return result

        monkeypatch.setattr(module, step.name, spy)
    with torch.no_grad():
        alone = _outputs(tower(pixels, grid_thw=grid))
        assert not handed
        fed = _outputs(tower(pixels, grid_thw=grid, **given))
    assert handed and all(handed), "the tower recomputed an input it was given"
    assert len(alone) == len(fed) and all(torch.equal(a, b) for a, b in zip(alone, fed))
