"""End to end, for every Qwen3-family model the patcher supports: tiny models built from transformers' config
classes (random weights, no downloads) give the same fp32 logits, the same greedy generate() tokens and the same
training-step gradients (gradient checkpointing on and off) patched and unpatched, text-only with a left-padded
ragged batch and, for the VL families, with images, a 2-frame video and left padding. Each test also checks the
patch really ran: the rotary table was built, every full-attention layer of every forward ran the fused q/k norm +
RoPE, and every get_rope_index call went through ropekit.rope_index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import ropekit

from conftest import (build, has_qwen3_5, multimodal_batch, tiny_qwen3_5_config, tiny_qwen3_5_text_config,
                      tiny_qwen3_config, tiny_qwen3_moe_config, tiny_qwen3_vl_config)

pytestmark = pytest.mark.transformers

NEW_TOKENS = 32
PAD, EOS = 0, 1  # prompts use ids 2..127: no pad, no EOS, no vision token among them
# min_new_tokens == max_new_tokens: EOS is masked out at every step, so all 32 steps run for every row.
GREEDY = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=EOS,
              pad_token_id=PAD)


@dataclass(frozen=True)
class Family:
    cls: str  # transformers class, looked up lazily (Qwen3.5 classes exist from 5.x only)
    config: Callable
    apply: Callable  # the family's entry point (the generate tests use ropekit.apply_to_model instead)
    vl: bool = False  # a conditional-generation model with a vision tower and get_rope_index

    def build(self):
        import transformers

        return build(getattr(transformers, self.cls), self.config(), "cpu")


_NEEDS_5 = pytest.mark.skipif(
    not has_qwen3_5(), reason=f"Qwen3.5 needs transformers 5.x (installed: {__import__('transformers').__version__})")
FAMILIES = [
    pytest.param(Family("Qwen3ForCausalLM", tiny_qwen3_config, ropekit.apply_to_qwen3), id="qwen3"),
    pytest.param(Family("Qwen3MoeForCausalLM", tiny_qwen3_moe_config, ropekit.apply_to_qwen3), id="qwen3_moe"),
    pytest.param(Family("Qwen3VLForConditionalGeneration", tiny_qwen3_vl_config, ropekit.apply_to_qwen3_vl, vl=True),
                 id="qwen3_vl"),
    pytest.param(Family("Qwen3VLMoeForConditionalGeneration", lambda: tiny_qwen3_vl_config(moe=True),
                        ropekit.apply_to_qwen3_vl, vl=True), id="qwen3_vl_moe"),
    pytest.param(Family("Qwen3_5ForCausalLM", tiny_qwen3_5_text_config, ropekit.apply_to_qwen3_5),
                 id="qwen3_5_text", marks=_NEEDS_5),
    pytest.param(Family("Qwen3_5MoeForCausalLM", lambda: tiny_qwen3_5_text_config(moe=True),
                        ropekit.apply_to_qwen3_5), id="qwen3_5_moe_text", marks=_NEEDS_5),
    pytest.param(Family("Qwen3_5ForConditionalGeneration", tiny_qwen3_5_config, ropekit.apply_to_qwen3_5, vl=True),
                 id="qwen3_5", marks=_NEEDS_5),
    pytest.param(Family("Qwen3_5MoeForConditionalGeneration", lambda: tiny_qwen3_5_config(moe=True),
                        ropekit.apply_to_qwen3_5, vl=True), id="qwen3_5_moe", marks=_NEEDS_5),
]
VL_FAMILIES = [param for param in FAMILIES if param.values[0].vl]


def text_batch():
    """Three rows of 19, 12 and 7 tokens, left-padded to 19 (attention_mask with leading zeros)."""
    gen = torch.Generator().manual_seed(0)
    lengths = (19, 12, 7)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(2, 128, (n,), generator=gen)
        mask[row, -n:] = 1
    return dict(input_ids=ids, attention_mask=mask)


def language_model(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


def spy_get_rope_index(model):
    """Counts this instance's get_rope_index calls, whichever implementation (patched or not) its class has."""
    calls = []
    inner = model.model
    if hasattr(type(inner), "get_rope_index"):  # the VL models

        def spy(*args, **kwargs):
            calls.append(1)
            return type(inner).get_rope_index(inner, *args, **kwargs)

        inner.get_rope_index = spy
    return calls


def greedy(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + NEW_TOKENS), "all 32 steps"
    return out


def assert_patch_ran(model, fused_calls, forwards, rope_index_calls, get_rope_index_calls, multimodal=False):
    """Every full-attention layer (Qwen3.5's linear-attention layers have none) of every forward ran the fused op,
    the patched rotary forward served cos/sin from its table, and every get_rope_index call went to
    ropekit.rope_index. Text-only inputs reach get_rope_index on 4.57 only (5.x skips it without image/video
    grids); multimodal inputs always do."""
    attention_layers = sum(hasattr(layer, "self_attn") for layer in language_model(model).layers)
    assert attention_layers >= 1
    assert len(fused_calls) == forwards * attention_layers, "a patched forward skipped the fused q/k norm + RoPE"
    assert "_ropekit_table" in vars(language_model(model).rotary_emb), "the patched rotary was not used"
    assert len(rope_index_calls) == len(get_rope_index_calls), "a get_rope_index call bypassed ropekit.rope_index"
    if multimodal:
        assert rope_index_calls, "the patched get_rope_index was not used"


