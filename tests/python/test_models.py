"""Model level: tiny Qwen3 / Qwen3-VL text models built from their config classes (random weights) give the same
fp32 logits patched and unpatched, and unpatch() restores the original objects exactly."""

from __future__ import annotations

import importlib

import pytest
import torch

import ropekit

from conftest import tiny_qwen3_config, tiny_qwen3_vl_config, tiny_qwen3_vl_text_config

pytestmark = pytest.mark.transformers


def build(cls, config, device, seed=0):
    torch.manual_seed(seed)
    return cls(config).to(device).eval()


@pytest.mark.parametrize("rope_type,params", [("default", {}), ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32})])
def test_qwen3_logits_match(unpatch_after, device, rope_type, params):
    from transformers import Qwen3ForCausalLM

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(rope_type, **params), device)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: generate-style (B, S) positions
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=position_ids).logits
        ref_default = model(ids).logits
        ropekit.apply_to_qwen3()  # after the model was built: patched methods reach it through its class
        ours = model(ids, attention_mask=mask, position_ids=position_ids).logits
        ours_default = model(ids).logits
        ropekit.unpatch()
        again = model(ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_default, ref_default, rtol=0, atol=1e-5)
    assert torch.equal(again, ref)


def test_qwen3_training_step_gradients_match(unpatch_after):
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))

    def grads():
        model = build(Qwen3ForCausalLM, config, "cpu", seed=3).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads()
    ropekit.apply_to_qwen3()
    loss, ours = grads()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_qwen3_vl_text_model_matches(unpatch_after, device):
    from transformers import Qwen3VLTextModel

    model = build(Qwen3VLTextModel, tiny_qwen3_vl_text_config(), device)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, 30), generator=gen).to(device)
    # Distinct temporal/height/width rows, as get_rope_index produces around an image.
    pos = torch.arange(30).expand(3, 2, 30).clone()
    pos[1, :, 5:17] = torch.arange(12) % 4 + 5
    pos[2, :, 5:17] = torch.arange(12) // 4 + 5
    pos = pos.to(device)
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos).last_hidden_state
        ref_text = model(input_ids=ids).last_hidden_state
        ropekit.apply_to_qwen3_vl()
        ours = model(input_ids=ids, position_ids=pos).last_hidden_state
        ours_text = model(input_ids=ids).last_hidden_state
        ropekit.unpatch()
        again = model(input_ids=ids, position_ids=pos).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_text, ref_text, rtol=0, atol=1e-5)
    assert torch.equal(again, ref)


PATCHED = {
    "transformers.models.qwen3.modeling_qwen3": "Qwen3RotaryEmbedding",
    "transformers.models.qwen3_moe.modeling_qwen3_moe": "Qwen3MoeRotaryEmbedding",
    "transformers.models.qwen3_vl.modeling_qwen3_vl": "Qwen3VLTextRotaryEmbedding",
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe": "Qwen3VLMoeTextRotaryEmbedding",
}


def test_patch_is_idempotent_and_unpatch_restores_identity(unpatch_after):
    before = {}
    for module_name, cls_name in PATCHED.items():
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
        before[module_name] = (module.apply_rotary_pos_emb, cls.__dict__["forward"])
    for _ in range(2):
        ropekit.apply_to_qwen3()
        ropekit.apply_to_qwen3_vl()
    for module_name, cls_name in PATCHED.items():
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
        assert module.apply_rotary_pos_emb is not before[module_name][0]
        assert module.apply_rotary_pos_emb.__ropekit_original__ is before[module_name][0]
        assert cls.__dict__["forward"].__ropekit_original__ is before[module_name][1]
    ropekit.unpatch()
    for module_name, cls_name in PATCHED.items():
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
        assert module.apply_rotary_pos_emb is before[module_name][0]
        assert cls.__dict__["forward"] is before[module_name][1]


def test_table_is_not_in_state_dict(unpatch_after):
    from transformers import Qwen3ForCausalLM

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu")
    keys = set(model.state_dict())
    ropekit.apply_to_qwen3()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert "_ropekit_table" in vars(model.model.rotary_emb)
    assert set(model.state_dict()) == keys


def multimodal_batch(config, generator):
    """Two rows: an image + a 2-frame video (timestamps between frames), and a left-padded row with one image."""
    import inspect

    image, video, start, end = (config.image_token_id, config.video_token_id, config.vision_start_token_id,
                                config.vision_end_token_id)
    merge = config.vision_config.spatial_merge_size
    image_grid = torch.tensor([[1, 4, 6], [1, 4, 4]])
    video_grid = torch.tensor([[2, 4, 4]])
    tokens = lambda t, h, w: t * h * w // merge**2  # noqa: E731
    row0 = [11, 12, start] + [image] * tokens(1, 4, 6) + [end, 13, 14, start] + [video] * tokens(1, 4, 4) + [end, 15]
    row0 += [start] + [video] * tokens(1, 4, 4) + [end, 16]
    row1 = [21, start] + [image] * tokens(1, 4, 4) + [end, 22, 23]
    seq = len(row0)
    ids = torch.tensor([row0, [0] * (seq - len(row1)) + row1])
    mask = torch.tensor([[1] * seq, [0] * (seq - len(row1)) + [1] * len(row1)])
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    inputs = dict(
        input_ids=ids, attention_mask=mask, image_grid_thw=image_grid, video_grid_thw=video_grid,
        pixel_values=torch.randn(int(image_grid.prod(-1).sum()), patch_dim, generator=generator),
        pixel_values_videos=torch.randn(int(video_grid.prod(-1).sum()), patch_dim, generator=generator),
    )
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    if "mm_token_type_ids" in inspect.signature(Qwen3VLModel.get_rope_index).parameters:
        inputs["mm_token_type_ids"] = torch.where(ids == image, 1, torch.where(ids == video, 2, 0))
    return inputs


