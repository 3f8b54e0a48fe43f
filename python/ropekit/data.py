"""mRoPE position ids for data pipelines: computed on the CPU, in DataLoader workers, so that the training step does
no position work at all (transformers skips get_rope_index when a batch brings its position_ids).

    collate = ropekit.data.MRopeCollator(model.config, collate_fn=my_collate)            # unpacked batches
    collate = ropekit.data.MRopeCollator(model.config, collate_fn=my_collate, packed=True)  # segment-id masks
    collate = ropekit.data.MRopeCollator(model.config, collate_fn=my_collate, vision=model)  # + the tower's inputs
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=4)

Every mRoPE family ropekit supports (config.model_type of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Qwen4-Exp,
GLM-4V and their MoE / 4.6 siblings, the 5.x types ropekit patches, and the Omni thinkers Qwen2.5-Omni and
Qwen3-Omni-MoE, audio included), with the rules of the installed transformers line (5.x reads mm_token_type_ids from
the batch; 4.57 and the Omni thinkers the token ids). The positions are exactly what the model's own
get_rope_index returns for the batch (ropekit.rope_index), or for packed batches each sample's own positions.

With ``vision=model`` (transformers 5.x) the collator also adds what the vision tower would compute from the grids
(its rotary position ids, attention boundaries, window order, interpolation taps: ``VisionInputs``), under the
``image_`` / ``video_`` names ``model(...)`` forwards to the tower, so the tower does no position work either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import ops
from .transformers.rope_index import (MROPE_RULES, MRopeRules, convention_of, omni_rope_index_kwargs,
                                      rope_index_kwargs)
from .transformers.vision import VisionInputs, VisionInputsUnavailable

__all__ = ["MRopeCollator", "mrope_position_ids", "VisionInputs", "VisionInputsUnavailable"]


def _rules(config) -> MRopeRules:
    model_type = getattr(config, "model_type", None)
    rules = MROPE_RULES.get(model_type)
    if rules is None:
        raise ValueError(
            f"ropekit.data: model_type {model_type!r} has no mRoPE get_rope_index ropekit reproduces; supported: "
            + ", ".join(sorted(MROPE_RULES))
        )
    return rules


def _convention(rules: MRopeRules, config) -> str:
    cls = rules.model_class()
    if cls is None:
        import transformers

        raise RuntimeError(f"ropekit.data: transformers {transformers.__version__} has no {rules.model}")
    return convention_of(cls.get_rope_index, rules)


def mrope_position_ids(
    batch: Mapping[str, Any],
    config,
    *,
    packed: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    text_positions: bool = False,
    use_audio_in_video: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids, rope_deltas)`` for a collated batch, as the model's own get_rope_index computes them.

    ``batch`` holds ``input_ids`` ``(B, S)`` and, as the processor made them, ``attention_mask``,
    ``image_grid_thw``, ``video_grid_thw``, ``mm_token_type_ids`` (needed by transformers 5.x) and
    ``second_per_grid_ts`` (Qwen2.5-VL). ``config`` is the model's config (``model.config``).
    ``packed=True``: ``attention_mask`` holds segment ids (1, 2, ... per sample, 0 for padding); or give
    ``cu_seqlens``. Positions then restart at 0 in each sample (see ``ropekit.rope_index``).
    ``text_positions=True`` returns ``(4, B, S)``: row 0 the token's index inside its sample (0 for padding), which
    transformers' models split off as text positions (masks, packed-sequence detection), rows 1..3 the mRoPE
    positions; otherwise ``(3, B, S)``. HunYuan-VL has ``len(mrope_section)`` rows instead of 3 (one more with
    ``text_positions``), and takes no videos (``video_grid_thw`` is not read). ``rope_deltas`` is ``(B, 1)``.

    The Omni thinkers (``config``: the thinker's, or the whole model's, whose ``thinker_config`` is read) take audio:
    ``audio_feature_lengths`` ``(num_audios,)``, or ``feature_attention_mask`` (summed, as the thinker does), and
    ``video_second_per_grid``, under the names the processor gives them; ``use_audio_in_video`` as the thinker's
    forward takes it. Their positions are what the thinker's ``get_rope_index`` returns (Qwen3-Omni: float32).

    Raises ``ValueError`` for an unsupported ``model_type`` and wherever ``ropekit.rope_index`` does.
    """
    rules = _rules(config)
    input_ids = batch["input_ids"]
    if rules.omni:
        position_ids, deltas = _omni_positions(batch, config, rules, packed, cu_seqlens, use_audio_in_video)
        if not text_positions:
            return position_ids, deltas
        text = _text_positions(input_ids, batch.get("attention_mask"), packed, cu_seqlens).to(position_ids.dtype)
        return torch.cat([text[None], position_ids]), deltas
    convention = _convention(rules, config)
    kwargs = rope_index_kwargs(config, rules, convention)
    if rules.xdrope and kwargs["num_axes"] is None:
        raise ValueError("ropekit.data: HunYuan-VL's config.text_config.rope_parameters has no readable mrope_section")
    if rules.time_scaled:
        kwargs["second_per_grid_ts"] = batch.get("second_per_grid_ts")
    position_ids, deltas = ops.rope_index(
        input_ids, batch.get("image_grid_thw"), None if rules.xdrope else batch.get("video_grid_thw"),
        batch.get("attention_mask"),
        mm_token_type_ids=batch.get("mm_token_type_ids") if convention in ops.TOKEN_TYPE_CONVENTIONS else None,
        packed=packed, cu_seqlens=cu_seqlens, **kwargs,
    )
    if not text_positions:
        return position_ids, deltas
    return torch.cat([_text_positions(input_ids, batch.get("attention_mask"), packed, cu_seqlens)[None],
                      position_ids]), deltas


