"""Replacement for the attention forward of the families with per-head q/k norms (Qwen3, Qwen3-VL, Qwen3.5,
Qwen4-Exp) that runs q_norm / k_norm and RoPE as one fused op.

Everything else the forward does is kept: the KV-cache update (with 4.57's cache kwargs), the attention interface
lookup of each version, sliding window (Qwen3), Qwen3.5 / Qwen4-Exp's output gate and Qwen4-Exp's sparse-attention
indexer. The norm weights stay the modules' own parameters, so training updates them and checkpoints are unchanged.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from .. import ops
from ._patching import is_live, plain_tensors

_FUSABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _global_module_hooks() -> bool:
    """Hooks registered for every module (``torch.nn.modules.module.register_module_{forward,forward_pre,
    full_backward,full_backward_pre}_hook``)."""
    from torch.nn.modules import module as nn_module

    return bool(
        nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    )


_OUTPUT_CAPTURING = "transformers.utils.output_capturing"


def _has_hooks(module, attention: bool = False) -> bool:
    """Any forward, forward-pre, backward or backward-pre hook on this module. A fused layer skips the norms' calls
    and so their hooks (transformers' tensor parallelism all-reduces q_norm / k_norm weight gradients in a full
    backward hook), so any hook means the layer runs the original, unfused steps; so does any hook on the attention
    module itself. One exception (``attention=True``): transformers 5.x's own output-capturing forward hook, which
    it installs for good on every attention module the first time ``output_attentions`` / ``output_hidden_states``
    is asked for. It records the attention module's outputs, which the fused forward returns as well, so it sees
    the same thing either way; counting it would switch fusion off for the model's lifetime."""
    forward_hooks = module._forward_hooks.values()
    if attention:
        forward_hooks = [h for h in forward_hooks if getattr(h, "__module__", None) != _OUTPUT_CAPTURING]
    return bool(
        forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _accelerate_placement_only(norm, stock_forward) -> bool:
    """accelerate's ``AlignDevicesHook`` without offload (``device_map`` placement) around the stock forward only
    moves inputs to the device the weights already live on; once the caller checks they live beside the
    activations, skipping it is exact. Any other hook, or a hook around a replaced forward, must run."""
    hooks_module = sys.modules.get("accelerate.hooks")
    hook = vars(norm).get("_hf_hook")
    if hooks_module is None or hook is None:
        return False
    wrapper, wrapped = vars(norm).get("forward"), vars(norm).get("_old_forward")
    if not (
        getattr(getattr(wrapper, "func", None), "__module__", None) == hooks_module.__name__  # accelerate's partial
        and getattr(wrapped, "__func__", None) is stock_forward
        and getattr(wrapped, "__self__", None) is norm
    ):
        return False
    hooks = hook.hooks if type(hook) is hooks_module.SequentialHook else (hook,)
    return all(type(h) is hooks_module.AlignDevicesHook and not h.offload for h in hooks)


def _peft_active_module(norm):
    """The module PEFT's ``modules_to_save`` wrapper would run for ``norm`` (the trained copy of the active adapter,
    or the original when adapters are disabled), mirroring its forward; ``norm`` itself when it is not such a
    wrapper or when the wrapper would do anything else (hooks, e.g. mixed-adapter batches), so the caller falls
    back to calling it."""
    other = sys.modules.get("peft.utils.other")
    wrapper_cls = getattr(other, "ModulesToSaveWrapper", None)
    if wrapper_cls is None or type(norm) is not wrapper_cls or _has_hooks(norm):
        return norm
    try:
        active = norm.active_adapters
        if norm.disable_adapters or not active or any(name not in norm._adapters for name in active):
            return norm.original_module
        return norm.modules_to_save[active[0]]
    except (AttributeError, KeyError):  # another PEFT release: let its own forward decide
        return norm


def make_attention_forward(original, module, norm_cls_name: str, zero_centered: bool, gated: bool,
                           sliding_window: bool, *, indexer: bool = False, is_neox: bool = True,
                           partial: bool = False):
    """original: the unpatched ``<Family>Attention.forward``; module: its modeling module.

    ``zero_centered``: the norms are Qwen3.5 / Qwen4-Exp's ``(1 + w)`` RMSNorm; ``gated``: q_proj yields (query, gate)
    per head and the output is multiplied by ``sigmoid(gate)``; ``sliding_window``: passed to the attention interface
    (Qwen3); ``indexer``: Qwen4-Exp's sparse attention, whose indexer (run as the module it is) adds its token
    selection to the mask and whose cos/sin cover every key position (the queries take the last ``S``);
    ``is_neox``: the rotation style of the family's ``apply_rotary_pos_emb``; ``partial``: it rotates the first
    ``cos.shape[-1]`` channels and passes the rest through (a full-rotary family fails on a narrower cos/sin)."""
    norm_cls = getattr(module, norm_cls_name)
    norm_forward = norm_cls.forward  # the stock norm; anything else (another patcher) falls back to the original
    eager_attention = module.eager_attention_forward
    attention_functions = module.ALL_ATTENTION_FUNCTIONS
    takes_cache_position = "cache_position" in inspect.signature(original).parameters  # 4.57

    def norm_eps(norm):
        return norm.eps if zero_centered else norm.variance_epsilon

    def stock_forward(norm) -> bool:
        """No instance-level forward, or one that changes nothing: the class's own bound method (left behind by
        accelerate's remove_hook_from_module) or a placement-only accelerate hook."""
        forward = vars(norm).get("forward")
        return (
            forward is None
            or (getattr(forward, "__func__", None) is norm_forward and getattr(forward, "__self__", None) is norm)
            or _accelerate_placement_only(norm, norm_forward)
        )

    def stock_norm(norm, query) -> bool:
        """The transformers RMSNorm as shipped: no hook (forward, forward-pre, backward, backward-pre) or
        instance-level forward that would expect to run (accelerate offload), and its weight already where the
        activations are."""
        return (
            type(norm) is norm_cls
            and getattr(norm, "group_size", None) is None  # Qwen4-Exp's norm can normalise groups of channels
            and stock_forward(norm)
            and not _has_hooks(norm)
            and norm.weight.device == query.device
        )

    def fusable_norms(self, query, key, cos, sin):
        """(q_norm, k_norm) modules whose weights the fused op can use in their place, or None: fusion only where
        nothing observable would differ (no hook on the norms, on this attention module, or registered globally;
        stock norms; dtypes the op rounds exactly like transformers; plain tensors; cos/sin without grad)."""
        q_norm, k_norm = _peft_active_module(self.q_norm), _peft_active_module(self.k_norm)
        fusable = (
            norm_cls.forward is norm_forward
            and not _global_module_hooks()
            and not _has_hooks(self, attention=True)
            and stock_norm(q_norm, query)
            and stock_norm(k_norm, query)
            and norm_eps(q_norm) == norm_eps(k_norm)
            and query.dtype in _FUSABLE
            and q_norm.weight.dtype in (query.dtype, torch.float32)
            and k_norm.weight.dtype == q_norm.weight.dtype
            and isinstance(cos, torch.Tensor)
            and isinstance(sin, torch.Tensor)
            # the shapes the op takes (transformers' broadcasting takes more: cos/sin of seq 1, ...)
            and cos.dim() == 3
            and sin.shape == cos.shape
            and cos.shape[1] == query.shape[1]
            and cos.shape[0] in (1, query.shape[0])
            and cos.shape[2] % 2 == 0
            and cos.shape[2] <= query.shape[3]
            and (partial or cos.shape[2] == query.shape[3])
            and cos.dtype in (query.dtype, torch.float32)
            and sin.dtype == cos.dtype
            and cos.device == query.device
            and sin.device == query.device
            # the fused op differentiates q, k and the norm weights, not cos/sin (transformers makes them without
            # grad; a caller that scales them with a trainable factor gets the unfused steps, which do)
            and not (cos.requires_grad or sin.requires_grad)
            and plain_tensors(query, key, q_norm.weight, k_norm.weight, cos, sin)
        )
        return (q_norm, k_norm) if fusable else None

    def attention_interface(self):
        impl = self.config._attn_implementation
        if hasattr(attention_functions, "get_interface"):  # 5.x
            return attention_functions.get_interface(impl, eager_attention)
        return eager_attention if impl == "eager" else attention_functions[impl]

    @functools.wraps(original)
    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, *args, **kwargs):
        if not is_live(forward):  # a reference that outlived unpatch() (e.g. accelerate's _old_forward)
            return original(self, hidden_states, position_embeddings, attention_mask, past_key_values, *args,
                            **kwargs)
        cache_position = None
        if takes_cache_position and args:
            cache_position, args = args[0], args[1:]
        elif takes_cache_position:
            cache_position = kwargs.pop("cache_position", None)
        if args or (indexer and attention_mask is None):  # not a call transformers makes: the original decides
            return original(self, hidden_states, position_embeddings, attention_mask, past_key_values, *args,
                            **kwargs)
        if indexer:  # Qwen4-Exp: the indexer's token selection narrows the mask; queries take the last S positions
            selected = self.indexer(hidden_states, position_embeddings, attention_mask, past_key_values)
            if attention_mask.is_floating_point():
                attention_mask = attention_mask + selected
            else:
                attention_mask = attention_mask & selected
            position_embeddings = tuple(x[:, -hidden_states.shape[1]:, :] for x in position_embeddings)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings

        if gated:  # Qwen3.5: q_proj yields (query, gate) per head
            query, gate = torch.chunk(self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim * 2), 2, dim=-1)
            gate = gate.reshape(*input_shape, -1)
        else:
            query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        norms = fusable_norms(self, query, key, cos, sin)
        if norms is not None:
            q_norm, k_norm = norms
            query_states, key_states = ops.qk_norm_rope(
                query, key, q_norm.weight, k_norm.weight, cos, sin, norm_eps(q_norm), zero_centered, is_neox=is_neox
            )
        else:  # exactly the original's steps (e.g. a q_norm replaced by another library)
            query_states = self.q_norm(query).transpose(1, 2)
            key_states = self.k_norm(key).transpose(1, 2)
            query_states, key_states = module.apply_rotary_pos_emb(query_states, key_states, cos, sin)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if past_key_values is not None:
            if takes_cache_position:
                cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx,
                                                                  cache_kwargs)
            else:
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        extra = {"sliding_window": self.sliding_window} if sliding_window else {}
        attn_output, attn_weights = attention_interface(self)(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if gated:
            attn_output = attn_output * torch.sigmoid(gate)
        return self.o_proj(attn_output), attn_weights

    forward.__ropekit_original__ = original
    return forward