def test_qwen3_vl_generate_multimodal_same_tokens(unpatch_after, monkeypatch):
    """Greedy generate of a tiny Qwen3-VL with images, a multi-frame video and left padding: same tokens patched,
    and the patched get_rope_index / rotary really ran."""
    from transformers import Qwen3VLForConditionalGeneration

    from ropekit.transformers import rope_index as rope_index_patch

    config = tiny_qwen3_vl_config()
    model = build(Qwen3VLForConditionalGeneration, config, "cpu")
    inputs = multimodal_batch(config, torch.Generator().manual_seed(5))
    calls = []
    real_rope_index = rope_index_patch.ops.rope_index
    monkeypatch.setattr(rope_index_patch.ops, "rope_index", lambda *a, **k: calls.append(1) or real_rope_index(*a, **k))
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        ropekit.apply_to_qwen3_vl()
        ours = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert calls, "the patched get_rope_index was not used"
    assert "_ropekit_table" in vars(model.model.language_model.rotary_emb), "the patched rotary was not used"
    assert torch.equal(ours, ref)


def test_qwen3_vl_multimodal_logits_match(unpatch_after):
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_qwen3_vl_config()
    model = build(Qwen3VLForConditionalGeneration, config, "cpu")
    inputs = multimodal_batch(config, torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(**inputs).logits
        ropekit.apply_to_qwen3_vl()
        ours = model(**inputs).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def has_qwen3_5() -> bool:
    try:
        importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    except ImportError:
        return False
    return True


@pytest.mark.skipif(has_qwen3_5(), reason="checks the error on a transformers without Qwen3.5 (4.57)")
def test_apply_to_qwen3_5_needs_transformers_5(unpatch_after):
    with pytest.raises(RuntimeError, match="Qwen3.5 needs transformers 5.x"):
        ropekit.apply_to_qwen3_5()


@pytest.mark.skipif(not has_qwen3_5(), reason="Qwen3.5 exists from transformers 5.x (4.57 is checked for the error)")
def test_qwen3_5_rotary_and_rope_index(unpatch_after):
    """Qwen3.5: partial rotary (0.25 of head_dim 64) with [11, 11, 10] sections, and its get_rope_index."""
    import copy

    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model, Qwen3_5TextRotaryEmbedding

    from ropekit.transformers._patching import original

    config = Qwen3_5TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                               max_position_embeddings=512)
    ref_module = Qwen3_5TextRotaryEmbedding(config)
    assert ref_module.inv_freq.numel() == 32 and list(ref_module.mrope_section) == [11, 11, 10]
    our_module = copy.deepcopy(ref_module)
    vl_model = build(__import__("transformers").Qwen3VLForConditionalGeneration, tiny_qwen3_vl_config(), "cpu").model
    inputs = multimodal_batch(vl_model.config, torch.Generator().manual_seed(7))
    args = (inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"],
            inputs["attention_mask"])
    ref_index = original(Qwen3_5Model, "get_rope_index")(vl_model, *args)  # same code as Qwen3-VL's, by design

    ropekit.apply_to_qwen3_5()
    gen = torch.Generator().manual_seed(8)
    pos = torch.randint(0, 700, (3, 2, 33), generator=gen)
    x = torch.randn(2, 33, 8, dtype=torch.bfloat16)
    for ours, ref in zip(our_module(x, pos), original(Qwen3_5TextRotaryEmbedding, "forward")(ref_module, x, pos)):
        assert ours.shape == (2, 33, 64) and torch.equal(ours, ref)
    ours_index = Qwen3_5Model.get_rope_index(vl_model, *args, pixel_values=None)  # the **kwargs sink
    assert all(torch.equal(a, b) for a, b in zip(ours_index, ref_index))
    from transformers.models.qwen3_5 import modeling_qwen3_5

    q = torch.randn(2, 33, 4, 256, generator=gen).transpose(1, 2)
    k = torch.randn(2, 33, 1, 256, generator=gen).transpose(1, 2)
    cos, sin = our_module(q, pos)
    ours = modeling_qwen3_5.apply_rotary_pos_emb(q, k, cos, sin)
    ref = original(modeling_qwen3_5, "apply_rotary_pos_emb")(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref)), "fp32 partial rotary: bit-identical to eager"
