"""Monkeypatches that route transformers' RoPE / mRoPE through ropekit's ops, for the Qwen3 families, the mRoPE
vision-language families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Qwen4-Exp, GLM-4V / GLM-4V-MoE / GLM-4.6V).

Methods and module functions are patched, never classes, so models built before patching pick the change up too
(and ``from_pretrained``'s buffer re-initialisation keeps working). ``unpatch()`` restores every original object.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

from ._patching import import_optional, patch, unpatch_all
from .attention import make_attention_forward
from .rope_index import MROPE_RULES, make_get_rope_index
from .rotary import RotaryLayout, make_apply_multimodal_rotary_pos_emb, make_apply_rotary_pos_emb, make_rotary_forward

__all__ = [
    "apply_to_qwen3", "apply_to_qwen3_vl", "apply_to_qwen3_5", "apply_to_qwen2_vl", "apply_to_qwen2_5_vl",
    "apply_to_qwen4_exp", "apply_to_glm4v", "apply_to_model", "unpatch",
]


@dataclass(frozen=True)
class _ModelingModule:
    """What ropekit patches in one transformers modeling module."""

    name: str  # transformers.models.<family>.modeling_<family>
    rotary: str | None  # text rotary embedding class (None: the module has none of its own, e.g. GLM-4.6V)
    mrope: str | None = None  # None: 1-D RoPE; "interleaved" (Qwen3-VL) or "sectioned" (Qwen2-VL, GLM-4V) mRoPE
    attention: str | None = None  # attention class whose forward runs q_norm / k_norm + RoPE (None: no q/k norms)
    norm: str | None = None  # its q_norm / k_norm class
    zero_centered: bool = False  # Qwen3.5 / Qwen4-Exp's (1 + w) norm
    gated: bool = False  # Qwen3.5 / Qwen4-Exp's output-gated attention
    sliding_window: bool = False  # Qwen3 passes sliding_window to the attention interface
    indexer: bool = False  # Qwen4-Exp's sparse-attention indexer (full-length cos/sin, k=None rotations)
    is_neox: bool = True  # False: GLM-4V rotates GPT-J pairs (rotate_half_llm, repeat_interleave(2) cos/sin)
    partial: bool = False  # apply_rotary_pos_emb passes channels past cos.shape[-1] through (partial rotary)
    vl_model: str | None = None  # class defining get_rope_index
    model_type: str | None = None  # its config.model_type (its rules in MROPE_RULES)


_FAMILIES = {
    "Qwen3": (
        _ModelingModule("transformers.models.qwen3.modeling_qwen3", "Qwen3RotaryEmbedding",
                        attention="Qwen3Attention", norm="Qwen3RMSNorm", sliding_window=True),
        _ModelingModule("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeRotaryEmbedding",
                        attention="Qwen3MoeAttention", norm="Qwen3MoeRMSNorm", sliding_window=True),
    ),
    "Qwen3-VL": (
        _ModelingModule("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextRotaryEmbedding", "interleaved",
                        attention="Qwen3VLTextAttention", norm="Qwen3VLTextRMSNorm", vl_model="Qwen3VLModel",
                        model_type="qwen3_vl"),
        _ModelingModule("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextRotaryEmbedding",
                        "interleaved", attention="Qwen3VLMoeTextAttention", norm="Qwen3VLMoeTextRMSNorm",
                        vl_model="Qwen3VLMoeModel", model_type="qwen3_vl_moe"),
    ),
    "Qwen3.5": (
        _ModelingModule("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5TextRotaryEmbedding", "interleaved",
                        attention="Qwen3_5Attention", norm="Qwen3_5RMSNorm", zero_centered=True, gated=True,
                        partial=True, vl_model="Qwen3_5Model", model_type="qwen3_5"),
        _ModelingModule("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeTextRotaryEmbedding",
                        "interleaved", attention="Qwen3_5MoeAttention", norm="Qwen3_5MoeRMSNorm", zero_centered=True,
                        gated=True, partial=True, vl_model="Qwen3_5MoeModel", model_type="qwen3_5_moe"),
    ),
    "Qwen2-VL": (  # no q/k norms: nothing to fuse
        _ModelingModule("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLRotaryEmbedding", "sectioned",
                        vl_model="Qwen2VLModel", model_type="qwen2_vl"),
    ),
    "Qwen2.5-VL": (
        _ModelingModule("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLRotaryEmbedding",
                        "sectioned", vl_model="Qwen2_5_VLModel", model_type="qwen2_5_vl"),
    ),
    "Qwen4-Exp": (
        _ModelingModule("transformers.models.qwen4_exp.modeling_qwen4_exp", "Qwen4ExpTextRotaryEmbedding",
                        "interleaved", attention="Qwen4ExpTextAttention", norm="Qwen4ExpTextRMSNorm",
                        zero_centered=True, gated=True, indexer=True, partial=True, vl_model="Qwen4ExpModel",
                        model_type="qwen4_exp"),
    ),
    "GLM-4V": (  # no q/k norms: nothing to fuse; GLM-4.6V runs GLM-4V's text model (its module has get_rope_index)
        _ModelingModule("transformers.models.glm4v.modeling_glm4v", "Glm4vTextRotaryEmbedding", "sectioned",
                        is_neox=False, partial=True, vl_model="Glm4vModel", model_type="glm4v"),
        _ModelingModule("transformers.models.glm4v_moe.modeling_glm4v_moe", "Glm4vMoeTextRotaryEmbedding", "sectioned",
                        partial=True, vl_model="Glm4vMoeModel", model_type="glm4v_moe"),
        _ModelingModule("transformers.models.glm46v.modeling_glm46v", None, vl_model="Glm46VModel",
                        model_type="glm46v"),
    ),
}


# family -> the config.model_type values it covers (MoE siblings and the text sub-configs included)
_FAMILY_MODEL_TYPES = {
    "Qwen3": ("qwen3", "qwen3_moe"),
    "Qwen3-VL": ("qwen3_vl", "qwen3_vl_text", "qwen3_vl_moe", "qwen3_vl_moe_text"),
    "Qwen3.5": ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"),
    "Qwen2-VL": ("qwen2_vl", "qwen2_vl_text"),
    "Qwen2.5-VL": ("qwen2_5_vl", "qwen2_5_vl_text"),
    "Qwen4-Exp": ("qwen4_exp", "qwen4_exp_text"),
    # transformers 4.57 spells GLM-4V-MoE's text model type "Glm4vMoe_text"
    "GLM-4V": ("glm4v", "glm4v_text", "glm4v_moe", "glm4v_moe_text", "Glm4vMoe_text", "glm46v"),
}
# families whose modeling code exists from transformers 5.x on only
_NEEDS_5 = {"Qwen3.5", "Qwen4-Exp"}
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


def _patch_rope(module, spec: _ModelingModule) -> None:
    rotary_cls = getattr(module, spec.rotary)
    # transformers 4.57's sectioned families return per-axis cos/sin and pick the sections in
    # apply_multimodal_rotary_pos_emb; 5.x recomposes them inside the rotary forward (detected by the function)
    per_axis = spec.mrope == "sectioned" and hasattr(module, "apply_multimodal_rotary_pos_emb")
    layout = RotaryLayout(spec.mrope, per_axis, spec.is_neox)
    patch(rotary_cls, "forward", make_rotary_forward(_unwrapped(rotary_cls.__dict__["forward"]), layout))
    if per_axis:
        patch(module, "apply_multimodal_rotary_pos_emb", make_apply_multimodal_rotary_pos_emb(
            _unwrapped(module.apply_multimodal_rotary_pos_emb), spec.is_neox, spec.partial,
            gptj_layout=not spec.is_neox))
    else:
        patch(module, "apply_rotary_pos_emb", make_apply_rotary_pos_emb(
            _unwrapped(module.apply_rotary_pos_emb), spec.is_neox, spec.partial))


def _apply(family: str, model, rope: bool, rope_index: bool, qk_norm_rope: bool) -> list[str]:
    _check_transformers_version()
    if model is not None:
        _check_model(family, model)
    patched = []
    for spec in _FAMILIES[family]:
        module = import_optional(spec.name)
        if module is None:
            continue
        if rope and spec.rotary is not None:
            _patch_rope(module, spec)
        if qk_norm_rope and spec.attention is not None:
            attention_cls = getattr(module, spec.attention)
            original = _unwrapped(attention_cls.__dict__["forward"])
            patch(attention_cls, "forward", make_attention_forward(
                original, module, spec.norm, spec.zero_centered, spec.gated, spec.sliding_window,
                indexer=spec.indexer, is_neox=spec.is_neox, partial=spec.partial))
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
            + (f" ({family} needs transformers 5.x)" if family in _NEEDS_5 else "")
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


def apply_to_qwen2_vl(model=None, *, rope: bool = True, rope_index: bool = True) -> None:
    """Route Qwen2-VL through ropekit (transformers 4.57.x and 5.x).

    ``rope``: the text rotary embedding gathers its sectioned-mRoPE cos/sin from the cached table (transformers 5.x
    recomposes the sections inside the rotary forward; 4.57 returns each axis's cos/sin, ``(3, B, S, D)``, and
    ``apply_multimodal_rotary_pos_emb`` picks the sections: the patched forward returns exactly what the original
    returns in each line), and the rotation runs as ``ropekit.apply_rope``.
    ``rope_index``: ``Qwen2VLModel.get_rope_index`` computed by ``ropekit.rope_index`` (whole-video grids),
    element-wise identical to transformers.
    Qwen2-VL's attention has no q/k norms, so there is nothing to fuse (no ``qk_norm_rope`` switch).
    ``model``: as for ``apply_to_qwen3``.
    """
    _apply("Qwen2-VL", model, rope, rope_index, qk_norm_rope=False)


def apply_to_qwen2_5_vl(model=None, *, rope: bool = True, rope_index: bool = True) -> None:
    """Route Qwen2.5-VL through ropekit (transformers 4.57.x and 5.x): as :func:`apply_to_qwen2_vl`, with
    Qwen2.5-VL's ``get_rope_index`` (temporal positions scaled by ``tokens_per_second * second_per_grid_ts`` in
    transformers' own arithmetic of each line). No q/k norms, nothing to fuse."""
    _apply("Qwen2.5-VL", model, rope, rope_index, qk_norm_rope=False)


