"""Monkeypatches that route transformers' RoPE / mRoPE through ropekit's ops, for the Qwen3 families, the mRoPE
vision-language families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Qwen4-Exp, GLM-4V / GLM-4V-MoE / GLM-4.6V) and the
5.x model types built on their code (PaddleOCR-VL, GLM-OCR, Cosmos3-Omni / Cosmos3-Edge, Cohere Compass,
ERNIE-4.5-VL, HunYuan-VL, HY-V4-VL) and the Omni thinkers.

Methods and module functions are patched, never classes, so models built before patching pick the change up too
(and ``from_pretrained``'s buffer re-initialisation keeps working). ``unpatch()`` restores every original object.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from dataclasses import dataclass

from . import _guard
from ._patching import import_optional, patch, unpatch_all
from .attention import derive_attention_forward
from .coverage import NOT_SUPPORTED
from .rope_index import MROPE_RULES, make_get_rope_index
from .rotary import (RotaryLayout, make_apply_multimodal_rotary_pos_emb, make_apply_rotary_pos_emb,
                     make_layered_rotary_forward, make_rotary_forward)
from .vision import POSITION_HELPERS, VisionTower, make_apply_rotary_pos_emb_vision, make_position_helper

__all__ = [
    "apply_to_qwen3", "apply_to_qwen3_vl", "apply_to_qwen3_5", "apply_to_qwen2_vl", "apply_to_qwen2_5_vl",
    "apply_to_qwen4_exp", "apply_to_glm4v", "apply_to_paddleocr_vl", "apply_to_glm_ocr", "apply_to_cosmos3",
    "apply_to_cohere_compass", "apply_to_ernie4_5_vl", "apply_to_hunyuan_vl", "apply_to_hy_v4_vl",
    "apply_to_qwen2_5_omni",
    "apply_to_qwen3_omni_moe", "apply_to_model", "unpatch", "support_report", "PatchStatus",
    "RopekitDeclined",
]
RopekitDeclined = _guard.RopekitDeclined


@dataclass(frozen=True)
class _ModelingModule:
    """What ropekit patches in one transformers modeling module."""

    name: str  # transformers.models.<family>.modeling_<family>
    rotary: str | None  # text rotary embedding class (None: the module has none of its own, e.g. GLM-4.6V)
    # None: 1-D RoPE; "interleaved" (Qwen3-VL) or "sectioned" (Qwen2-VL, GLM-4V) mRoPE; "layered": a rotary per
    # layer type whose own recomposition_frequencies lays out the axes (Cohere Compass); "recomposed": one rotary
    # whose own recomposition_frequencies does, over len(mrope_section) axes (ERNIE-4.5-VL, HunYuan-VL)
    mrope: str | None = None
    float32_cos: bool = False  # the rotary returns float32 cos/sin whatever x's dtype (ERNIE-4.5-VL)
    attention: str | None = None  # attention class whose forward runs q_norm / k_norm + RoPE (None: no q/k norms)
    norm: str | None = None  # its q_norm / k_norm class
    zero_centered: bool = False  # Qwen3.5 / Qwen4-Exp's (1 + w) norm
    is_neox: bool = True  # False: GLM-4V rotates GPT-J pairs (rotate_half_llm, repeat_interleave(2) cos/sin)
    partial: bool = False  # apply_rotary_pos_emb passes channels past cos.shape[-1] through (partial rotary)
    upcast: bool = False  # apply_rotary_pos_emb rotates in float32 and casts back to q's dtype (ERNIE-4.5-VL)
    vl_model: str | None = None  # class defining get_rope_index
    model_type: str | None = None  # its config.model_type (its rules in MROPE_RULES)
    vision: VisionTower | None = None  # the vision tower (its module-level apply_rotary_pos_emb_vision, 4.57 helpers)
    borrowed: bool = False  # another family's module this one runs (Cosmos3-Omni: Qwen3-VL's): not its own presence
    # the module-level rotation (apply_rotary_pos_emb) is patched with the rotary; False: the module has none that
    # ropekit's op computes (HY-V4-VL's MLA rotates with apply_rotary_pos_emb_interleave), only the rotary is served
    rotation: bool = True


_FAMILIES = {
    "Qwen3": (
        _ModelingModule("transformers.models.qwen3.modeling_qwen3", "Qwen3RotaryEmbedding",
                        attention="Qwen3Attention", norm="Qwen3RMSNorm"),
        _ModelingModule("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeRotaryEmbedding",
                        attention="Qwen3MoeAttention", norm="Qwen3MoeRMSNorm"),
    ),
    "Qwen3-VL": (
        _ModelingModule("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextRotaryEmbedding", "interleaved",
                        attention="Qwen3VLTextAttention", norm="Qwen3VLTextRMSNorm", vl_model="Qwen3VLModel",
                        model_type="qwen3_vl",
                        vision=VisionTower("Qwen3VLVisionModel", "Qwen3VLVisionRotaryEmbedding")),
        _ModelingModule("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextRotaryEmbedding",
                        "interleaved", attention="Qwen3VLMoeTextAttention", norm="Qwen3VLMoeTextRMSNorm",
                        vl_model="Qwen3VLMoeModel", model_type="qwen3_vl_moe",
                        vision=VisionTower("Qwen3VLMoeVisionModel", "Qwen3VLMoeVisionRotaryEmbedding")),
    ),
    "Qwen3.5": (
        _ModelingModule("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5TextRotaryEmbedding", "interleaved",
                        attention="Qwen3_5Attention", norm="Qwen3_5RMSNorm", zero_centered=True,
                        partial=True, vl_model="Qwen3_5Model", model_type="qwen3_5",
                        vision=VisionTower("Qwen3_5VisionModel")),
        _ModelingModule("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeTextRotaryEmbedding",
                        "interleaved", attention="Qwen3_5MoeAttention", norm="Qwen3_5MoeRMSNorm", zero_centered=True,
                        partial=True, vl_model="Qwen3_5MoeModel", model_type="qwen3_5_moe",
                        vision=VisionTower("Qwen3_5MoeVisionModel")),
    ),
    "Qwen2-VL": (  # no q/k norms: nothing to fuse
        _ModelingModule("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLRotaryEmbedding", "sectioned",
                        vl_model="Qwen2VLModel", model_type="qwen2_vl",
                        vision=VisionTower("Qwen2VisionTransformerPretrainedModel", "VisionRotaryEmbedding")),
    ),
    "Qwen2.5-VL": (
        _ModelingModule("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLRotaryEmbedding",
                        "sectioned", vl_model="Qwen2_5_VLModel", model_type="qwen2_5_vl",
                        vision=VisionTower("Qwen2_5_VisionTransformerPretrainedModel",
                                           "Qwen2_5_VisionRotaryEmbedding")),
    ),
    "Qwen4-Exp": (
        _ModelingModule("transformers.models.qwen4_exp.modeling_qwen4_exp", "Qwen4ExpTextRotaryEmbedding",
                        "interleaved", attention="Qwen4ExpTextAttention", norm="Qwen4ExpTextRMSNorm",
                        zero_centered=True, partial=True, vl_model="Qwen4ExpModel",
                        model_type="qwen4_exp", vision=VisionTower("Qwen4ExpVisionModel")),
    ),
    "GLM-4V": (  # no q/k norms: nothing to fuse; GLM-4.6V runs GLM-4V's text model (its module has get_rope_index)
        _ModelingModule("transformers.models.glm4v.modeling_glm4v", "Glm4vTextRotaryEmbedding", "sectioned",
                        is_neox=False, partial=True, vl_model="Glm4vModel", model_type="glm4v",
                        vision=VisionTower("Glm4vVisionModel", "Glm4vVisionRotaryEmbedding", returns_pos_ids=True)),
        _ModelingModule("transformers.models.glm4v_moe.modeling_glm4v_moe", "Glm4vMoeTextRotaryEmbedding", "sectioned",
                        partial=True, vl_model="Glm4vMoeModel", model_type="glm4v_moe",
                        vision=VisionTower("Glm4vMoeVisionModel", "Glm4vMoeVisionRotaryEmbedding",
                                           returns_pos_ids=True)),
        _ModelingModule("transformers.models.glm46v.modeling_glm46v", None, vl_model="Glm46VModel",
                        model_type="glm46v"),
    ),
    # The families below are transformers 5.x model types whose code is that of a family above (same fingerprints:
    # the rotary forward, apply_rotary_pos_emb and get_rope_index each match a known function), under their own
    # modeling modules and classes.
    "PaddleOCR-VL": (  # Qwen2-VL's text rotary and index; a SigLIP tower calling apply_rotary_pos_emb_vision
        _ModelingModule("transformers.models.paddleocr_vl.modeling_paddleocr_vl", "PaddleOCRRotaryEmbedding",
                        "sectioned", vl_model="PaddleOCRVLModel", model_type="paddleocr_vl",
                        vision=VisionTower("PaddleOCRVisionModel")),
    ),
    "GLM-OCR": (  # GLM-4V's text model and index; no q/k norms in the text attention
        _ModelingModule("transformers.models.glm_ocr.modeling_glm_ocr", "GlmOcrTextRotaryEmbedding", "sectioned",
                        is_neox=False, partial=True, vl_model="GlmOcrModel", model_type="glm_ocr",
                        vision=VisionTower("GlmOcrVisionModel")),
    ),
}
_FAMILIES["Cohere-Compass"] = (
    # a rotary per layer type ("layered": recomposed by its own recomposition_frequencies), Qwen3-VL's
    # apply_rotary_pos_emb and get_rope_index, no q/k norms, a Qwen3-VL-style tower
    _ModelingModule("transformers.models.cohere_compass.modeling_cohere_compass", "CohereCompassRotaryEmbedding",
                    "layered", vl_model="CohereCompassModel", model_type="cohere_compass",
                    vision=VisionTower("CohereCompassVisionModel")),
)
_FAMILIES["ERNIE-4.5-VL"] = (
    # Qwen2-VL's 5.x index with a temporal merge for videos; a rotary with pre-rotated h/w frequencies laid out by its
    # own recomposition_frequencies (GPT-J pairs, left in float32); a float32 GPT-J rotation cast back to q's dtype;
    # no q/k norms; a tower calling apply_rotary_pos_emb_vision
    _ModelingModule("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe", "Ernie4_5_VLMoeTextRotaryEmbedding",
                    "recomposed", float32_cos=True, is_neox=False, upcast=True, vl_model="Ernie4_5_VLMoeModel",
                    model_type="ernie4_5_vl_moe",
                    vision=VisionTower("Ernie4_5_VLMoeVisionTransformerPretrainedModel")),
)
_FAMILIES["HunYuan-VL"] = (
    # XD-RoPE: len(mrope_section) >= 3 axes, each a section of cat((f, f)), laid out by the rotary's own
    # recomposition_frequencies; a float32 rotation (q.float() first) cast back; q/k norms after the rotation (nothing
    # to fuse); its own get_rope_index (convention "xdrope"); a tower without a rotary
    _ModelingModule("transformers.models.hunyuan_vl.modeling_hunyuan_vl", "HunYuanVLRotaryEmbedding", "recomposed",
                    upcast=True, vl_model="HunYuanVLModel", model_type="hunyuan_vl"),
)
_FAMILIES["HY-V4-VL"] = (
    # Qwen3-VL's interleaved layout written as a recomposition of cos/sin (its own recomposition_frequencies); an MLA
    # text model (DeepSeek-style apply_rotary_pos_emb_interleave on the rope slice: transformers' code, no module
    # apply_rotary_pos_emb), no q/k norms around the rotation; its own get_rope_index (convention "frame_blocks":
    # frames of rows ending in a newline token, each frame a block of positions); a tower without a rotary
    _ModelingModule("transformers.models.hy_v4_vl.modeling_hy_v4_vl", "HYV4VLRotaryEmbedding", "recomposed",
                    vl_model="HYV4VLModel", model_type="hy_v4_vl", rotation=False),
)
_FAMILIES["Qwen2.5-Omni"] = (
    # the thinker's text rotary (Qwen2.5-VL's sectioned code; 4.57: per-axis cos/sin and
    # apply_multimodal_rotary_pos_emb) and the get_rope_index thinker and talker call, defined on their shared base
    # class: audio spans, time scaled by position_id_per_seconds, audio in video by chunks; the vision tower's rotation
    # (from 5.17 Qwen2.5-VL's apply_rotary_pos_emb_vision; up to 5.16, 4.57 included, a (tensor, freqs) form left to
    # transformers without a warning). Its audio encoder has sinusoidal positions added to its inputs: no rotary.
    _ModelingModule("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni", "Qwen2_5OmniRotaryEmbedding",
                    "sectioned", vl_model="Qwen2_5OmniPreTrainedModelForConditionalGeneration",
                    model_type="qwen2_5_omni", vision=VisionTower("Qwen2_5OmniVisionEncoder", helpers=False)),
)
_FAMILIES["Qwen3-Omni"] = (
    # as Qwen2.5-Omni with Qwen3-VL's interleaved rotary (the talker's subclasses it); its positions are float32: the
    # rotary forward serves CPU ones that hold integers from the table and hands the others to transformers' code (no
    # table serves a fractional position; on CUDA the check would be a host sync); the rotation is the op; the
    # thinker's text attention (the talker's decoder layers use it too) has Qwen3's per-head q/k norms: fused with the
    # rotation, whatever positions made cos/sin; get_rope_index interleaves audio with video token by token; the
    # vision tower's rotation (Qwen3-VL's apply_rotary_pos_emb_vision); no rotary in the audio encoder
    _ModelingModule("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe",
                    "Qwen3OmniMoeThinkerTextRotaryEmbedding", "interleaved",
                    attention="Qwen3OmniMoeThinkerTextAttention", norm="Qwen3OmniMoeThinkerTextRMSNorm",
                    vl_model="Qwen3OmniMoePreTrainedModelForConditionalGeneration", model_type="qwen3_omni_moe",
                    vision=VisionTower("Qwen3OmniMoeVisionEncoder", helpers=False)),
)
_FAMILIES["Cosmos3"] = (
    # Cosmos3-Omni builds Qwen3-VL's text model and tower (AutoModel of qwen3_vl_text / qwen3_vl_vision) and has
    # Qwen3-VL's get_rope_index in its own module
    dataclasses.replace(_FAMILIES["Qwen3-VL"][0], vl_model=None, model_type=None, borrowed=True),
    _ModelingModule("transformers.models.cosmos3_omni.modeling_cosmos3_omni", None, vl_model="Cosmos3OmniModel",
                    model_type="cosmos3_omni"),
    # Cosmos3-Edge: Qwen3-VL's interleaved text rotary, no q/k norms, a SigLIP2 tower without a rotary; its
    # get_rope_index is Qwen3-VL's with a .clone() of the split video grid
    _ModelingModule("transformers.models.cosmos3_edge.modeling_cosmos3_edge", "Cosmos3EdgeTextRotaryEmbedding",
                    "interleaved", vl_model="Cosmos3EdgeModel", model_type="cosmos3_edge"),
)


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
    "PaddleOCR-VL": ("paddleocr_vl", "paddleocr_vl_text"),
    "GLM-OCR": ("glm_ocr", "glm_ocr_text"),
    "Cosmos3": ("cosmos3_omni", "cosmos3_edge", "cosmos3_edge_text"),
    "Cohere-Compass": ("cohere_compass", "cohere_compass_text"),
    "ERNIE-4.5-VL": ("ernie4_5_vl_moe", "ernie4_5_vl_moe_text"),
    "HunYuan-VL": ("hunyuan_vl", "hunyuan_vl_text"),
    "HY-V4-VL": ("hy_v4_vl", "hy_v4_vl_text"),
    "Qwen2.5-Omni": ("qwen2_5_omni", "qwen2_5_omni_thinker", "qwen2_5_omni_talker"),
    "Qwen3-Omni": ("qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_talker"),
}
# families whose modeling code exists in 5.x releases only: the first release that has it
_NEEDS = {"Qwen3.5": "5.x", "Qwen4-Exp": "5.x", "PaddleOCR-VL": "5.0.0 or later", "GLM-OCR": "5.1.0 or later",
          "Cosmos3": "5.11.0 or later (Cosmos3-Edge: 5.15.0)", "Cohere-Compass": "5.16.0 or later",
          "ERNIE-4.5-VL": "5.0.0 or later", "HunYuan-VL": "5.13.0 or later", "HY-V4-VL": "5.24.0 or later"}
# The transformers lines the patches support; within them, each function is checked against known code at patch time.
_TRANSFORMERS_LINES = "4.57.x and 5.x"


def _unwrapped(obj):
    return getattr(obj, "__ropekit_original__", obj)


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


@dataclass
class PatchStatus:
    """One row of the support report: what ropekit did with one transformers object for one switch."""

    family: str
    module: str  # modeling module tail (qwen3, qwen3_vl_moe, ...)
    switch: str  # rope, qk_norm_rope, rope_index, vision_rope, vision_positions
    target: str  # the transformers object (Qwen3Attention.forward, apply_rotary_pos_emb, ...)
    patched: bool
    reason: str = ""  # why it was declined; the releases whose code it matched when patched
    # not patched on purpose: code ropekit knows, in a form it leaves to transformers (not a decline: no warning,
    # and ``python -m ropekit`` does not count it)
    left: bool = False

    def line(self) -> str:
        state = "patched " if self.patched else "left    " if self.left else "DECLINED"
        return f"{state}  {self.family:<10} {self.switch:<12} {self.module}.{self.target}: {self.reason}"


def _tail(module) -> str:
    return module.__name__.rsplit(".", 1)[-1].removeprefix("modeling_")


def _known(module, qualname: str, obj, owner=None) -> tuple[bool, str]:
    """(known, the releases it matched or why not) for the installed code of ``module.qualname``."""
    if obj is None:
        return False, "not present"
    function = _guard.underlying(obj)
    if function is None:
        return False, f"{type(obj).__name__} is not a function ropekit can read (an unknown wrapper)"
    fingerprint = _guard.live_fingerprint(function, owner)
    releases = _guard.known_releases(module.__name__, qualname, fingerprint)
    if releases is None:
        entry = _guard.recorded(module.__name__, qualname, fingerprint)
        if entry:
            return False, (f"its code (fingerprint {fingerprint}) is that of transformers {entry['releases']}, "
                           f"which ropekit's suite has not been run on")
        return False, (f"its code (fingerprint {fingerprint}) is not that of any transformers release ropekit "
                       f"knows")
    return True, f"the code of transformers {releases}"


class _Plan:
    """The patches of one apply_to_* call, decided before any is installed."""

    def __init__(self, family: str, warn: bool = True):
        self.family, self.warn = family, warn
        self.patches: list[tuple[object, str, object]] = []
        self.rows: list[PatchStatus] = []

    def leave(self, module, switch: str, target: str, reason: str) -> None:
        """A row for code ropekit knows and deliberately leaves to transformers (a form its op does not replace): no
        warning, not a decline."""
        self.rows.append(PatchStatus(self.family, _tail(module), switch, target, False, reason, left=True))

    def accept(self, module, switch: str, target: str, why: str, owner, name: str, replacement) -> None:
        self.rows.append(PatchStatus(self.family, _tail(module), switch, target, True, why))
        self.patches.append((owner, name, replacement))

    def decline(self, module, switch: str, target: str, reason: str) -> None:
        self.rows.append(PatchStatus(self.family, _tail(module), switch, target, False, reason))
        if self.warn:
            _guard.decline(f"{module.__name__}.{target} ({self.family}, {switch}=True)", reason)


def _rope_function(module, spec: _ModelingModule):
    """(name, installed object) of the module-level rotation ropekit replaces: transformers 4.57's sectioned
    families return per-axis cos/sin and pick the sections in apply_multimodal_rotary_pos_emb; 5.x recomposes them
    inside the rotary forward (detected by the function)."""
    per_axis = spec.mrope == "sectioned" and hasattr(module, "apply_multimodal_rotary_pos_emb")
    name = "apply_multimodal_rotary_pos_emb" if per_axis else "apply_rotary_pos_emb"
    return name, _unwrapped(getattr(module, name, None))


def _hub_routing(function):
    """(is a kernels Hub-kernel wrapper, its routing check or None where its internals are unknown)."""
    if _guard.hub_kernel_inner(function) is None:
        return False, None
    return True, _guard.hub_kernel_routing(function)


def _plan_rope(plan: _Plan, module, spec: _ModelingModule) -> None:
    rotary_cls = getattr(module, spec.rotary, None)
    target = f"{spec.rotary}.forward"
    original = _unwrapped(vars(rotary_cls).get("forward")) if rotary_cls is not None else None
    name, function = _rope_function(module, spec)
    per_axis = name == "apply_multimodal_rotary_pos_emb"
    ok, why = _known(module, target, original, rotary_cls)
    if ok:
        if spec.mrope in ("layered", "recomposed"):
            recompose = getattr(rotary_cls, "recomposition_frequencies", None)  # part of the checked code
            replacement = make_layered_rotary_forward(original, recompose, layered=spec.mrope == "layered",
                                                      float32_cos=spec.float32_cos)
        else:
            replacement = make_rotary_forward(original, RotaryLayout(spec.mrope, per_axis, spec.is_neox))
        plan.accept(module, "rope", target, why, rotary_cls, "forward", replacement)
    else:
        plan.decline(module, "rope", target, why)
    if not spec.rotation:
        return
    ok, why = _known(module, name, function)
    wrapped, routed = _hub_routing(function) if ok else (False, None)
    if ok and wrapped and routed is None:
        ok, why = False, "its kernels Hub-kernel wrapper is not one ropekit knows"
    if not ok:
        plan.decline(module, "rope", name, why)
        return
    if wrapped:
        why += " (inside kernels' Hub-kernel wrapper, which still runs wherever kernelize selected a kernel)"
    if per_axis:
        replacement = make_apply_multimodal_rotary_pos_emb(function, spec.is_neox, spec.partial,
                                                           gptj_layout=not spec.is_neox)
    else:
        replacement = make_apply_rotary_pos_emb(function, spec.is_neox, spec.partial, routed=routed,
                                                upcast=spec.upcast)
    plan.accept(module, "rope", name, why, module, name, replacement)


def _plan_attention(plan: _Plan, module, spec: _ModelingModule) -> None:
    """The fused forward, derived from the installed one. The fused op stands in for the norm's forward and the
    rotation, so both must be code ropekit reproduces."""
    target = f"{spec.attention}.forward"
    attention_cls, norm_cls = getattr(module, spec.attention, None), getattr(module, spec.norm, None)
    if attention_cls is None or norm_cls is None:
        plan.decline(module, "qk_norm_rope", target, "not present")
        return
    ok, why = _known(module, f"{spec.norm}.forward", vars(norm_cls).get("forward"), norm_cls)
    if not ok:
        plan.decline(module, "qk_norm_rope", target, f"{spec.norm}.forward: {why}")
        return
    name, function = _rope_function(module, spec)
    ok, why = _known(module, name, function)
    wrapped, routed = _hub_routing(function) if ok else (False, None)
    if not ok or (wrapped and routed is None):
        plan.decline(module, "qk_norm_rope", target, f"{name}: {why if not ok else 'an unknown kernels wrapper'}")
        return
    replacement, reason = derive_attention_forward(attention_cls, module, spec.norm, spec.zero_centered,
                                                   is_neox=spec.is_neox, partial=spec.partial, rope_routed=routed,
                                                   rope_function=function)
    if replacement is None:
        plan.decline(module, "qk_norm_rope", target, f"its forward is not of a shape ropekit transforms: {reason}")
        return
    plan.accept(module, "qk_norm_rope", target, f"derived from the installed forward; norm and rotation: {why}",
                attention_cls, "forward", replacement)


def _plan_rope_index(plan: _Plan, module, spec: _ModelingModule) -> None:
    target = f"{spec.vl_model}.get_rope_index"
    model_cls = getattr(module, spec.vl_model, None)
    original = _unwrapped(vars(model_cls).get("get_rope_index")) if model_cls is not None else None
    ok, why = _known(module, target, original, model_cls)
    if not ok:
        plan.decline(module, "rope_index", target, why)
        return
    plan.accept(module, "rope_index", target, why, model_cls, "get_rope_index",
                make_get_rope_index(original, MROPE_RULES[spec.model_type]))


def _plan_vision_rope(plan: _Plan, module, spec: _ModelingModule) -> None:
    name = "apply_rotary_pos_emb_vision"
    function = _unwrapped(getattr(module, name, None))
    ok, why = _known(module, name, function)
    if ok and list(inspect.signature(function).parameters) != ["q", "k", "cos", "sin"]:
        # Qwen2.5-Omni up to 5.16 rotates one tensor by its freqs, (tensor, freqs): known code, in a form the op does
        # not replace; left as it is, with a row in the report and no warning
        plan.leave(module, "vision_rope", name, f"{why}, whose (tensor, freqs) form ropekit leaves to transformers "
                   f"(it replaces the (q, k, cos, sin) form)")
        return
    if not ok:
        plan.decline(module, "vision_rope", name, why)
        return
    plan.accept(module, "vision_rope", name, why, module, name, make_apply_rotary_pos_emb_vision(function))


def _plan_vision_positions(plan: _Plan, module, spec: _ModelingModule) -> None:
    """transformers 4.57's tower helpers (methods of the tower class). A 5.x tower has none: it takes its positions
    precomputed (``ropekit.data``), so there is nothing to patch and no row."""
    tower = spec.vision
    if not tower.helpers:
        return
    tower_cls = getattr(module, tower.cls, None)
    for name in POSITION_HELPERS:
        original = _unwrapped(vars(tower_cls).get(name)) if tower_cls is not None else None
        if original is None:
            continue
        target = f"{tower.cls}.{name}"
        ok, why = _known(module, target, original, tower_cls)
        if ok and name == "rot_pos_emb":  # it calls the rotary module with an int where transformers passes a tensor
            rotary_cls = getattr(module, tower.rotary, None) if tower.rotary else None
            rotary_forward = vars(rotary_cls).get("forward") if rotary_cls is not None else None
            known, rotary_why = _known(module, f"{tower.rotary}.forward", rotary_forward, rotary_cls)
            if not known:
                ok, why = False, f"{tower.rotary}.forward: {rotary_why}"
        if not ok:
            plan.decline(module, "vision_positions", target, why)
            continue
        plan.accept(module, "vision_positions", target, why, tower_cls, name,
                    make_position_helper(name, original, tower, module))


def _plan(family: str, rope: bool, rope_index: bool, qk_norm_rope: bool, specs=None, warn: bool = True,
          vision_rope: bool = False, vision_positions: bool = False) -> tuple[_Plan, list[str]]:
    plan, present = _Plan(family, warn), []
    for spec in specs if specs is not None else _FAMILIES[family]:
        module = import_optional(spec.name)
        if module is None:
            continue
        if not spec.borrowed:
            present.append(spec.name)
        if rope and spec.rotary is not None:
            _plan_rope(plan, module, spec)
        if qk_norm_rope and spec.attention is not None:
            _plan_attention(plan, module, spec)
        if rope_index and spec.vl_model is not None:
            _plan_rope_index(plan, module, spec)
        if vision_rope and spec.vision is not None:
            _plan_vision_rope(plan, module, spec)
        if vision_positions and spec.vision is not None:
            _plan_vision_positions(plan, module, spec)
    return plan, present


def _apply(family: str, model, rope: bool, rope_index: bool, qk_norm_rope: bool, specs=None,
           vision_rope: bool = False, vision_positions: bool = False) -> list[PatchStatus]:
    """Decide every patch of the family (each checked against the installed code; what is not known is declined
    with one warning and left as it is), install the accepted ones, and return the rows of the support report."""
    if model is not None:
        _check_model(family, model)
    plan, present = _plan(family, rope, rope_index, qk_norm_rope, specs, vision_rope=vision_rope,
                          vision_positions=vision_positions)
    if not present:
        import transformers

        raise RuntimeError(
            f"ropekit: transformers {transformers.__version__} has no {family} modeling module; ropekit supports "
            f"{family} on transformers {_TRANSFORMERS_LINES}"
            + (f" ({family} needs transformers {_NEEDS[family]})" if family in _NEEDS else "")
        )
    for owner, name, replacement in plan.patches:
        patch(owner, name, replacement)
    if model is not None:
        _patch_instance_forwards(model)
    return plan.rows


def support_report() -> list[PatchStatus]:
    """What every ``apply_to_*`` would patch on the installed transformers, all switches on, and why anything is
    declined, computed without installing anything and without warnings (families whose modeling modules the
    installed release lacks are left out). ``python -m ropekit`` prints these rows."""
    rows = []
    for family in _FAMILIES:
        rows += _plan(family, rope=True, rope_index=True, qk_norm_rope=True, warn=False, vision_rope=True,
                      vision_positions=True)[0].rows
    return rows


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


def apply_to_qwen3_vl(model=None, *, rope: bool = True, rope_index: bool = True, qk_norm_rope: bool = True,
                      vision_rope: bool = True, vision_positions: bool = True) -> None:
    """Route Qwen3-VL (and Qwen3-VL-MoE) through ropekit.

    ``rope``: cached interleaved-mRoPE cos/sin and the native ``apply_rotary_pos_emb`` for the text model.
    ``rope_index``: ``get_rope_index`` computed by ``ropekit.rope_index`` (host loop for CPU inputs, sync-free
    device algorithm for GPU inputs), element-wise identical to transformers.
    ``qk_norm_rope``: the text attention's q_norm / k_norm + RoPE as one fused op.
    ``vision_rope``: the vision tower's ``apply_rotary_pos_emb_vision`` as ``ropekit.apply_rope_vision`` (one pass,
    bit-identical forward and backward). ``vision_positions``: under transformers 4.57, the tower's position helpers
    (``rot_pos_emb``, ``get_window_index``, ``fast_pos_embed_interpolate``) computed natively with one host read of
    ``grid_thw`` each (5.x towers take their positions precomputed: ``ropekit.data.MRopeCollator(vision=model)``).
    ``model``: as for ``apply_to_qwen3``.
    """
    _apply("Qwen3-VL", model, rope, rope_index, qk_norm_rope, vision_rope=vision_rope,
           vision_positions=vision_positions)


def apply_to_qwen3_5(model=None, *, rope: bool = True, rope_index: bool = True, qk_norm_rope: bool = True,
                     vision_rope: bool = True, vision_positions: bool = True) -> None:
    """Route Qwen3.5 (and Qwen3.5-MoE, transformers 5.x) through ropekit: partial-rotary mRoPE cos/sin with
    sections [11, 11, 10], the native ``apply_rotary_pos_emb`` (partial pass-through), ``get_rope_index``, and the
    full-attention layers' zero-centred q/k norm + RoPE fused (the output gate is kept); ``vision_rope`` /
    ``vision_positions`` as for :func:`apply_to_qwen3_vl`. ``model``: as for ``apply_to_qwen3``."""
    _apply("Qwen3.5", model, rope, rope_index, qk_norm_rope, vision_rope=vision_rope,
           vision_positions=vision_positions)


def apply_to_qwen2_vl(model=None, *, rope: bool = True, rope_index: bool = True, vision_rope: bool = True,
                      vision_positions: bool = True) -> None:
    """Route Qwen2-VL through ropekit (transformers 4.57.x and 5.x).

    ``rope``: the text rotary embedding gathers its sectioned-mRoPE cos/sin from the cached table (transformers 5.x
    recomposes the sections inside the rotary forward; 4.57 returns each axis's cos/sin, ``(3, B, S, D)``, and
    ``apply_multimodal_rotary_pos_emb`` picks the sections: the patched forward returns exactly what the original
    returns in each line), and the rotation runs as ``ropekit.apply_rope``.
    ``rope_index``: ``Qwen2VLModel.get_rope_index`` computed by ``ropekit.rope_index`` (whole-video grids),
    element-wise identical to transformers.
    Qwen2-VL's attention has no q/k norms, so there is nothing to fuse (no ``qk_norm_rope`` switch).
    ``vision_rope`` / ``vision_positions``: as for :func:`apply_to_qwen3_vl`.
    ``model``: as for ``apply_to_qwen3``.
    """
    _apply("Qwen2-VL", model, rope, rope_index, qk_norm_rope=False, vision_rope=vision_rope,
           vision_positions=vision_positions)


def apply_to_qwen2_5_vl(model=None, *, rope: bool = True, rope_index: bool = True, vision_rope: bool = True,
                        vision_positions: bool = True) -> None:
    """Route Qwen2.5-VL through ropekit (transformers 4.57.x and 5.x): as :func:`apply_to_qwen2_vl`, with
    Qwen2.5-VL's ``get_rope_index`` (temporal positions scaled by ``tokens_per_second * second_per_grid_ts`` in
    transformers' own arithmetic of each line). No q/k norms, nothing to fuse. ``vision_positions`` (4.57) also
    covers the tower's window-attention order (``get_window_index``)."""
    _apply("Qwen2.5-VL", model, rope, rope_index, qk_norm_rope=False, vision_rope=vision_rope,
           vision_positions=vision_positions)