def _omni_positions(batch, config, rules, packed, cu_seqlens, use_audio_in_video):
    import types

    thinker = getattr(config, "thinker_config", None) or config
    model = types.SimpleNamespace(config=thinker,
                                  spatial_merge_size=getattr(getattr(thinker, "vision_config", None),
                                                             "spatial_merge_size", None))
    kwargs = omni_rope_index_kwargs(model, rules)
    if kwargs is None:
        raise ValueError("ropekit.data: the Omni config lacks a token id, spatial_merge_size, position_id_per_seconds "
                         "or the audio window its get_rope_index reads (or holds them in a type it does not take)")
    audio = batch.get("audio_feature_lengths")
    if audio is None and batch.get("feature_attention_mask") is not None:
        audio = batch["feature_attention_mask"].sum(-1)
    return ops.rope_index(
        batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch.get("attention_mask"),
        audio_seqlens=audio, second_per_grid_ts=batch.get("video_second_per_grid"),
        use_audio_in_video=bool(use_audio_in_video), packed=packed, cu_seqlens=cu_seqlens, **kwargs,
    )


def _text_positions(input_ids, attention_mask, packed, cu_seqlens) -> torch.Tensor:
    """Each token's index inside its sample (the row's attended tokens, or its packed segment); 0 for padding."""
    B, S = input_ids.shape
    if cu_seqlens is not None:
        flat = torch.arange(B * S).view(B, S)
        sample = torch.searchsorted(cu_seqlens.to(torch.int64), flat, right=True) - 1
        start = cu_seqlens.to(torch.int64)[sample.clamp(0, len(cu_seqlens) - 1)]
        inside = (flat >= cu_seqlens[0]) & (flat < cu_seqlens[-1])
        return torch.where(inside, flat - start, 0).to(input_ids.dtype)
    if attention_mask is None:
        return torch.arange(S).expand(B, S).to(input_ids.dtype)
    attended = attention_mask != 0
    index = attended.long().cumsum(-1) - 1
    if packed:  # restart where the segment id changes
        prev = torch.cat([torch.zeros(B, 1, dtype=attention_mask.dtype), attention_mask[:, :-1]], 1)
        starts = attended & (attention_mask != prev)
        first = torch.where(starts, index, -1).cummax(-1).values
        index = index - first
    return torch.where(attended, index, 0).to(input_ids.dtype)


class MRopeCollator:
    """A collate_fn that adds ``position_ids`` (and ``rope_deltas``) to each batch, computed on the CPU where the
    DataLoader collates (its workers). Wraps ``collate_fn`` (default: ``torch.utils.data.default_collate``), which
    must return a dict of CPU tensors with the keys ``mrope_position_ids`` reads.

    ``packed``, ``text_positions`` and (the Omni thinkers) ``use_audio_in_video`` are passed on to
    :func:`mrope_position_ids`; ``text_positions`` defaults to
    ``packed`` (packed batches need per-sample text positions). ``rope_deltas_key``: also store the deltas under
    that key (``None``: do not).

    ``vision``: the model (transformers 5.x; a PEFT wrapper is fine) whose vision tower's inputs to add as well
    (:class:`VisionInputs`: ``image_position_ids``, ``image_cu_seqlens``, ``video_...``, as that tower takes them).
    Build the collator after setting the model's attention implementation: under flash attention the tower also
    takes ``max_seqlen``, which is then precomputed too. Raises ``VisionInputsUnavailable`` (a ``ValueError``) when
    the tower takes no precomputed inputs (transformers 4.57, whose towers ``apply_to_*(vision_positions=True)``
    speeds up instead) or its code is not of a shape ropekit can derive them from.
    """

    def __init__(self, config, collate_fn: Callable | None = None, *, packed: bool = False,
                 text_positions: bool | None = None, rope_deltas_key: str | None = None, vision=None,
                 use_audio_in_video: bool = False):
        _rules(config)  # fail now, not in a worker
        self.config = config
        self.use_audio_in_video = use_audio_in_video
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.packed = packed
        self.text_positions = packed if text_positions is None else text_positions
        self.rope_deltas_key = rope_deltas_key
        self.vision_inputs = VisionInputs(vision) if vision is not None else None

    def __call__(self, features):
        batch = self.collate_fn(features)
        position_ids, deltas = mrope_position_ids(batch, self.config, packed=self.packed,
                                                  text_positions=self.text_positions,
                                                  use_audio_in_video=self.use_audio_in_video)
        batch["position_ids"] = position_ids
        if self.rope_deltas_key is not None:
            batch[self.rope_deltas_key] = deltas
        if self.vision_inputs is not None:
            batch.update(self.vision_inputs(batch.get("image_grid_thw"), batch.get("video_grid_thw")))
        return batch