def apply_to_qwen4_exp(model=None, *, rope: bool = True, rope_index: bool = True, qk_norm_rope: bool = True) -> None:
    """Route Qwen4-Exp (transformers 5.x) through ropekit: partial-rotary interleaved-mRoPE cos/sin from the table,
    ``apply_rotary_pos_emb`` as the native op (also its ``k=None`` form, which the sparse-attention indexer calls
    to rotate queries alone), ``get_rope_index``, and the indexed-attention layers' zero-centred q/k norm + RoPE
    fused (the indexer, its mask and the output gate are kept). ``model``: as for ``apply_to_qwen3``."""
    _apply("Qwen4-Exp", model, rope, rope_index, qk_norm_rope)


def apply_to_glm4v(model=None, *, rope: bool = True, rope_index: bool = True) -> None:
    """Route GLM-4V (``glm4v``), GLM-4V-MoE (``glm4v_moe``) and GLM-4.6V (``glm46v``, 5.x; it runs GLM-4V's text
    model) through ropekit, on transformers 4.57.x (GLM-4V, GLM-4V-MoE) and 5.x.

    ``rope``: sectioned-mRoPE cos/sin from the cached table, with partial rotary, and the rotation as
    ``ropekit.apply_rope``: GLM-4V rotates GPT-J pairs (``rotate_half_llm``, cos/sin in the ``repeat_interleave(2)``
    layout), GLM-4V-MoE rotates halves. Per line, the patched rotary forward returns what the original returns (5.x:
    the recomposed layout; 4.57: per-axis ``(3, B, S, D)``).
    ``rope_index``: each model's ``get_rope_index`` (video frames are image tokens marked video by
    ``mm_token_type_ids`` in 5.x, by the video brackets in 4.57) computed by ``ropekit.rope_index``.
    GLM-4V's attention has no q/k norms, so there is nothing to fuse (no ``qk_norm_rope`` switch).
    ``model``: as for ``apply_to_qwen3``.
    """
    _apply("GLM-4V", model, rope, rope_index, qk_norm_rope=False)