def apply_to_qwen4_exp(model=None, *, rope: bool = True, rope_index: bool = True, qk_norm_rope: bool = True,
                       vision_rope: bool = True, vision_positions: bool = True) -> None:
    """Route Qwen4-Exp (transformers 5.x) through ropekit: partial-rotary interleaved-mRoPE cos/sin from the table,
    ``apply_rotary_pos_emb`` as the native op (also its ``k=None`` form, which the sparse-attention indexer calls
    to rotate queries alone), ``get_rope_index``, and the indexed-attention layers' zero-centred q/k norm + RoPE
    fused (the indexer, its mask and the output gate are kept); ``vision_rope`` / ``vision_positions`` as for
    :func:`apply_to_qwen3_vl`. ``model``: as for ``apply_to_qwen3``."""
    _apply("Qwen4-Exp", model, rope, rope_index, qk_norm_rope, vision_rope=vision_rope,
           vision_positions=vision_positions)


def apply_to_glm4v(model=None, *, rope: bool = True, rope_index: bool = True, vision_rope: bool = True,
                   vision_positions: bool = True) -> None:
    """Route GLM-4V (``glm4v``), GLM-4V-MoE (``glm4v_moe``) and GLM-4.6V (``glm46v``, 5.x; it runs GLM-4V's text
    model) through ropekit, on transformers 4.57.x (GLM-4V, GLM-4V-MoE) and 5.x.

    ``rope``: sectioned-mRoPE cos/sin from the cached table, with partial rotary, and the rotation as
    ``ropekit.apply_rope``: GLM-4V rotates GPT-J pairs (``rotate_half_llm``, cos/sin in the ``repeat_interleave(2)``
    layout), GLM-4V-MoE rotates halves. Per line, the patched rotary forward returns what the original returns (5.x:
    the recomposed layout; 4.57: per-axis ``(3, B, S, D)``).
    ``rope_index``: each model's ``get_rope_index`` (video frames are image tokens marked video by
    ``mm_token_type_ids`` in 5.x, by the video brackets in 4.57) computed by ``ropekit.rope_index``.
    GLM-4V's attention has no q/k norms, so there is nothing to fuse (no ``qk_norm_rope`` switch).
    ``vision_rope`` / ``vision_positions``: as for :func:`apply_to_qwen3_vl` (GLM-4.6V's tower is GLM-4V's).
    ``model``: as for ``apply_to_qwen3``.
    """
    _apply("GLM-4V", model, rope, rope_index, qk_norm_rope=False, vision_rope=vision_rope,
           vision_positions=vision_positions)


