"""Replacement for Qwen3-VL / Qwen3.5 ``get_rope_index`` backed by ``ropekit.rope_index``.

The replacement keeps the original's exact signature: transformers 5.x passes ``mm_token_type_ids`` second and
generate relies on the ``**kwargs`` sink; 4.57 passes ``(input_ids, image_grid_thw, video_grid_thw,
attention_mask)`` positionally. The convention is chosen by inspecting that signature, never by version string.

The fidelity rule: the op runs in its non-strict mode, which returns exactly what transformers returns wherever
transformers returns a result (masked-out spans, grids left over, tril or segment-id masks, odd grids) and raises a
ValueError where transformers itself fails. Inputs outside the op's argument domain (float token types, grids that
are not (N, 3) integers, masks that are not (B, S)) go to transformers' own code unchanged.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from .. import ops
from ._patching import is_live, kernel_devices, plain_tensors


def _on_host(input_ids) -> bool:
    # CUDA tensors, in a build with CUDA kernels: the fused device kernel, with zero host syncs, whose domain is every
    # input. Anything else (CPU, a CPU-only build's CUDA tensors, accelerators without a ropekit kernel, where the
    # device algorithm would be the ATen reference, which does not take 4.57's mismatched vision spans): the host
    # loop, which takes every input transformers takes.
    return input_ids.device.type != "cuda" or not kernel_devices(input_ids)


def _to(t, device):
    return None if t is None else t.to(device)


def _integral(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _in_op_domain(input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids=None) -> bool:
    """Whether ropekit.rope_index takes these arguments as they are; anything else runs transformers' own code."""
    if not _integral(input_ids) or input_ids.dim() != 2:
        return False
    if not plain_tensors(*(t for t in (image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids)
                           if isinstance(t, torch.Tensor)), input_ids):
        return False
    for grid in (image_grid_thw, video_grid_thw):
        if grid is not None and not (_integral(grid) and grid.dim() == 2 and grid.shape[1] == 3):
            return False
    if attention_mask is not None and not (
        isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape
        and not attention_mask.is_complex()
    ):
        return False
    if mm_token_type_ids is not None and not (_integral(mm_token_type_ids) and mm_token_type_ids.shape == input_ids.shape):
        return False
    return True


@dataclass(frozen=True)
class MRopeRules:
    """How one family's get_rope_index works, beyond what its signature tells (see ropekit.rope_index)."""

    module: str  # transformers.models.<module>.modeling_<module>
    model: str  # the class that defines get_rope_index
    video_frames: bool  # videos split into single frames (Qwen3-VL, Qwen3.5, Qwen4-Exp, GLM-4V)
    time_scaled: bool = False  # Qwen2.5-VL: temporal positions scaled by tokens_per_second * second_per_grid_ts
    glm: bool = False  # GLM-4V: 4.57 tells video frames by the video_start / video_end brackets
    # ERNIE-4.5-VL: a video's t is divided by vision_config.temporal_merge_size (its resampler merges frames)
    temporal_merge: bool = False
    xdrope: bool = False  # HunYuan-VL: convention "xdrope", len(text_config mrope_section) axes, images only
    frame_blocks: bool = False  # HY-V4-VL: convention "frame_blocks" (newline columns, a block of positions a frame)
    omni: str = ""  # the Omni thinkers' convention ("qwen2_5_omni", "qwen3_omni"): audio, token-id scan

    def model_class(self):
        """The class defining get_rope_index in the installed transformers (None where it has no such module)."""
        import importlib

        try:
            module = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        except ImportError:
            return None
        return getattr(module, self.model, None)


