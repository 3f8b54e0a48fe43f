"""The stacks ropekit is patched into: PEFT (LoRA on q_proj/k_proj, trainable q_norm/k_norm copies), accelerate's
instance-level hooks (device_map loading), a CUDA-graph captured decode step, and the guards on unsupported model
types and transformers releases."""

from __future__ import annotations

import pytest
import torch

import ropekit
from conftest import build, multimodal_batch, requires_cuda, tiny_qwen3_config, tiny_qwen3_vl_config

pytestmark = pytest.mark.transformers


def tiny_qwen3(seed=0):
    from transformers import Qwen3ForCausalLM

    return build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu", seed=seed)


def token_batch(seed, shape=(2, 14)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def lora_model(modules_to_save=None):
    """Tiny Qwen3 with LoRA on q_proj/k_proj; lora_B is randomised (PEFT initialises it to zero, which would make
    the adapters invisible) and so are the trainable norm copies."""
    peft = pytest.importorskip("peft", reason="PEFT integration: peft is in requirements/dev.txt")
    model = peft.get_peft_model(
        tiny_qwen3(seed=1),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], modules_to_save=modules_to_save),
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


def loss_and_trainable_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_peft_lora_on_q_k_proj(unpatch_after, count_fused):
    """LoRA wraps q_proj / k_proj; the patched attention calls them as modules, so the adapters run and train."""
    model = lora_model().train()
    ids = token_batch(3)
    ref_loss, ref_grads = loss_and_trainable_grads(model, ids)
    ropekit.apply_to_qwen3(model)
    loss, grads = loss_and_trainable_grads(model, ids)
    assert len(count_fused) == model.config.num_hidden_layers
    assert any("lora_A" in name for name in grads) and len(grads) == len(ref_grads)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_peft_trainable_norm_copies_are_fused(unpatch_after, count_fused):
    """modules_to_save=[q_norm, k_norm] wraps the norms; the fused op uses the active adapter's trained copy (and the
    original norm under disable_adapter()), and the copies' gradients match the unfused model's."""
    model = lora_model(modules_to_save=["q_norm", "k_norm"]).train()
    ids = token_batch(4)
    ref_loss, ref_grads = loss_and_trainable_grads(model, ids)
    with torch.no_grad(), model.disable_adapter():
        ref_disabled = model(input_ids=ids).logits
    ropekit.apply_to_qwen3(model)
    loss, grads = loss_and_trainable_grads(model, ids)
    layers = model.config.num_hidden_layers
    assert len(count_fused) == layers, "the wrapped norms took the fused path"
    assert any("modules_to_save" in name and "q_norm" in name for name in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad(), model.disable_adapter():
        disabled = model(input_ids=ids).logits
    assert len(count_fused) == 2 * layers
    torch.testing.assert_close(disabled, ref_disabled, rtol=0, atol=1e-5)
    assert not torch.allclose(disabled, model(input_ids=ids).logits, atol=1e-3), "the adapters change the logits"


def test_peft_lora_on_a_qwen3_vl_model(unpatch_after, count_fused, count_rope_index):
    """A LoRA-wrapped Qwen3-VL is recognised through PeftModel's config and trains on images + video unchanged."""
    peft = pytest.importorskip("peft", reason="PEFT integration: peft is in requirements/dev.txt")
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_qwen3_vl_config()
    model = peft.get_peft_model(build(Qwen3VLForConditionalGeneration, config, "cpu", seed=5),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    inputs = multimodal_batch(config, torch.Generator().manual_seed(6))
    inputs["labels"] = inputs["input_ids"]
    model.train()

    def loss_and_grads():
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    ropekit.apply_to_qwen3_vl(model)
    loss, grads = loss_and_grads()
    assert count_fused and count_rope_index, "the fused attention and the native rope_index ran"
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def dispatched(model):
    """What from_pretrained(device_map=...) does: accelerate's dispatch_model hooks every module (placement only,
    no offload), each hook keeping the bound forward it wrapped in _old_forward."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map={"": "cpu"}, main_device="cpu", force_hooks=True)


def test_accelerate_hooked_instances_are_patched_when_the_model_is_given(unpatch_after, count_fused):
    model = dispatched(tiny_qwen3())
    attention = model.model.layers[0].self_attn
    captured = attention._old_forward
    ids = token_batch(5)
    with torch.no_grad():
        ref = model(ids).logits
        ropekit.apply_to_qwen3()
        model(ids)
        assert not count_fused, "a class patch cannot reach a forward accelerate bound before patching"
        ropekit.apply_to_qwen3(model)
        ours = model(ids).logits
    assert len(count_fused) == model.config.num_hidden_layers, "placement-only hooks on q_norm/k_norm allow fusion"
    assert "_ropekit_table" in vars(model.model.rotary_emb)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    ropekit.unpatch()
    restored = attention._old_forward  # unpatch re-binds the original function: an equal bound method
    assert restored == captured and restored.__func__ is captured.__func__, "unpatch restores the instance attribute"


def test_forward_left_bound_by_remove_hook_is_patched(unpatch_after, count_fused):
    """accelerate's remove_hook_from_module leaves the old bound forward on the instance."""
    from accelerate.hooks import remove_hook_from_module

    model = dispatched(tiny_qwen3())
    remove_hook_from_module(model, recurse=True)
    assert "forward" in vars(model.model.layers[0].self_attn)
    ids = token_batch(6)
    with torch.no_grad():
        ref = model(ids).logits
        ropekit.apply_to_qwen3(model)
        ours = model(ids).logits
    assert len(count_fused) == model.config.num_hidden_layers
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_unpatch_reaches_forwards_captured_while_patched(unpatch_after, count_fused):
    """Patching before loading (accelerate then wraps the patched forward), or remove_hook_from_module after
    apply_to_qwen3(model): after unpatch() those leftover references run transformers' own code again."""
    from accelerate.hooks import remove_hook_from_module

    ids = token_batch(11)
    ropekit.apply_to_qwen3()
    early = dispatched(tiny_qwen3())
    late = dispatched(tiny_qwen3())
    ropekit.apply_to_qwen3(late)
    remove_hook_from_module(late, recurse=True)
    with torch.no_grad():
        early_patched, late_patched = early(ids).logits, late(ids).logits
    assert len(count_fused) == 2 * early.config.num_hidden_layers
    ropekit.unpatch()
    with torch.no_grad():
        early_after, late_after = early(ids).logits, late(ids).logits
    assert len(count_fused) == 2 * early.config.num_hidden_layers, "nothing ran ropekit after unpatch()"
    assert "forward" in vars(late.model.layers[0].self_attn)
    torch.testing.assert_close(early_after, early_patched, rtol=0, atol=1e-5)
    torch.testing.assert_close(late_after, late_patched, rtol=0, atol=1e-5)
    ropekit.apply_to_qwen3(early)  # a retired replacement in _old_forward is replaced by the live one
    with torch.no_grad():
        early(ids)
    assert len(count_fused) == 3 * early.config.num_hidden_layers


def test_patching_holds_no_reference_to_the_model(unpatch_after):
    import gc
    import weakref

    model = dispatched(tiny_qwen3())
    ropekit.apply_to_qwen3(model)
    attention = weakref.ref(model.model.layers[0].self_attn)
    del model
    gc.collect()
    assert attention() is None, "an instance patch kept the model alive"


def test_replaced_norm_forward_under_a_placement_hook_runs(unpatch_after, count_fused):
    """A kernelize-style forward wrapped by accelerate's placement hook is not the stock norm: it must run."""
    import types

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_qwen3()
    norm = model.model.layers[0].self_attn.q_norm
    stock = type(norm).forward
    norm.forward = types.MethodType(lambda self, x: stock(self, x) * 2, norm)
    add_hook_to_module(norm, AlignDevicesHook(execution_device=torch.device("cpu")))
    ids = token_batch(12)
    with torch.no_grad():
        ref = model(ids).logits
        ropekit.apply_to_qwen3(model)
        ours = model(ids).logits
    assert len(count_fused) == model.config.num_hidden_layers - 1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_wrapped_models_are_recognised(unpatch_after):
    """DataParallel / DDP (.module) and torch.compile (._orig_mod) wrappers are looked through."""
    model = tiny_qwen3()
    ropekit.apply_to_model(torch.nn.DataParallel(model))
    ropekit.apply_to_qwen3(torch.compile(model))
    with pytest.raises(ValueError, match="model_type None"):
        ropekit.apply_to_qwen3(torch.nn.Linear(2, 2))


def test_offloaded_norm_weights_fall_back(unpatch_after, count_fused):
    """An offloading hook loads the weights inside its pre-forward: the fused op must not run on meta weights."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_qwen3()
    ids = token_batch(7)
    with torch.no_grad():
        ref = model(ids).logits
    norm = model.model.layers[0].self_attn.q_norm
    weights = {"weight": norm.weight.detach().clone()}
    add_hook_to_module(norm, AlignDevicesHook(execution_device=torch.device("cpu"), offload=True, weights_map=weights))
    assert norm.weight.device.type == "meta"
    ropekit.apply_to_qwen3(model)
    with torch.no_grad():
        ours = model(ids).logits
    assert len(count_fused) == model.config.num_hidden_layers - 1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_norm_forward_replaced_on_the_instance_is_respected(unpatch_after, count_fused):
    """kernelize / use_kernels swap a hub kernel in as the norm instance's forward: that forward must run (the
    layer falls back to the unfused steps) while the other layers stay fused."""
    import types

    model = tiny_qwen3()
    ids = token_batch(10)
    norm = model.model.layers[1].self_attn.k_norm
    calls = []
    stock = type(norm).forward
    norm.forward = types.MethodType(lambda self, x: calls.append(1) or stock(self, x), norm)
    with torch.no_grad():
        ref = model(ids).logits
        ropekit.apply_to_qwen3(model)
        ours = model(ids).logits
    assert len(calls) == 2 and len(count_fused) == model.config.num_hidden_layers - 1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_model_of_another_family_is_refused(unpatch_after):
    from transformers import Qwen3VLForConditionalGeneration

    vl_model = build(Qwen3VLForConditionalGeneration, tiny_qwen3_vl_config(), "cpu")
    with pytest.raises(ValueError, match="apply_to_qwen3 patches model types qwen3, qwen3_moe; .* 'qwen3_vl'"):
        ropekit.apply_to_qwen3(vl_model)
    with pytest.raises(ValueError, match="apply_to_qwen3_5 patches model types qwen3_5, .*'qwen3'"):
        ropekit.apply_to_qwen3_5(tiny_qwen3())
    ropekit.apply_to_qwen3_vl(vl_model)
    ropekit.apply_to_qwen3_vl(vl_model.model.language_model)  # the text model's own type is covered too


@pytest.mark.parametrize("version", ["4.56.2", "6.0.0", "not-a-version", "4.57.0.dev0", "5.0.0rc1"])
def test_the_release_number_does_not_decide(unpatch_after, monkeypatch, count_fused, version):
    """What is checked at patch time is the installed code, never the version string: the same code under another
    version number is patched the same way (and unknown code is declined, tests/python/test_release_guard.py)."""
    import warnings

    import transformers

    from ropekit.transformers import RopekitDeclined

    monkeypatch.setattr(transformers, "__version__", version)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RopekitDeclined)
        ropekit.apply_to_qwen3()
    model = build(transformers.Qwen3ForCausalLM, tiny_qwen3_config(), "cpu")
    model(input_ids=torch.randint(0, 128, (1, 5)))
    assert count_fused


@requires_cuda
def test_cuda_graph_captures_a_patched_decode_step(unpatch_after, count_fused):
    """A decode step of the patched model (static KV cache, fused q/k norm + RoPE, table gather) is captured in a
    CUDA graph and replays to the eager step's logits, with new tokens and positions each replay."""
    from transformers import StaticCache

    model = tiny_qwen3(seed=8).cuda()
    ropekit.apply_to_qwen3(model)
    prompt = token_batch(9, (2, 10)).cuda()
    max_len = 24

    def fresh_cache():
        try:
            return StaticCache(config=model.config, max_cache_len=max_len)
        except TypeError:  # 4.57 wants the batch size and device up front
            return StaticCache(config=model.config, max_batch_size=2, max_cache_len=max_len, device="cuda",
                               dtype=torch.float32)

    def prefill(cache):
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(prompt.shape[1], device="cuda"))
        return out.logits[:, -1].argmax(-1, keepdim=True)

    static_token = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    static_position = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        graph_cache = fresh_cache()
        static_token.copy_(prefill(graph_cache))
        static_position.fill_(prompt.shape[1])

        def step():
            return model(input_ids=static_token, past_key_values=graph_cache, use_cache=True,
                         cache_position=static_position, position_ids=static_position.expand(2, 1)).logits

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up: the table and workspaces are allocated outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = step()

        eager_cache = fresh_cache()
        token = prefill(eager_cache)
        static_token.copy_(token)
        graph_cache.reset()
        prefill(graph_cache)
        fused_before = len(count_fused)
        for offset in range(4):
            position = prompt.shape[1] + offset
            static_position.fill_(position)
            graph.replay()
            eager = model(input_ids=token, past_key_values=eager_cache, use_cache=True,
                          cache_position=torch.tensor([position], device="cuda")).logits
            torch.testing.assert_close(static_logits, eager, rtol=0, atol=1e-5)
            token = eager[:, -1].argmax(-1, keepdim=True)
            static_token.copy_(token)
    assert len(count_fused) > fused_before, "the eager decode steps used the fused op (the graph replays it)"