def apply_to_paddleocr_vl(model=None, *, rope: bool = True, rope_index: bool = True,
                          vision_rope: bool = True) -> None:
    """Route PaddleOCR-VL (``paddleocr_vl``, transformers 5.x) through ropekit. Its text model is Qwen2-VL's
    (sectioned mRoPE, no q/k norms: nothing to fuse) and its ``get_rope_index`` is Qwen2-VL's (images; whole-video
    grids), so ``rope`` and ``rope_index`` are :func:`apply_to_qwen2_vl`'s on PaddleOCR-VL's own classes.
    ``vision_rope``: the SigLIP tower's ``apply_rotary_pos_emb_vision`` as ``ropekit.apply_rope_vision``. The tower
    computes its positions itself (no position helper to patch). ``model``: as for ``apply_to_qwen3``."""
    _apply("PaddleOCR-VL", model, rope, rope_index, qk_norm_rope=False, vision_rope=vision_rope)


def apply_to_glm_ocr(model=None, *, rope: bool = True, rope_index: bool = True, vision_rope: bool = True) -> None:
    """Route GLM-OCR (``glm_ocr``, transformers 5.x) through ropekit: its text model and ``get_rope_index`` are
    GLM-4V's (GPT-J-pair sectioned mRoPE with partial rotary; video frames in ``<|begin_of_video|>`` brackets,
    marked by ``mm_token_type_ids``), so ``rope`` and ``rope_index`` are :func:`apply_to_glm4v`'s on GLM-OCR's
    classes; no q/k norms in the text attention, nothing to fuse. ``vision_rope``: the tower's
    ``apply_rotary_pos_emb_vision`` as ``ropekit.apply_rope_vision``. ``model``: as for ``apply_to_qwen3``."""
    _apply("GLM-OCR", model, rope, rope_index, qk_norm_rope=False, vision_rope=vision_rope)