# config.model_type -> its family's rules (the MoE siblings and GLM-4.6V have get_rope_index copies of their own)
MROPE_RULES = {
    "qwen2_vl": MRopeRules("qwen2_vl", "Qwen2VLModel", video_frames=False),
    "qwen2_5_vl": MRopeRules("qwen2_5_vl", "Qwen2_5_VLModel", video_frames=False, time_scaled=True),
    "qwen3_vl": MRopeRules("qwen3_vl", "Qwen3VLModel", video_frames=True),
    "qwen3_vl_moe": MRopeRules("qwen3_vl_moe", "Qwen3VLMoeModel", video_frames=True),
    "qwen3_5": MRopeRules("qwen3_5", "Qwen3_5Model", video_frames=True),
    "qwen3_5_moe": MRopeRules("qwen3_5_moe", "Qwen3_5MoeModel", video_frames=True),
    "qwen4_exp": MRopeRules("qwen4_exp", "Qwen4ExpModel", video_frames=True),
    "glm4v": MRopeRules("glm4v", "Glm4vModel", video_frames=True, glm=True),
    "glm4v_moe": MRopeRules("glm4v_moe", "Glm4vMoeModel", video_frames=True, glm=True),
    "glm46v": MRopeRules("glm46v", "Glm46VModel", video_frames=True, glm=True),
    # 5.x model types with a known family's get_rope_index in their own modules
    "paddleocr_vl": MRopeRules("paddleocr_vl", "PaddleOCRVLModel", video_frames=False),
    "glm_ocr": MRopeRules("glm_ocr", "GlmOcrModel", video_frames=True, glm=True),
    "cosmos3_omni": MRopeRules("cosmos3_omni", "Cosmos3OmniModel", video_frames=True),
    "cosmos3_edge": MRopeRules("cosmos3_edge", "Cosmos3EdgeModel", video_frames=True),
    "cohere_compass": MRopeRules("cohere_compass", "CohereCompassModel", video_frames=True),
    # Qwen2-VL's 5.x index with the temporal merge of its video resampler
    "ernie4_5_vl_moe": MRopeRules("ernie4_5_vl_moe", "Ernie4_5_VLMoeModel", video_frames=False, temporal_merge=True),
    "hunyuan_vl": MRopeRules("hunyuan_vl", "HunYuanVLModel", video_frames=False, xdrope=True),
    "hy_v4_vl": MRopeRules("hy_v4_vl", "HYV4VLModel", video_frames=False, frame_blocks=True),
    # the Omni thinkers (their talkers call the same function): 4.57 and 5.x alike
    "qwen2_5_omni": MRopeRules("qwen2_5_omni", "Qwen2_5OmniPreTrainedModelForConditionalGeneration",
                               video_frames=False, omni="qwen2_5_omni"),
    "qwen3_omni_moe": MRopeRules("qwen3_omni_moe", "Qwen3OmniMoePreTrainedModelForConditionalGeneration",
                                 video_frames=False, omni="qwen3_omni"),
}
# the thinkers' own configs (what a trained thinker's model.config is) follow their family's rules
MROPE_RULES["qwen2_5_omni_thinker"] = MROPE_RULES["qwen2_5_omni"]
MROPE_RULES["qwen3_omni_moe_thinker"] = MROPE_RULES["qwen3_omni_moe"]


def convention_of(get_rope_index, rules: MRopeRules) -> str:
    """The convention a get_rope_index implements, from its signature (never a version string): 5.x reads modality
    from mm_token_type_ids; 4.57 scans token ids (after vision_start, or GLM's video brackets)."""
    if "mm_token_type_ids" in inspect.signature(get_rope_index).parameters:
        return "xdrope" if rules.xdrope else "frame_blocks" if rules.frame_blocks else "token_types"
    return "video_brackets" if rules.glm else "vision_start"


def rope_index_kwargs(config, rules: MRopeRules, convention: str) -> dict:
    """ropekit.rope_index's keyword arguments for a model config of a family: merge size, special token ids, the
    video rule and Qwen2.5-VL's tokens_per_second."""
    get = lambda name: getattr(config, name, None)  # noqa: E731

    def token(name):
        value = get(name)
        return -1 if value is None else int(value)

    kwargs = dict(
        spatial_merge_size=config.vision_config.spatial_merge_size, image_token_id=token("image_token_id"),
        video_token_id=token("video_token_id"), vision_start_token_id=token("vision_start_token_id"),
        convention=convention, video_frames=rules.video_frames,
    )
    if rules.glm and convention == "video_brackets":
        kwargs.update(video_start_token_id=token("video_start_token_id"), video_end_token_id=token("video_end_token_id"))
    if rules.time_scaled:
        kwargs["tokens_per_second"] = config.vision_config.tokens_per_second
    if rules.temporal_merge:
        kwargs["temporal_merge_size"] = config.vision_config.temporal_merge_size
    if rules.xdrope:
        kwargs["num_axes"] = xdrope_axes(config)
    return kwargs


