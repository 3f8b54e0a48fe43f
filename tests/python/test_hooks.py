"""Fusion only where nothing observable changes: every kind of module hook on q_norm / k_norm, on the attention
module, or registered globally makes that layer run the original, unfused steps; the hook fires exactly as it
does unpatched, and the loss and every gradient equal the unpatched model's.

The issue this guards: the fused attention used to fall back only for norm *forward* hooks. A full backward hook on
q_norm (transformers' tensor parallelism all-reduces the q_norm / k_norm weight gradients in one) never fired when
patched, so TP gradients were wrong on every rank."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.modules import module as nn_module

import ropekit
from conftest import build, tiny_qwen3_config

pytestmark = pytest.mark.transformers


def tiny_qwen3():
    from transformers import Qwen3ForCausalLM

    return build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu", seed=3).train()


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _norm(model):
    return model.model.layers[0].self_attn.q_norm


def _attention(model):
    return model.model.layers[0].self_attn


# (where, how): each registers a hook that records that it ran, and returns its handle
HOOKS = {
    "norm_forward": lambda m, rec: _norm(m).register_forward_hook(lambda *a: rec.append(1)),
    "norm_forward_pre": lambda m, rec: _norm(m).register_forward_pre_hook(lambda *a: rec.append(1)),
    "norm_full_backward": lambda m, rec: _norm(m).register_full_backward_hook(lambda *a: rec.append(1)),
    "norm_full_backward_pre": lambda m, rec: _norm(m).register_full_backward_pre_hook(lambda *a: rec.append(1)),
    "attention_forward": lambda m, rec: _attention(m).register_forward_hook(lambda *a: rec.append(1)),
    "attention_forward_pre": lambda m, rec: _attention(m).register_forward_pre_hook(lambda *a: rec.append(1)),
    "attention_full_backward": lambda m, rec: _attention(m).register_full_backward_hook(lambda *a: rec.append(1)),
    "attention_full_backward_pre":
        lambda m, rec: _attention(m).register_full_backward_pre_hook(lambda *a: rec.append(1)),
}
GLOBAL_HOOKS = {
    "global_forward": lambda rec: nn_module.register_module_forward_hook(lambda *a: rec.append(1)),
    "global_forward_pre": lambda rec: nn_module.register_module_forward_pre_hook(lambda *a: rec.append(1)),
    "global_full_backward": lambda rec: nn_module.register_module_full_backward_hook(lambda *a: rec.append(1)),
    "global_full_backward_pre":
        lambda rec: nn_module.register_module_full_backward_pre_hook(lambda *a: rec.append(1)),
}


def run_both(model, ids, install):
    """Loss, grads and the hook's call count, unpatched then patched, with the hook installed by `install`."""
    results = []
    for patched in (False, True):
        ropekit.unpatch()
        if patched:
            ropekit.apply_to_qwen3()
        record = []
        handle = install(record)
        try:
            loss, grads = loss_and_grads(model, ids)
        finally:
            handle.remove()
        results.append((loss, grads, len(record)))
    return results


def assert_same(ref, ours):
    (ref_loss, ref_grads, ref_calls), (loss, grads, calls) = ref, ours
    assert calls == ref_calls and ref_calls > 0, f"hook ran {calls} times patched, {ref_calls} unpatched"
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", list(HOOKS))
def test_module_hook_unfuses_that_layer(unpatch_after, count_fused, kind):
    model = tiny_qwen3()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    ref, ours = run_both(model, ids, lambda rec: HOOKS[kind](model, rec))
    assert_same(ref, ours)
    layers = model.config.num_hidden_layers
    assert len(count_fused) == layers - 1, "only the hooked layer runs unfused"


@pytest.mark.parametrize("kind", list(GLOBAL_HOOKS))
def test_global_hook_unfuses_every_layer(unpatch_after, count_fused, kind):
    model = tiny_qwen3()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(6))
    ref, ours = run_both(model, ids, GLOBAL_HOOKS[kind])
    assert_same(ref, ours)
    assert not count_fused, "a global hook sees every norm call: nothing may be fused"


def test_backward_hook_on_k_norm_sees_its_gradients(unpatch_after, count_fused):
    """The hook's own view matches: the grad_output a full backward hook on k_norm receives is the same patched."""
    model = tiny_qwen3()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))
    seen = {}
    for patched in (False, True):
        ropekit.unpatch()
        if patched:
            ropekit.apply_to_qwen3()
        captured = []
        handle = model.model.layers[1].self_attn.k_norm.register_full_backward_hook(
            lambda mod, gin, gout: captured.append(gout[0].clone()))
        loss_and_grads(model, ids)
        handle.remove()
        seen[patched] = captured
    assert len(seen[True]) == len(seen[False]) == 1
    torch.testing.assert_close(seen[True][0], seen[False][0], rtol=1e-5, atol=1e-7)
    assert len(count_fused) == 1, "layer 0 stays fused"


def test_transformers_output_capturing_hook_keeps_fusion(unpatch_after, count_fused):
    """transformers 5.x installs a permanent forward hook on every attention module the first time
    output_attentions / output_hidden_states is asked for. It records the attention's outputs, which the fused
    forward returns too, so it must not switch fusion off for the rest of the model's life. (transformers 4.57
    instead swaps the attention's forward on the instance during such a call and leaves the bound original behind;
    `model=` re-binds it to the patch.)"""
    model = tiny_qwen3().eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        ropekit.apply_to_qwen3(model)
        ours = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        plain = model(input_ids=ids)
    hooked = bool(model.model.layers[0].self_attn._forward_hooks)
    assert len(count_fused) == 2 * model.config.num_hidden_layers, f"fused every layer twice (hooks: {hooked})"
    torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain.logits, ref.logits, rtol=0, atol=1e-5)
    for a, b in zip(ours.attentions, ref.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_hook_removed_fuses_again(unpatch_after, count_fused):
    model = tiny_qwen3()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(9))
    ropekit.apply_to_qwen3()
    handle = _norm(model).register_full_backward_hook(lambda *a: None)
    loss_and_grads(model, ids)
    assert len(count_fused) == model.config.num_hidden_layers - 1
    handle.remove()
    count_fused.clear()
    with contextlib.nullcontext():
        loss_and_grads(model, ids)
    assert len(count_fused) == model.config.num_hidden_layers