def apply_to_cosmos3(model=None, *, rope: bool = True, rope_index: bool = True, qk_norm_rope: bool = True,
                     vision_rope: bool = True, vision_positions: bool = True) -> None:
    """Route Cosmos3-Omni (``cosmos3_omni``) and Cosmos3-Edge (``cosmos3_edge``), transformers 5.x, through ropekit.

    Cosmos3-Omni runs Qwen3-VL's text model and vision tower: ``rope``, ``qk_norm_rope``, ``vision_rope`` and
    ``vision_positions`` are :func:`apply_to_qwen3_vl`'s, and ``rope_index`` patches ``Cosmos3OmniModel``'s own
    ``get_rope_index`` (Qwen3-VL's). Cosmos3-Edge has Qwen3-VL's interleaved-mRoPE text rotary (``rope``), no q/k
    norms, a SigLIP2 tower without a rotary, and Qwen3-VL's ``get_rope_index`` (videos split into frames;
    ``rope_index``). ``model``: as for ``apply_to_qwen3``."""
    _apply("Cosmos3", model, rope, rope_index, qk_norm_rope, vision_rope=vision_rope,
           vision_positions=vision_positions)


def apply_to_cohere_compass(model=None, *, rope: bool = True, rope_index: bool = True,
                            vision_rope: bool = True, vision_positions: bool = True) -> None:
    """Route Cohere Compass (``cohere_compass``, transformers 5.x; also its text-only ``cohere_compass_text``)
    through ropekit.

    ``rope``: its rotary has one inv_freq per layer type (NoPE layer types have none and stay rotation-free); each
    layer type's cos/sin is gathered from a cached table of its own and laid out by the module's own
    ``recomposition_frequencies``, which the releases changed (5.16-5.18: sections h, w, t in (i + 1) % 3 order;
    5.19 on: interleaved): bit for bit either way. The rotation runs as ``ropekit.apply_rope``. No q/k norms in the
    attention, nothing to fuse. ``rope_index``: ``CohereCompassModel.get_rope_index`` (Qwen3-VL's). ``vision_rope`` /
    ``vision_positions``: as for :func:`apply_to_qwen3_vl` (its tower is Qwen3-VL's kind). ``model``: as for
    ``apply_to_qwen3``."""
    _apply("Cohere-Compass", model, rope, rope_index, qk_norm_rope=False, vision_rope=vision_rope,
           vision_positions=vision_positions)


