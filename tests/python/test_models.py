"""Model level: tiny Qwen3 / Qwen3-VL text models built from their config classes (random weights) give the same
fp32 logits patched and unpatched, and unpatch() restores the original objects exactly."""

from __future__ import annotations

import importlib

import pytest
import torch

import ropekit

from conftest import tiny_qwen3_config, tiny_qwen3_vl_text_config

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