def xdrope_axes(config) -> int | None:
    """HunYuan-VL's number of position rows, ``len(config.text_config.rope_parameters["mrope_section"])`` read as
    its get_rope_index reads it; None where that read would fail."""
    try:
        rope_parameters = config.text_config.rope_parameters or {}
        return len(rope_parameters.get("mrope_section", []))
    except Exception:  # noqa: BLE001 - whatever transformers' own read raises, it raises it
        return None


def _int_option(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def omni_rope_index_kwargs(model, rules: MRopeRules) -> dict | None:
    """ropekit.rope_index's keyword arguments for an Omni model (thinker or talker: whatever ``self`` its
    get_rope_index runs on), read as that function reads them (``self.spatial_merge_size``, ``self.config``); None
    where a value is missing or of a type ropekit does not take (the original then runs, and raises its own error
    where it fails)."""
    config = getattr(model, "config", None)
    try:
        names = dict(image_token_id="image_token_id", video_token_id="video_token_id",
                     audio_token_id="audio_token_id", vision_start_token_id="vision_start_token_id",
                     audio_start_token_id="audio_start_token_id")
        kwargs = {key: _int_option(getattr(config, name)) for key, name in names.items()}
        kwargs["spatial_merge_size"] = _int_option(model.spatial_merge_size)
        kwargs["tokens_per_second"] = _int_option(config.position_id_per_seconds)
        if rules.omni == "qwen2_5_omni":
            chunk = config.position_id_per_seconds * config.seconds_per_chunk  # transformers' int() of it
            if not isinstance(chunk, (int, float)) or isinstance(chunk, bool) or chunk != chunk or abs(chunk) > 2**20:
                return None
            kwargs["tokens_per_chunk"] = int(chunk)
        else:
            kwargs["audio_n_window"] = _int_option(qwen3_omni_audio_window(config))
    except (AttributeError, TypeError):  # a missing or None value: transformers' code meets it on its own terms
        return None
    if any(value is None for value in kwargs.values()) or kwargs["spatial_merge_size"] < 1:
        return None
    # values the op refuses (ropekit's own API validates strictly), with which transformers may still return
    if abs(kwargs["tokens_per_second"]) > 2**20 or kwargs.get("audio_n_window", 1) < 1:
        return None
    kwargs["convention"] = rules.omni
    return kwargs


def qwen3_omni_audio_window(config):
    """The audio window Qwen3-Omni's get_rope_index uses: transformers 5.x passes config.audio_config.n_window to
    _get_feat_extract_output_lengths; 4.57's takes none and windows by 50 (chunks of 100 feature frames)."""
    import importlib

    module = importlib.import_module("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
    if "n_window" not in inspect.signature(module._get_feat_extract_output_lengths).parameters:
        return 50
    return config.audio_config.n_window


def _omni_in_domain(named, rules) -> bool:
    input_ids, attention_mask = named.get("input_ids"), named.get("attention_mask")
    grids = (named.get("image_grid_thw"), named.get("video_grid_thw"))
    audio, seconds = named.get("audio_seqlens"), named.get("second_per_grids")
    if not _in_op_domain(input_ids, *grids, attention_mask):
        return False
    if attention_mask is None and (rules.omni == "qwen3_omni" or all(g is None for g in grids)):
        return False  # transformers fails on its own terms (TypeError / AttributeError)
    if rules.omni == "qwen2_5_omni" and attention_mask is not None and input_ids.dtype != torch.int64:
        return False  # its index_put of int64 positions fails: let it
    # int64 / int32 lengths: transformers does their arithmetic in their own dtype, which narrower ones wrap
    if audio is not None and not (isinstance(audio, torch.Tensor) and audio.dtype in (torch.int64, torch.int32)
                                  and audio.dim() == 1 and plain_tensors(audio)):
        return False
    if seconds is not None and not (isinstance(seconds, torch.Tensor) and seconds.dim() == 1 and plain_tensors(seconds)
                                    and not seconds.is_complex() and seconds.dtype != torch.bool):
        return False
    return isinstance(named.get("use_audio_in_video", False), bool)


def _bound(replacement, signature, self, args, kwargs):
    """The call's arguments by name (defaults applied), or None where the original must run: the replacement
    outlived unpatch(), or the arguments do not bind (the original then raises its own error)."""
    if not is_live(replacement):
        return None
    try:
        bound = signature.bind(self, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


def _make_omni_get_rope_index(original, rules: MRopeRules):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_rope_index(self, *args, **kwargs):
        named = _bound(get_rope_index, signature, self, args, kwargs)
        if named is None:
            return original(self, *args, **kwargs)
        options = omni_rope_index_kwargs(self, rules)
        if options is None or not _omni_in_domain(named, rules):
            return original(self, *args, **kwargs)
        input_ids = named["input_ids"]
        device = input_ids.device
        return ops.rope_index(
            input_ids, _to(named.get("image_grid_thw"), device), _to(named.get("video_grid_thw"), device),
            _to(named.get("attention_mask"), device), audio_seqlens=_to(named.get("audio_seqlens"), device),
            second_per_grid_ts=_to(named.get("second_per_grids"), device),
            use_audio_in_video=named.get("use_audio_in_video", False), on_host=_on_host(input_ids), **options,
        )

    get_rope_index.__ropekit_original__ = original
    return get_rope_index


def make_get_rope_index(original, rules: MRopeRules):
    """A get_rope_index with the original's signature (bound by name, so positional and keyword calls both work)
    that computes with ropekit.rope_index where the arguments are in its domain, and calls the original otherwise."""
    if rules.omni:
        return _make_omni_get_rope_index(original, rules)
    signature = inspect.signature(original)
    convention = convention_of(original, rules)

    @functools.wraps(original)
    def get_rope_index(self, *args, **kwargs):
        named = _bound(get_rope_index, signature, self, args, kwargs)
        if named is None:
            return original(self, *args, **kwargs)
        input_ids, attention_mask = named.get("input_ids"), named.get("attention_mask")
        image_grid_thw, video_grid_thw = named.get("image_grid_thw"), named.get("video_grid_thw")
        mm_token_type_ids = named.get("mm_token_type_ids")
        seconds = named.get("second_per_grid_ts")
        if (
            (convention in ops.TOKEN_TYPE_CONVENTIONS and mm_token_type_ids is None)
            or not _in_op_domain(input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids)
            or not (seconds is None or (isinstance(seconds, torch.Tensor) and seconds.dim() == 1
                                        and not seconds.is_complex()))
        ):
            return original(self, *args, **kwargs)
        device = input_ids.device
        options = rope_index_kwargs(self.config, rules, convention)
        merge = options.get("temporal_merge_size", 1)
        if isinstance(merge, bool) or not isinstance(merge, int) or merge < 1:
            return original(self, *args, **kwargs)  # a merge size ropekit does not take: transformers' arithmetic
        if rules.xdrope and (options["num_axes"] is None or options["num_axes"] < 3):
            return original(self, *args, **kwargs)  # HunYuan-VL raises its own ValueError
        if rules.time_scaled:
            options["second_per_grid_ts"] = _to(seconds, device)
        return ops.rope_index(
            input_ids, _to(image_grid_thw, device), _to(video_grid_thw, device), _to(attention_mask, device),
            mm_token_type_ids=_to(mm_token_type_ids, device), on_host=_on_host(input_ids), **options,
        )

    get_rope_index.__ropekit_original__ = original
    return get_rope_index