def apply_to_ernie4_5_vl(model=None, *, rope: bool = True, rope_index: bool = True,
                         vision_rope: bool = True) -> None:
    """Route ERNIE-4.5-VL (``ernie4_5_vl_moe``, transformers 5.x; also its text model ``ernie4_5_vl_moe_text``)
    through ropekit.

    ``rope``: its rotary's inv_freq is pre-rotated on the h/w frequencies and the module's own
    ``recomposition_frequencies`` lays the axes out (sections h, w, t in (i + 1) % 3 order, h and w interleaved,
    GPT-J pairs); each axis's cos/sin is gathered from a cached table and recomposed by that method, left in float32
    as transformers leaves it. Its ``apply_rotary_pos_emb`` rotates GPT-J pairs in float32 and casts back to q's
    dtype: ``ropekit.apply_rope`` on float32 cos/sin, then the same cast. No q/k norms, nothing to fuse.
    ``rope_index``: ``Ernie4_5_VLMoeModel.get_rope_index`` (Qwen2-VL's 5.x index; a video's ``t`` divided by
    ``vision_config.temporal_merge_size``). ``vision_rope``: the tower's ``apply_rotary_pos_emb_vision`` as
    ``ropekit.apply_rope_vision``; the tower computes its positions itself. ``model``: as for ``apply_to_qwen3``."""
    _apply("ERNIE-4.5-VL", model, rope, rope_index, qk_norm_rope=False, vision_rope=vision_rope)


