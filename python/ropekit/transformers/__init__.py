"""Monkeypatches that route transformers' Qwen3-family RoPE through ropekit's ops.

Methods and module functions are patched, never classes, so models built before patching pick the change up too
(and ``from_pretrained``'s buffer re-initialisation keeps working). ``unpatch()`` restores every original object.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from ._patching import import_optional, patch, unpatch_all
from .attention import make_attention_forward
from .rope_index import MROPE_RULES, make_get_rope_index
from .rotary import make_apply_rotary_pos_emb, make_rotary_forward

__all__ = ["apply_to_qwen3", "apply_to_qwen3_vl", "apply_to_qwen3_5", "apply_to_model", "unpatch"]


@dataclass(frozen=True)
class _ModelingModule:
    name: str  # transformers.models.<family>.modeling_<family>
    rotary: str  # rotary embedding class
    mrope: bool  # (3, B, S) interleaved mRoPE positions
    attention: str  # attention class whose forward runs q_norm / k_norm + RoPE
    norm: str  # its q_norm / k_norm class
    zero_centered: bool = False  # Qwen3.5's (1 + w) norm
    gated: bool = False  # Qwen3.5's output-gated attention
    sliding_window: bool = False  # Qwen3 passes sliding_window to the attention interface
    vl_model: str | None = None  # class defining get_rope_index
    model_type: str | None = None  # its config.model_type (its rules in MROPE_RULES)


_FAMILIES = {
    "Qwen3": (
        _ModelingModule("transformers.models.qwen3.modeling_qwen3", "Qwen3RotaryEmbedding", False,
                        "Qwen3Attention", "Qwen3RMSNorm", sliding_window=True),
        _ModelingModule("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeRotaryEmbedding", False,
                        "Qwen3MoeAttention", "Qwen3MoeRMSNorm", sliding_window=True),
    ),
    "Qwen3-VL": (
        _ModelingModule("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextRotaryEmbedding", True,
                        "Qwen3VLTextAttention", "Qwen3VLTextRMSNorm", vl_model="Qwen3VLModel", model_type="qwen3_vl"),
        _ModelingModule("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextRotaryEmbedding",
                        True, "Qwen3VLMoeTextAttention", "Qwen3VLMoeTextRMSNorm", vl_model="Qwen3VLMoeModel",
                        model_type="qwen3_vl_moe"),
    ),
    "Qwen3.5": (
        _ModelingModule("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5TextRotaryEmbedding", True,
                        "Qwen3_5Attention", "Qwen3_5RMSNorm", zero_centered=True, gated=True,
                        vl_model="Qwen3_5Model", model_type="qwen3_5"),
        _ModelingModule("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeTextRotaryEmbedding",
                        True, "Qwen3_5MoeAttention", "Qwen3_5MoeRMSNorm", zero_centered=True, gated=True,
                        vl_model="Qwen3_5MoeModel", model_type="qwen3_5_moe"),
    ),
}


# family -> the config.model_type values it covers (MoE siblings and the VL/3.5 text sub-configs included)
_FAMILY_MODEL_TYPES = {
    "Qwen3": ("qwen3", "qwen3_moe"),
    "Qwen3-VL": ("qwen3_vl", "qwen3_vl_text", "qwen3_vl_moe", "qwen3_vl_moe_text"),
    "Qwen3.5": ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"),
}
# The transformers lines whose modeling code the patches are written against (CI tests 4.57.6 and 5.18.0).
_TRANSFORMERS_LINES = "4.57.x and 5.x"


def _unwrapped(obj):
    return getattr(obj, "__ropekit_original__", obj)


def _check_transformers_version() -> None:
    """The patches replace methods whose signatures moved between releases: refuse lines they were not written for
    rather than misroute arguments."""
    import transformers
    from packaging.version import InvalidVersion, Version  # a transformers dependency

    try:
        major, minor = (Version(transformers.__version__).release + (0, 0))[:2]
    except InvalidVersion:
        major, minor = 0, 0
    if not ((major, minor) >= (4, 57) and major < 6):
        raise RuntimeError(
            f"ropekit: transformers {transformers.__version__} is not supported; ropekit patches transformers "
            f"{_TRANSFORMERS_LINES} (tested: 4.57.6, 5.17.0, 5.18.0)"
        )


def _unwrap_model(model):
    """The transformers model inside DDP / DataParallel (``.module``) or torch.compile (``._orig_mod``) wrappers;
    PeftModel needs no unwrapping (it forwards ``.config``)."""
    while getattr(model, "config", None) is None:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    return model


def _model_type(model) -> str | None:
    return getattr(getattr(_unwrap_model(model), "config", None), "model_type", None)


def _check_model(family: str, model) -> None:
    model_type = _model_type(model)
    if model_type not in _FAMILY_MODEL_TYPES[family]:
        raise ValueError(
            f"ropekit: {_APPLY[family].__name__} patches model types {', '.join(_FAMILY_MODEL_TYPES[family])}; the "
            f"model given has model_type {model_type!r} (ropekit.apply_to_model picks the right family)"
        )


def _patch_instance_forwards(model) -> None:
    """Reach modules whose forward was bound on the instance, where a class patch cannot reach it: accelerate's
    hooks (``from_pretrained(device_map=...)``) keep the forward they wrapped in ``_old_forward``, and
    ``remove_hook_from_module`` leaves that bound method behind as the instance's ``forward``. The bound function
    is the original, or a replacement from an earlier patch that ``unpatch()`` retired."""
    for module in model.modules():
        patched = getattr(type(module), "forward", None)
        original = getattr(patched, "__ropekit_original__", None)
        if original is None:
            continue
        for name in ("forward", "_old_forward"):
            bound = vars(module).get(name)
            function = getattr(bound, "__func__", None)
            if (
                getattr(bound, "__self__", None) is module
                and function is not patched
                and _unwrapped(function) is original
            ):
                patch(module, name, types.MethodType(patched, module))


def _apply(family: str, model, rope: bool, rope_index: bool, qk_norm_rope: bool) -> list[str]:
    _check_transformers_version()
    if model is not None:
        _check_model(family, model)
    patched = []
    for spec in _FAMILIES[family]:
        module = import_optional(spec.name)
        if module is None:
            continue
        if rope:
            rotary_cls = getattr(module, spec.rotary)
            patch(rotary_cls, "forward", make_rotary_forward(_unwrapped(rotary_cls.__dict__["forward"]), spec.mrope))
            patch(module, "apply_rotary_pos_emb", make_apply_rotary_pos_emb(_unwrapped(module.apply_rotary_pos_emb)))
        if qk_norm_rope:
            attention_cls = getattr(module, spec.attention)
            original = _unwrapped(attention_cls.__dict__["forward"])
            patch(attention_cls, "forward", make_attention_forward(
                original, module, spec.norm, spec.zero_centered, spec.gated, spec.sliding_window))
        if rope_index and spec.vl_model is not None:
            model_cls = getattr(module, spec.vl_model)
            patch(model_cls, "get_rope_index",
                  make_get_rope_index(_unwrapped(model_cls.__dict__["get_rope_index"]), MROPE_RULES[spec.model_type]))
        patched.append(spec.name)
    if not patched:
        import transformers

        raise RuntimeError(
            f"ropekit: transformers {transformers.__version__} has no {family} modeling module; ropekit supports "
            f"{family} on transformers {_TRANSFORMERS_LINES}"
            + (" (Qwen3.5 needs transformers 5.x)" if family == "Qwen3.5" else "")
        )
    if model is not None:
        _patch_instance_forwards(model)
    return patched


def apply_to_qwen3(model=None, *, rope: bool = True, qk_norm_rope: bool = True) -> None:
    """Route Qwen3 (and Qwen3-MoE) RoPE through ropekit.

    ``rope``: the rotary embedding gathers cos/sin from a cached fp32 table (bit-identical to transformers for
    static rope types) and ``apply_rotary_pos_emb`` runs as one native op.
    ``qk_norm_rope``: the attention forward runs ``q_norm`` / ``k_norm`` and RoPE as one fused op
    (``ropekit.qk_norm_rope``), keeping the KV cache, attention interface and sliding window as they were.
    ``model`` (optional, also a PEFT-wrapped model): checked to be a Qwen3 / Qwen3-MoE model, and its modules whose
    forward accelerate bound on the instance (``device_map`` loading) are patched too. Instances built before this
    call are reached either way: the patches are on the classes.
    """
    _apply("Qwen3", model, rope, rope_index=False, qk_norm_rope=qk_norm_rope)


def apply_to_qwen3_vl(model=None, *, rope: bool = True, rope_index: bool = True, qk_norm_rope: bool = True) -> None:
    """Route Qwen3-VL (and Qwen3-VL-MoE) through ropekit.

    ``rope``: cached interleaved-mRoPE cos/sin and the native ``apply_rotary_pos_emb`` for the text model.
    ``rope_index``: ``get_rope_index`` computed by ``ropekit.rope_index`` (host loop for CPU inputs, sync-free
    device algorithm for GPU inputs), element-wise identical to transformers.
    ``qk_norm_rope``: the text attention's q_norm / k_norm + RoPE as one fused op.
    ``model``: as for ``apply_to_qwen3``.
    """
    _apply("Qwen3-VL", model, rope, rope_index, qk_norm_rope)


def apply_to_qwen3_5(model=None, *, rope: bool = True, rope_index: bool = True, qk_norm_rope: bool = True) -> None:
    """Route Qwen3.5 (and Qwen3.5-MoE, transformers 5.x) through ropekit: partial-rotary mRoPE cos/sin with
    sections [11, 11, 10], the native ``apply_rotary_pos_emb`` (partial pass-through), ``get_rope_index``, and the
    full-attention layers' zero-centred q/k norm + RoPE fused (the output gate is kept). ``model``: as for
    ``apply_to_qwen3``."""
    _apply("Qwen3.5", model, rope, rope_index, qk_norm_rope)


_APPLY = {"Qwen3": apply_to_qwen3, "Qwen3-VL": apply_to_qwen3_vl, "Qwen3.5": apply_to_qwen3_5}
# config.model_type -> the apply_to_* that covers it
_MODEL_TYPES = {model_type: _APPLY[family] for family, types_ in _FAMILY_MODEL_TYPES.items() for model_type in types_}


def apply_to_model(model, **switches) -> None:
    """Patch whatever family ``model`` belongs to, chosen from ``model.config.model_type``. Keyword switches are
    passed on (``rope``, ``qk_norm_rope``, ``rope_index`` where the family has it)."""
    model_type = _model_type(model)
    apply = _MODEL_TYPES.get(model_type)
    if apply is None:
        raise ValueError(
            f"ropekit.apply_to_model: model_type {model_type!r} is not supported; supported: "
            + ", ".join(sorted(_MODEL_TYPES))
        )
    apply(model, **switches)


def unpatch() -> None:
    """Undo every ropekit patch, restoring the original functions and methods (by identity)."""
    unpatch_all()
