"""Model level: tiny Qwen3 / Qwen3-VL text models built from their config classes (random weights) give the same
fp32 logits patched and unpatched, and unpatch() restores the original objects exactly."""

from __future__ import annotations

import importlib

import pytest
import torch

import ropekit

from conftest import (build, has_qwen3_5, multimodal_batch, tiny_qwen3_5_text_config, tiny_qwen3_config,
                      tiny_qwen3_vl_config, tiny_qwen3_vl_text_config)

pytestmark = pytest.mark.transformers


@pytest.mark.parametrize("rope_type,params", [("default", {}), ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32})])
def test_qwen3_logits_match(unpatch_after, count_fused, device, rope_type, params):
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
    assert len(count_fused) == 2 * model.config.num_hidden_layers, "every layer runs the fused q/k norm + RoPE"


def test_qwen3_training_step_gradients_match(unpatch_after, count_fused):
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
    assert count_fused
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert any("q_norm" in name for name in ref) and any("k_norm" in name for name in ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_qwen3_optimizer_step_matches(unpatch_after, checkpointing):
    """One SGD step with and without gradient checkpointing: same loss, same updated parameters. (SGD: Adam's first
    step is lr * sign(grad), which turns fp32-noise-level gradients into lr-sized differences.)"""
    from transformers import Qwen3ForCausalLM

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))

    def step():
        model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu", seed=4).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach(), {n: p.detach().clone() for n, p in model.named_parameters()}

    ref_loss, ref = step()
    ropekit.apply_to_qwen3()
    loss, ours = step()
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


PATCHED = {  # module -> (rotary class, attention class)
    "transformers.models.qwen3.modeling_qwen3": ("Qwen3RotaryEmbedding", "Qwen3Attention"),
    "transformers.models.qwen3_moe.modeling_qwen3_moe": ("Qwen3MoeRotaryEmbedding", "Qwen3MoeAttention"),
    "transformers.models.qwen3_vl.modeling_qwen3_vl": ("Qwen3VLTextRotaryEmbedding", "Qwen3VLTextAttention"),
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe": ("Qwen3VLMoeTextRotaryEmbedding",
                                                               "Qwen3VLMoeTextAttention"),
}


def test_patch_is_idempotent_and_unpatch_restores_identity(unpatch_after):
    def snapshot():
        out = {}
        for module_name, (rotary, attention) in PATCHED.items():
            module = importlib.import_module(module_name)
            out[module_name] = (module.apply_rotary_pos_emb, getattr(module, rotary).__dict__["forward"],
                                getattr(module, attention).__dict__["forward"])
        return out

    before = snapshot()
    for _ in range(2):
        ropekit.apply_to_qwen3()
        ropekit.apply_to_qwen3_vl()
    patched = snapshot()
    for module_name in PATCHED:
        for new, old in zip(patched[module_name], before[module_name]):
            assert new is not old and new.__ropekit_original__ is old
    ropekit.unpatch()
    after = snapshot()
    for module_name in PATCHED:
        assert all(a is b for a, b in zip(after[module_name], before[module_name]))


def test_patch_switches(unpatch_after):
    from transformers.models.qwen3 import modeling_qwen3

    forward, apply = modeling_qwen3.Qwen3Attention.forward, modeling_qwen3.apply_rotary_pos_emb
    ropekit.apply_to_qwen3(rope=True, qk_norm_rope=False)
    assert modeling_qwen3.Qwen3Attention.forward is forward and modeling_qwen3.apply_rotary_pos_emb is not apply
    ropekit.unpatch()
    ropekit.apply_to_qwen3(rope=False, qk_norm_rope=True)
    assert modeling_qwen3.Qwen3Attention.forward is not forward and modeling_qwen3.apply_rotary_pos_emb is apply


def test_compile_patched_attention_fullgraph(unpatch_after):
    from transformers import Qwen3ForCausalLM

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu")
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(2, 12, 64)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(12)[None])
    ropekit.apply_to_qwen3()
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: attention(h, (cos, sin), None)[0], fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden), attention(hidden, (cos, sin), None)[0], rtol=0, atol=1e-6)


def test_table_is_not_in_state_dict(unpatch_after):
    from transformers import Qwen3ForCausalLM

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu")
    keys = set(model.state_dict())
    ropekit.apply_to_qwen3()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert "_ropekit_table" in vars(model.model.rotary_emb)
    assert set(model.state_dict()) == keys


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


def test_qwen3_vl_multimodal_logits_match(unpatch_after, count_fused):
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_qwen3_vl_config()
    model = build(Qwen3VLForConditionalGeneration, config, "cpu")
    inputs = multimodal_batch(config, torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(**inputs).logits
        ropekit.apply_to_qwen3_vl()
        ours = model(**inputs).logits
    assert count_fused
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


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


@pytest.mark.skipif(not has_qwen3_5(), reason="Qwen3.5 exists from transformers 5.x")
def test_qwen3_5_logits_and_grads_match(unpatch_after, count_fused):
    """Tiny Qwen3.5 (a linear-attention layer and a gated full-attention layer, zero-centred q/k norms)."""
    from transformers import Qwen3_5ForCausalLM

    config = tiny_qwen3_5_text_config(max_position_embeddings=256)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(10))

    def run():
        model = build(Qwen3_5ForCausalLM, config, "cpu", seed=11).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = run()
    ropekit.apply_to_qwen3_5()
    loss, ours = run()
    assert count_fused
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_norm_hooks_and_offload_fall_back_to_the_original_steps(unpatch_after, count_fused):
    """A forward hook on q_norm (or accelerate's instance-level forward) must still run: no fusion then."""
    from transformers import Qwen3ForCausalLM

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(12))
    seen = []
    handle = model.model.layers[0].self_attn.q_norm.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        ref = model(ids).logits
        ropekit.apply_to_qwen3()
        ours = model(ids).logits
    handle.remove()
    assert len(seen) == 2, "the hook ran with and without the patch"
    assert len(count_fused) == model.config.num_hidden_layers - 1, "only the hooked layer skipped the fusion"
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_apply_to_model_dispatches_on_model_type(unpatch_after):
    from transformers import Qwen3ForCausalLM
    from transformers.models.qwen3 import modeling_qwen3

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu")
    forward = modeling_qwen3.Qwen3Attention.forward
    ropekit.apply_to_model(model, qk_norm_rope=False)
    assert modeling_qwen3.Qwen3Attention.forward is forward  # the switch was passed on
    assert modeling_qwen3.apply_rotary_pos_emb.__ropekit_original__ is not None
    ropekit.apply_to_model(model)
    assert modeling_qwen3.Qwen3Attention.forward.__ropekit_original__ is forward

    class Llama:
        class config:
            model_type = "llama"

    with pytest.raises(ValueError, match="model_type 'llama' is not supported; supported: .*qwen3"):
        ropekit.apply_to_model(Llama())


def test_compile_whole_patched_model_fullgraph(unpatch_after, count_fused):
    """torch.compile(model, fullgraph=True) of a patched tiny Qwen3, forward and backward: no graph break (the
    unpatched model has none either), and the same loss and gradients as the patched model in eager."""
    from transformers import Qwen3ForCausalLM

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu").train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(13))
    ropekit.apply_to_qwen3()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    compiled_loss, compiled_grads = loss_and_grads(compiled)
    assert count_fused, "the fused op was traced into the graph"
    eager_loss, eager_grads = loss_and_grads(model)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