def apply_to_hunyuan_vl(model=None, *, rope: bool = True, rope_index: bool = True) -> None:
    """Route HunYuan-VL (``hunyuan_vl``, transformers 5.x; also its text model ``hunyuan_vl_text``) through ropekit.

    ``rope``: XD-RoPE, ``len(mrope_section)`` (at least 3) position axes, each a section of ``cat((f, f))``: each
    axis's cos/sin is gathered from a cached table and laid out by the module's own ``recomposition_frequencies``
    (``ntk_alpha`` included: its inv_freq is static); ``apply_rotary_pos_emb`` widens q/k and cos/sin to float32,
    rotates and casts back: ``ropekit.apply_rope`` on float32 cos/sin, then the same cast (gradients too, bit for
    bit). Its q/k norms run after the rotation: nothing to fuse. ``rope_index``: ``HunYuanVLModel.get_rope_index``
    (``ropekit.rope_index`` convention ``"xdrope"``: every token's index on every axis, an image's grid tokens
    (column, row, image ordinal) on the last three). Its tower has no rotary. ``model``: as for ``apply_to_qwen3``."""
    _apply("HunYuan-VL", model, rope, rope_index, qk_norm_rope=False)


def apply_to_hy_v4_vl(model=None, *, rope: bool = True, rope_index: bool = True) -> None:
    """Route HY-V4-VL (``hy_v4_vl``, transformers 5.24 on; also its text model ``hy_v4_vl_text``) through ropekit.

    ``rope``: the text rotary's cos/sin gathered from a cached table per axis and laid out by the module's own
    ``recomposition_frequencies`` (Qwen3-VL's interleaved mRoPE, applied to cos/sin): bit for bit. Its MLA attention
    rotates the rope slice with ``apply_rotary_pos_emb_interleave`` (interleaved pairs in, halves out), which stays
    transformers' code; there are no q/k norms around it to fuse. ``rope_index``: ``HYV4VLModel.get_rope_index``
    (``ropekit.rope_index`` convention ``"frame_blocks"``: every row of a frame ends with a newline token, and each
    frame starts a block of ``max(h // m, w // m + 1)`` positions). Its tower has no rotary. ``model``: as for
    ``apply_to_qwen3``."""
    _apply("HY-V4-VL", model, rope, rope_index, qk_norm_rope=False)