_APPLY = {"Qwen3": apply_to_qwen3, "Qwen3-VL": apply_to_qwen3_vl, "Qwen3.5": apply_to_qwen3_5,
          "Qwen2-VL": apply_to_qwen2_vl, "Qwen2.5-VL": apply_to_qwen2_5_vl, "Qwen4-Exp": apply_to_qwen4_exp,
          "GLM-4V": apply_to_glm4v}
# config.model_type -> the apply_to_* that covers it
_MODEL_TYPES = {model_type: _APPLY[family] for family, types_ in _FAMILY_MODEL_TYPES.items() for model_type in types_}


def apply_to_model(model, **switches) -> None:
    """Patch whatever family ``model`` belongs to, chosen from ``model.config.model_type``. Keyword switches are
    passed on (``rope``, ``qk_norm_rope``, ``rope_index`` where the family has it). ``qk_norm_rope`` is dropped for
    the families whose attention has no q/k norms (Qwen2-VL, Qwen2.5-VL, GLM-4V): there is nothing to fuse, so the
    switch changes nothing there; any other switch a family does not have is a ``TypeError``."""
    model_type = _model_type(model)
    apply = _MODEL_TYPES.get(model_type)
    if apply is None:
        raise ValueError(
            f"ropekit.apply_to_model: model_type {model_type!r} is not supported; supported: "
            + ", ".join(sorted(_MODEL_TYPES, key=str.lower))
        )
    if "qk_norm_rope" not in inspect.signature(apply).parameters:
        switches.pop("qk_norm_rope", None)
    apply(model, **switches)


def unpatch() -> None:
    """Undo every ropekit patch, restoring the original functions and methods (by identity)."""
    unpatch_all()