@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_match(unpatch_after, count_fused, count_rope_index, family):
    """fp32 logits of a left-padded ragged text batch, patched through the family's apply_to_* entry point."""
    model = family.build()
    inputs = text_batch()
    if not family.vl:  # generate-style positions; the VL models compute their own (3, B, S) positions
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(**inputs).logits
        family.apply()  # after the model was built: the patched methods reach it through its class
        calls = spy_get_rope_index(model)
        ours = model(**inputs).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert_patch_ran(model, count_fused, 1, count_rope_index, calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_text_same_tokens(unpatch_after, count_fused, count_rope_index, family):
    """Greedy generate of 32 tokens from a left-padded ragged text batch (mask-derived positions carried through
    32 KV-cached steps): the same tokens, patched through apply_to_model."""
    model = family.build()
    inputs = text_batch()
    ref = greedy(model, inputs)
    ropekit.apply_to_model(model)
    calls = spy_get_rope_index(model)
    ours = greedy(model, inputs)
    assert torch.equal(ours, ref)
    assert_patch_ran(model, count_fused, NEW_TOKENS, count_rope_index, calls)


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_multimodal_logits_match(unpatch_after, count_fused, count_rope_index, family):
    """fp32 logits with two images, a 2-frame video and a left-padded row: the mRoPE positions come from the
    patched get_rope_index, the rotary from the table, the q/k norm + RoPE from the fused op."""
    model = family.build()
    inputs = multimodal_batch(model.config, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_deltas = model.model.rope_deltas.clone()
        family.apply()
        calls = spy_get_rope_index(model)
        ours = model(**inputs).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert torch.equal(model.model.rope_deltas, ref_deltas)
    assert_patch_ran(model, count_fused, 1, count_rope_index, calls, multimodal=True)


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_generate_multimodal_same_tokens(unpatch_after, count_fused, count_rope_index, family):
    """Greedy generate of 32 tokens after images, a 2-frame video and a left-padded row: the prompt's mRoPE
    positions and rope deltas come from the patched get_rope_index (4.57 decodes with those deltas; 5.x continues
    from the prompt's last positions, so the deltas are compared directly)."""
    model = family.build()
    inputs = multimodal_batch(model.config, torch.Generator().manual_seed(2))
    ref = greedy(model, inputs)
    ref_deltas = model.model.rope_deltas.clone()
    ropekit.apply_to_model(model)
    calls = spy_get_rope_index(model)
    ours = greedy(model, inputs)
    assert torch.equal(ours, ref)
    assert torch.equal(model.model.rope_deltas, ref_deltas)  # 5.x's generate continues positions without them
    assert_patch_ran(model, count_fused, NEW_TOKENS, count_rope_index, calls, multimodal=True)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_matches(unpatch_after, count_fused, family, checkpointing):
    """One training step, with and without gradient checkpointing: the same loss and the same gradient for every
    parameter (vision tower included; the VL models train on images, a video and a left-padded row)."""
    if family.vl:
        inputs = multimodal_batch(family.config(), torch.Generator().manual_seed(3))
    else:
        inputs = text_batch()
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def step():
        model = family.build().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(**inputs).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return model, loss.detach(), grads

    _, ref_loss, ref_grads = step()
    family.apply()
    model, loss, grads = step()
    assert set(grads) == set(ref_grads) and any("q_norm" in name for name in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    attention_layers = sum(hasattr(layer, "self_attn") for layer in language_model(model).layers)
    assert len(count_fused) == (2 if checkpointing else 1) * attention_layers, "checkpointing recomputes the fused op"


@pytest.mark.parametrize("family", [FAMILIES[0], FAMILIES[2]])
def test_gradient_penalty_matches(unpatch_after, count_fused, family):
    """create_graph=True through a patched model (the loss plus a penalty on the gradients of every q/k projection,
    the vision tower's qkv included): the same gradients as transformers' (to float32 rounding), the fused op run."""
    inputs = multimodal_batch(family.config(), torch.Generator().manual_seed(3)) if family.vl else text_batch()
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def step():
        model = family.build().train()
        loss = model(**inputs).loss
        params = [p for n, p in model.named_parameters() if any(s in n for s in ("q_proj", "k_proj", "qkv"))]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        (loss + sum(g.square().sum() for g in grads)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = step()
    family.apply()
    vision_calls = []
    real = ropekit.ops.apply_rope_vision
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ropekit.ops, "apply_rope_vision", lambda *a, **k: vision_calls.append(1) or real(*a, **k))
        got = step()
    assert count_fused and set(got) == set(ref)
    assert bool(vision_calls) == family.vl, "the vision tower's rotation ran natively too"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