def apply_to_qwen2_5_omni(model=None, *, rope: bool = True, rope_index: bool = True,
                          vision_rope: bool = True) -> None:
    """Route Qwen2.5-Omni (``qwen2_5_omni``; its thinker and talker, 4.57 and 5.x) through ropekit.

    ``rope``: the thinker's text rotary (Qwen2.5-VL's sectioned mRoPE: cos/sin gathered from the cached table; 4.57's
    per-axis form and ``apply_multimodal_rotary_pos_emb``) and the rotation as the native op. ``rope_index``:
    ``Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index``, which the thinker and the talker both call
    (``ropekit.rope_index`` convention ``"qwen2_5_omni"``: transformers' token-id scan, audio spans with 1-D
    positions, time scaled by ``position_id_per_seconds``, with ``use_audio_in_video`` the clip's video and audio
    interleaved chunk by chunk). No q/k norms. ``vision_rope``: the vision tower's ``apply_rotary_pos_emb_vision`` as
    ``ropekit.apply_rope_vision`` (bit for bit; from transformers 5.17: up to 5.16, 4.57 included, its ``(tensor,
    freqs)`` form is left to transformers, a row in the support report and no warning); its positions: 5.x,
    precomputed by ``ropekit.data.MRopeCollator(vision=model)`` or the tower's own helpers; 4.57, the tower's own.
    The audio encoder adds sinusoidal positions to its inputs: nothing rotary to patch. ``model``: as for
    ``apply_to_qwen3``."""
    _apply("Qwen2.5-Omni", model, rope=rope, rope_index=rope_index, qk_norm_rope=False, vision_rope=vision_rope)


def apply_to_qwen3_omni_moe(model=None, *, rope: bool = True, rope_index: bool = True,
                            qk_norm_rope: bool = True, vision_rope: bool = True) -> None:
    """Route Qwen3-Omni-MoE (``qwen3_omni_moe``; its thinker and talker, 4.57 and 5.x) through ropekit.

    ``rope``: the rotation (``apply_rotary_pos_emb``) as the native op, and the thinker's interleaved text rotary
    (the talker's subclasses it) patched as Qwen3-VL's: its positions are float32; CPU tensors that hold integers
    are gathered from the table, any other (fractional values, CUDA tensors, whose check would be a host sync) run
    transformers' own code: exact either way. ``rope_index``:
    ``Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index`` (the talker's calls it):
    ``ropekit.rope_index`` convention ``"qwen3_omni"``, float32 positions rounded as torch rounds them, with
    ``use_audio_in_video`` a clip's video and audio interleaved token by token by temporal value.
    ``qk_norm_rope``: the thinker's text attention (which the talker's decoder layers use too) runs ``q_norm`` /
    ``k_norm`` and the rotation as one fused op (``ropekit.qk_norm_rope``) on the cos/sin its rotary returned,
    float32 positions included. ``vision_rope``: the vision tower's ``apply_rotary_pos_emb_vision`` as
    ``ropekit.apply_rope_vision`` (bit for bit); its positions as for :func:`apply_to_qwen2_5_omni`. The audio
    encoder adds sinusoidal positions to its inputs: nothing rotary to patch. ``model``: as for ``apply_to_qwen3``."""
    _apply("Qwen3-Omni", model, rope=rope, rope_index=rope_index, qk_norm_rope=qk_norm_rope,
           vision_rope=vision_rope)


_APPLY = {"Qwen3": apply_to_qwen3, "Qwen3-VL": apply_to_qwen3_vl, "Qwen3.5": apply_to_qwen3_5,
          "Qwen2-VL": apply_to_qwen2_vl, "Qwen2.5-VL": apply_to_qwen2_5_vl, "Qwen4-Exp": apply_to_qwen4_exp,
          "GLM-4V": apply_to_glm4v, "PaddleOCR-VL": apply_to_paddleocr_vl, "GLM-OCR": apply_to_glm_ocr,
          "Cosmos3": apply_to_cosmos3, "Cohere-Compass": apply_to_cohere_compass,
          "ERNIE-4.5-VL": apply_to_ernie4_5_vl, "HunYuan-VL": apply_to_hunyuan_vl, "HY-V4-VL": apply_to_hy_v4_vl,
          "Qwen2.5-Omni": apply_to_qwen2_5_omni, "Qwen3-Omni": apply_to_qwen3_omni_moe}
# config.model_type -> the apply_to_* that covers it
_MODEL_TYPES = {model_type: _APPLY[family] for family, types_ in _FAMILY_MODEL_TYPES.items() for model_type in types_}


# switches some families lack because they have nothing to patch there: apply_to_model drops them for those
_OPTIONAL_SWITCHES = ("qk_norm_rope", "vision_rope", "vision_positions")


def apply_to_model(model, **switches) -> None:
    """Patch whatever family ``model`` belongs to, chosen from ``model.config.model_type``. Keyword switches are
    passed on (``rope``, ``qk_norm_rope``, ``rope_index``, ``vision_rope``, ``vision_positions`` where the family has
    them). ``qk_norm_rope`` is dropped for the families whose attention has no q/k norms (Qwen2-VL, Qwen2.5-VL,
    GLM-4V) and the vision switches for those without a vision tower (Qwen3): there is nothing to patch, so the switch
    changes nothing there; any other switch a family does not have is a ``TypeError``."""
    model_type = _model_type(model)
    apply = _MODEL_TYPES.get(model_type)
    if apply is None and model_type in NOT_SUPPORTED:
        raise ValueError(f"ropekit.apply_to_model: model_type {model_type!r} is not supported: "
                         f"{NOT_SUPPORTED[model_type]}")
    if apply is None:
        raise ValueError(
            f"ropekit.apply_to_model: model_type {model_type!r} is not supported; supported: "
            + ", ".join(sorted(_MODEL_TYPES, key=str.lower))
        )
    parameters = inspect.signature(apply).parameters
    for switch in _OPTIONAL_SWITCHES:
        if switch not in parameters:
            switches.pop(switch, None)
    apply(model, **switches)


def unpatch() -> None:
    """Undo every ropekit patch, restoring the original functions and methods (by identity)."""
    unpatch_all()


def guarded_names() -> dict[str, list[str]]:
    """Per modeling module tail, the qualified names whose code ropekit checks at patch time (what
    ``python -m ropekit.transformers._guard`` records from release wheels)."""
    names: dict[str, list[str]] = {}
    for specs in _FAMILIES.values():
        for spec in specs:
            tail = spec.name.rsplit(".", 1)[-1].removeprefix("modeling_")
            entry = names.setdefault(tail, [])
            if spec.rotary is not None:
                entry.append(f"{spec.rotary}.forward")
            if spec.rotary is not None and spec.rotation:
                entry += ["apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb"]
            if spec.norm is not None:
                entry.append(f"{spec.norm}.forward")
            if spec.vl_model is not None:
                entry.append(f"{spec.vl_model}.get_rope_index")
            if spec.vision is not None:
                entry.append("apply_rotary_pos_emb_vision")
            if spec.vision is not None and spec.vision.helpers:
                entry += [f"{spec.vision.cls}.{name}" for name in POSITION_HELPERS]
                if spec.vision.rotary is not None:
                    entry.append(f"{spec.vision.rotary}.forward")
    # a module two families patch (Cosmos3 runs Qwen3-VL's text model) is listed once
    return {tail: list(dict.fromkeys(entry)) for tail, entry in names.items()}
