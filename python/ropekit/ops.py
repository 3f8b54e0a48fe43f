"""Typed wrappers over ``torch.ops.ropekit`` and their fake (meta) kernels for ``torch.compile``.

Every op is a native custom op with CPU and CUDA kernels; autograd is registered in C++, so
``torch.ops.ropekit.apply_rope`` is differentiable with or without these wrappers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C  # noqa: F401  (registers torch.ops.ropekit)

__all__ = [
    "rope_cache", "rope_cos_sin", "mrope_cos_sin", "apply_rope", "apply_rope_vision", "rope_index", "qk_norm_rope",
    "qk_norm_rope_qkv_", "vision_position_ids", "vision_window_index", "vision_pos_embed_interp",
]

_ops = torch.ops.ropekit


def rope_cache(
    inv_freq: torch.Tensor, max_position: int, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build fp32 cos/sin tables of shape ``[max_position, len(inv_freq)]`` on ``inv_freq``'s device.

    ``cos[p, j] = cos(fl32(inv_freq[j] * float(p))) * attention_scaling``, computed with the same fp32 ops as
    transformers' rotary forward, so gathering a row is bit-identical to what transformers computes per call.
    ``inv_freq`` may be any float dtype (a bf16 buffer is widened, as transformers' ``.float()`` does).
    Not differentiable.
    """
    return _ops.rope_cache(inv_freq, int(max_position), float(attention_scaling))


def rope_cos_sin(
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    position_ids: torch.Tensor,
    dtype: torch.dtype,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
    table_inv_freq: torch.Tensor | None = None,
    *,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather transformers-layout cos/sin ``(B, S, 2*half)`` of ``dtype`` for ``position_ids`` ``(B, S)``.

    ``cos_cache`` / ``sin_cache`` are the float32 ``[P, half]`` tables of :func:`rope_cache`; ``position_ids`` is
    int64 or int32. ``is_neox=True`` duplicates each frequency's value as transformers' ``cat((freqs, freqs), -1)``
    (columns ``j`` and ``j + half``, Qwen / Llama); ``is_neox=False`` as ``repeat_interleave(2, -1)`` (columns
    ``2j`` and ``2j + 1``, GLM-4V's GPT-J layout for :func:`apply_rope` with ``is_neox=False``). The values are
    bit-identical to transformers' rotary forward.

    A position outside the table (past its end, or negative: transformers produces negative positions for padding
    slots after adding negative mRoPE deltas) is an error unless ``inv_freq`` (any float dtype, read as float32
    like transformers' ``.float()``, with the ``attention_scaling`` the table was built with) is given; then its
    row is computed exactly as transformers computes it. On CUDA that happens in the kernel with no host sync;
    without ``inv_freq`` such a position raises a device-side assert.

    ``table_inv_freq`` (float32 ``[half]``): the frequencies the table was built from. Where the current
    ``inv_freq[j]`` differs from it bitwise, frequency ``j`` is computed from ``inv_freq`` for every position
    instead of read from the table, so a table is never served stale after an in-place change of ``inv_freq`` that
    left no trace (``.data``, inference tensors, numpy views). On CUDA the comparison runs inside the kernel (no
    host sync). Not differentiable.
    """
    return _ops.rope_cos_sin(cos_cache, sin_cache, position_ids, dtype, inv_freq, float(attention_scaling),
                             table_inv_freq, bool(is_neox))


def mrope_cos_sin(
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    position_ids: torch.Tensor,
    mrope_section: Sequence[int],
    dtype: torch.dtype,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
    table_inv_freq: torch.Tensor | None = None,
    *,
    mrope_interleaved: bool = True,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal-RoPE cos/sin ``(B, S, 2*half)``: each frequency reads the position of one axis.

    ``position_ids`` is ``(3, B, S)`` (temporal, height, width), ``(1, B, S)`` or ``(B, S)``; the last two are
    plain 1-D RoPE. ``mrope_section = [t, h, w]`` says which axis each of the ``half`` frequencies takes:

    - ``mrope_interleaved=True`` (Qwen3-VL, Qwen3.5): frequency ``j`` reads axis 1 if
      ``j % 3 == 1 and j < 3*h``, axis 2 if ``j % 3 == 2 and j < 3*w``, else axis 0.
    - ``mrope_interleaved=False`` (Qwen2-VL, Qwen2.5-VL, GLM-4V): consecutive sections, transformers'
      ``cat([m[i % 3] for i, m in enumerate(freqs.split(mrope_section, -1))], -1)``: axis 0 for ``j < t``, axis 1
      for ``j < t + h``, else axis 2. Needs ``t + h + w == half``; otherwise ``RuntimeError`` naming
      ``mrope_section``.

    ``is_neox`` picks the duplicated layout as in :func:`rope_cos_sin` (``False``: GLM-4V's
    ``repeat_interleave(2)``). Same position and ``table_inv_freq`` rules as :func:`rope_cos_sin`; bit-identical to
    transformers' rotary forward.
    """
    return _ops.mrope_cos_sin(
        cos_cache, sin_cache, position_ids, [int(s) for s in mrope_section], dtype, inv_freq,
        float(attention_scaling), table_inv_freq, bool(mrope_interleaved), bool(is_neox),
    )


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    *,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb``: ``x*cos + rotate_half(x)*sin`` for q and k.

    ``q``/``k`` are ``(B, H, S, D)`` (``unsqueeze_dim=1``, transposed views welcome, no copy) or ``(B, S, H, D)``
    (``unsqueeze_dim=2``), float32/bfloat16/float16/float64; ``cos``/``sin`` are ``(B or 1, S, R)`` in q's dtype or
    float32, with ``R <= D`` even: only the first ``R`` channels rotate, the rest pass through (partial rotary,
    ``torch.cat([x_embed, x_pass], -1)``). Out-of-place; the output dtype is ``promote(q.dtype, cos.dtype)`` and
    math runs in fp32 (fp64 for fp64), each product and the sum rounded once (bit-identical to eager in fp32).

    ``is_neox=True`` (Qwen, Llama) rotates halves, ``rotate_half(x) = cat(-x[R/2:], x[:R/2])``.
    ``is_neox=False`` is GPT-J style (GLM-4V's ``apply_rotary_pos_emb``): pairs ``(x[2i], x[2i+1])`` rotate, with
    ``rotate_half_llm(x) = stack((-x[1::2], x[0::2]), -1).flatten(-2)`` and cos/sin in the
    ``repeat_interleave(2)`` layout (``cos[..., 2i] == cos[..., 2i+1]``) GLM-4V's rotary embedding returns.

    Differentiable in q, k, cos and sin. Raises ``RuntimeError`` naming the argument for a wrong rank, dtype,
    device, an odd rotary dim, ``R > D`` or mismatched batch/seq.
    """
    return _ops.apply_rope(q, k, cos, sin, int(unsqueeze_dim), bool(is_neox))


def apply_rope_vision(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for the vision towers' ``apply_rotary_pos_emb_vision`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5,
    Qwen4-Exp, GLM-4V, ...): ``q.float() * cos + rotate_half(q.float()) * sin``, cast back to q's dtype.

    ``q`` / ``k`` are ``(tokens, heads, head_dim)``, float32/bfloat16/float16/float64, read through their strides
    (the ``qkv.reshape(N, 3, H, D).permute(1, 0, 2, 3).unbind(0)`` views the towers pass are not copied; a
    head_dim with a non-unit stride is copied once). ``cos`` / ``sin`` are ``(tokens, R)``, float32 or q's dtype,
    ``R <= head_dim`` even: the first ``R`` channels rotate, the rest pass through. The math runs in float32 (float64
    for float64 q) with each product and the sum rounded once, then one rounding to q's dtype: bit-identical to
    transformers' function for float32/bfloat16/float16 q (which upcasts to float32 itself). The outputs have q's
    dtype and shape, in a dense layout. ``is_neox=False`` rotates GPT-J pairs, as :func:`apply_rope`.

    Differentiable in q, k, cos and sin; the q/k gradients are computed in float32 and rounded once to q's dtype,
    as autograd does through transformers' function. Raises ``RuntimeError`` naming the argument for a wrong rank,
    dtype, device, token count or rotary dim.
    """
    return _ops.apply_rope_vision(q, k, cos, sin, bool(is_neox))


_OMNI_CONVENTIONS = ("qwen2_5_omni", "qwen3_omni")
# the conventions of transformers 5.x's index that read modality from mm_token_type_ids (padding 0)
TOKEN_TYPE_CONVENTIONS = ("token_types", "xdrope", "frame_blocks")


def rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    mm_token_type_ids: torch.Tensor | None = None,
    spatial_merge_size: int,
    image_token_id: int = -1,
    video_token_id: int = -1,
    vision_start_token_id: int = -1,
    convention: str = "token_types",
    video_frames: bool = True,
    second_per_grid_ts: torch.Tensor | None = None,
    tokens_per_second: int | float | None = None,
    video_start_token_id: int = -1,
    video_end_token_id: int = -1,
    packed: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    strict: bool = False,
    on_host: bool = True,
    temporal_merge_size: int = 1,
    num_axes: int = 3,
    audio_seqlens: torch.Tensor | None = None,
    audio_token_id: int = -1,
    audio_start_token_id: int = -1,
    use_audio_in_video: bool = False,
    tokens_per_chunk: int = 0,
    audio_n_window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``get_rope_index`` of the mRoPE models: ``(position_ids (num_axes, B, S), deltas (B, 1))``,
    element-wise identical to transformers (values, dtypes and device) wherever transformers returns a result.

    Reproduces ``Qwen2VLModel``, ``Qwen2_5_VLModel``, ``Qwen3VLModel``, ``Qwen3_5Model``, ``Qwen4ExpModel``,
    ``Glm4vModel`` (``glm4v``, ``glm4v_moe``, ``glm46v``), ``HunYuanVLModel``, ``HYV4VLModel``, the Omni thinkers'
    ``.get_rope_index`` and the 5.x model types that carry one of them, chosen by:

    - ``convention``: ``"token_types"`` is transformers 5.x for every family (modality from ``mm_token_type_ids``:
      0 text, 1 image, 2 video; runs of equal type; text resumes at ``cur + max(h, w) // m`` after a grid; padding
      slots 0; ``deltas = max + 1 - attended tokens``). ``"vision_start"`` is 4.57 Qwen2-VL / Qwen2.5-VL / Qwen3-VL
      (spans found by ``vision_start_token_id`` pairs and ``list.index`` scans for ``image_token_id`` /
      ``video_token_id``; text resumes at a grid's largest position + 1; padding slots 1; ``deltas = max + 1 - S``;
      without any grid, the mask-cumsum branch). ``"video_brackets"`` is 4.57 GLM-4V (image tokens between
      ``video_start_token_id`` and ``video_end_token_id`` are video frames; otherwise as ``"vision_start"``).
      ``"xdrope"`` is 5.x HunYuan-VL (images only, modality from ``mm_token_type_ids``): ``num_axes`` rows
      (``len(mrope_section)``, at least 3); every attended token takes its index in the row on every axis, except
      the grid tokens of each image span, whose last three rows are (column, row, image ordinal over the batch). An
      image's grid has ``(h // m) * (w // m + 1)`` tokens (a newline column per row) and its span that many, or two
      more (its first and last tokens then keep their indices); another span length, or image grids left over,
      raise ``ValueError`` as transformers raises; without ``image_grid_thw`` every token is text. Packed samples
      number their images from 0 each, as each would alone (transformers numbers a batch's images in order and has
      no packing); grids are still consumed in order. Padding slots 0;
      ``deltas = max + 1 - attended tokens``. The ATen reference does not implement it (the host loop and the fused
      algorithm, on the CPU and CUDA, do). ``num_axes`` is 3 for every other convention.
      ``"frame_blocks"`` is 5.x HY-V4-VL (``HYV4VLModel.get_rope_index``; modality from ``mm_token_type_ids``,
      runs as in ``"token_types"``, videos whole grids whatever ``video_frames`` says): a grid ``(t, h, w)`` has
      ``t * (h // m) * (w // m + 1)`` tokens (every row of a frame ends with a newline token); frame ``f`` starts a
      block of ``B = max(h // m, w // m + 1)`` positions, its token in row ``y``, column ``x`` at ``(cur + f * B,
      cur + f * B + y, cur + f * B + x)``; text resumes at the grid's largest position + 1, and a grid of no tokens
      raises ``ValueError`` (transformers fails taking its max). Padding slots 0; ``deltas = max + 1 - attended
      tokens`` (int64). No temporal scaling. The ATen reference does not implement it.
    - ``video_frames``: each video is split into ``t`` single-frame grids (Qwen3-VL, Qwen3.5, Qwen4-Exp, GLM-4V;
      ``repeat_interleave`` by t), or kept whole (Qwen2-VL, Qwen2.5-VL).
    - ``tokens_per_second`` (Qwen2.5-VL's vision config value, int or float as there) with ``second_per_grid_ts``
      ``(num_videos,)``: temporal positions ``(arange(t) * interval).long()`` in transformers' own arithmetic. 5.x:
      ``interval = tokens_per_second * second_per_grid_ts[v]`` in the dtype of ``second_per_grid_ts`` (just
      ``tokens_per_second`` without it), images unscaled. 4.57: ``(arange(t) * int(second_per_grid_ts[v])) *
      tokens_per_second``, images at temporal position 0.

    - ``temporal_merge_size`` (ERNIE-4.5-VL's vision config value): a video grid ``(t, h, w)`` spans ``t //
      temporal_merge_size`` temporal positions (its resampler merges that many frames), as transformers'
      ``get_vision_position_ids(..., temp_merge_size)``; images are not merged. 1 (every other family): no merge.

    - ``"qwen2_5_omni"`` / ``"qwen3_omni"``: the Omni thinkers' ``get_rope_index`` (``Qwen2_5Omni...`` and
      ``Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index``, 4.57 and 5.x; Qwen3-Omni's talker
      calls the same). transformers' token-id scan: Qwen2.5-Omni finds the next ``image_token_id`` /
      ``video_token_id`` / ``audio_token_id`` token, Qwen3-Omni the next ``vision_start_token_id`` /
      ``audio_start_token_id``; spans are counted from ``vision_start`` pairs and ``audio_start`` tokens. Audio spans
      have 1-D positions, ``audio_seqlens`` ``(num_audios,)`` holding each audio's feature length (Qwen2.5-Omni
      ``((n - 1) // 2 + 1 - 2) // 2 + 1`` tokens, Qwen3-Omni ``_get_feat_extract_output_lengths(n,
      audio_n_window)``). ``tokens_per_second`` is the config's ``position_id_per_seconds`` (an int): frame ``f`` of
      an image sits at ``f * tokens_per_second``, of video ``v`` at ``f * second_per_grid_ts[v].float() *
      tokens_per_second`` in float32 (Qwen2.5-Omni truncates it with ``.long()``). ``use_audio_in_video``: a
      ``vision_start, audio_start`` clip interleaves its video grid and audio, Qwen2.5-Omni by chunks of
      ``tokens_per_chunk`` (``int(position_id_per_seconds * seconds_per_chunk)``) temporal positions, Qwen3-Omni
      token by token by temporal value, video first on ties. Every piece starts at the largest position of the
      piece appended before it + 1, as transformers' ``llm_pos_ids_list[-1].max() + 1``. Qwen2.5-Omni: positions in
      ``input_ids``' dtype, padding 1, int64 deltas; Qwen3-Omni: float32 positions (fractional where ``s *
      tokens_per_second`` is), padding 0.0, float32 deltas, every float step rounded as torch rounds it; it needs
      ``attention_mask`` (transformers indexes it unconditionally). Both attend where the mask is 1; without any grid
      they take the mask's cumulative sum (transformers' text branch, audio spans included). ``video_frames`` is
      ignored (videos are whole grids); ``strict`` and the ATen reference do not take them. The fused algorithm
      starts each row's cursors from the spans transformers' token scan counts; where a row consumes otherwise (a
      Qwen3-Omni clip without ``use_audio_in_video``, malformed spans), a third pass, a no-op otherwise, walks every
      row again in order, so it takes every input the host loop takes.

    Grids are consumed in order over the attended vision spans of the whole batch; grids left over are ignored, as
    transformers ignores them. ``strict=True`` instead rejects inconsistent inputs: a span whose length is not
    ``t * (h / m) * (w / m)`` (``"frame_blocks"``: ``(w / m + 1)``), grids left over, ``h`` / ``w`` not positive
    multiples of the merge size, ``t < 1``, a ``second_per_grid_ts`` of another length than the videos.

    **Packed batches** (several samples per row, positions restarting at 0 in each): ``packed=True`` reads segment
    ids from ``attention_mask`` (1, 2, ... per sample, 0 for padding: LLaMA-Factory's neat packing), or
    ``cu_seqlens`` ``[0, n1, n1 + n2, ...]`` gives the samples' boundaries over the row-major ``(B * S)`` tokens
    (samples must not cross rows). Each sample is computed as if it were its own unpadded row (its positions equal
    the per-sample result); grids are consumed in order; ``deltas`` holds each row's last sample's delta.

    ``on_host=True`` runs a C++ loop over the tokens; accelerator inputs are pulled to the host once (one sync) and
    the results copied back without blocking. Where transformers itself fails (more spans than grids, a span whose
    positions do not fit its tokens, a vision_start at the end, ...), and for what ``strict`` rejects, it raises
    ``ValueError`` naming the row, token and grid. ``on_host=False`` runs the fused device algorithm: on CUDA a
    kernel with no host sync at all (CUDA-graph capturable), where inputs without a result trip an asynchronous
    device assert and nothing is read out of bounds; on the CPU the same row code serially (``ValueError`` where
    there is no result). It takes every input the host loop takes and returns the same, 4.57's ``vision_start``
    scan included (image tokens with no ``vision_start`` before them are text, spans that do not match their
    grids). On other devices it is the ATen composition, whose domain excludes those 4.57 mismatched spans.

    Raises ``ValueError`` for malformed arguments: shapes, dtypes, devices, an unknown convention, a
    ``temporal_merge_size`` that is not a positive int.
    """
    if isinstance(temporal_merge_size, bool) or not isinstance(temporal_merge_size, int):
        raise ValueError(f"ropekit.rope_index: temporal_merge_size must be a positive int, got {temporal_merge_size!r}")
    # the omni arguments only for the omni conventions: each keyword costs the dispatcher's parsing on every call
    omni = {}
    if convention in _OMNI_CONVENTIONS:
        omni = dict(audio_seqlens=audio_seqlens, audio_token_id=int(audio_token_id),
                    audio_start_token_id=int(audio_start_token_id), use_audio_in_video=bool(use_audio_in_video),
                    tokens_per_chunk=int(tokens_per_chunk), audio_n_window=int(audio_n_window))
    elif (audio_seqlens is not None or audio_token_id != -1 or audio_start_token_id != -1 or use_audio_in_video
          or tokens_per_chunk or audio_n_window):
        raise ValueError(f"ropekit.rope_index: audio_seqlens, audio_token_id, audio_start_token_id, "
                         f"use_audio_in_video, tokens_per_chunk and audio_n_window belong to the omni conventions "
                         f"{_OMNI_CONVENTIONS}, not {convention!r}")
    return _ops.rope_index(
        input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids, int(spatial_merge_size),
        int(image_token_id), int(video_token_id), int(vision_start_token_id), convention, bool(on_host),
        video_frames=bool(video_frames), second_per_grid_ts=second_per_grid_ts, tokens_per_second=tokens_per_second,
        video_start_token_id=int(video_start_token_id), video_end_token_id=int(video_end_token_id),
        packed=bool(packed), cu_seqlens=cu_seqlens, strict=bool(strict), temporal_merge_size=temporal_merge_size,
        num_axes=int(num_axes), **omni,
    )


def vision_position_ids(
    grid_thw: torch.Tensor, spatial_merge_size: int, num_tokens: int | None = None
) -> torch.Tensor:
    """The vision towers' rotary positions: ``(N, 2)`` int64 ``(h, w)`` of every patch, ``N = sum(t * h * w)``, on
    ``grid_thw``'s device.

    ``grid_thw`` is ``(num_grids, 3)`` integer ``(t, h, w)`` per image or video (patches). Patches are listed per grid
    in the tower's order: frame, ``spatial_merge_size`` block row, block column, row and column inside the block;
    every frame of a video repeats its image positions. Element-wise identical to transformers 5.x
    ``vision_utils.get_vision_position_ids(grid_thw, spatial_merge_size)`` and to the ``pos_ids`` of 4.57's
    ``rot_pos_emb`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V).

    ``grid_thw`` is read on the host once (one device-to-host pull for an accelerator tensor; results go back with a
    non-blocking copy). With ``num_tokens`` (``N``, when the caller knows it, e.g. ``hidden_states.shape[0]``) a
    CUDA ``grid_thw`` takes the device path instead: no host sync at all, a device-side assert where the grids are
    invalid or give another count. Raises ``ValueError`` for a grid_thw that is not ``(n, 3)`` integers, negative
    extents, ``h`` or ``w`` not multiples of ``spatial_merge_size`` (the tower's reshape fails there), more than
    2^40 patches in one grid, or (host path) a ``num_tokens`` other than ``N``.
    """
    return _ops.vision_position_ids(grid_thw, int(spatial_merge_size), num_tokens)


def vision_window_index(
    grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window attention: ``(window_index, cu_window_seqlens)``, both int64 on ``grid_thw``'s device.

    ``window_index`` (``sum(t * (h // m) * (w // m))``,) lists the merged patches (``m = spatial_merge_size``) window
    by window: per grid and frame, windows of ``window_size // m // patch_size`` merged rows and columns in raster
    order, patches in raster order inside each, numbered from the grid's offset. ``cu_window_seqlens`` holds
    ``[0, ...]`` the cumulative patch counts (merged patches times ``m * m``) after every window, empty padding
    windows included (transformers pads each side by ``window - extent % window``, a whole empty window where the
    extent divides evenly), which repeat the previous bound.

    These are transformers 4.57's ``Qwen2_5_VisionTransformerPretrainedModel.get_window_index`` values (its
    ``cu_window_seqlens`` list is this tensor's ``tolist()``) and 5.x ``vision_utils.get_vision_window_index``'s
    before its ``unique_consecutive``. ``grid_thw`` is read on the host once. Raises ``ValueError`` for a bad
    ``grid_thw``, negative extents, or a window of no merged patch (``window_size // m // patch_size == 0``).
    """
    return _ops.vision_window_index(grid_thw, int(spatial_merge_size), int(window_size), int(patch_size))


def vision_pos_embed_interp(
    grid_thw: torch.Tensor, num_grid_per_side: int, spatial_merge_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL 4.57's learned position embedding, resampled bilinearly to each grid: ``(indices, weights)``, each
    ``(4, N)``, ``N = sum(h * w)`` (one frame per grid, patches in raster order), on ``grid_thw``'s device; indices
    int64 into the ``num_grid_per_side ** 2`` rows of ``pos_embed``, weights in the default float dtype (float32).

    Tap ``k`` of patch ``(row, col)`` is what ``Qwen3VLVisionModel.fast_pos_embed_interpolate`` (transformers 4.57)
    lists before its embedding lookup: ``linspace(0, n - 1, h)`` (torch's own CPU linspace, whose values ropekit
    takes from it), truncated to int, ceil clipped at ``n - 1``, weights ``(1 - dh)(1 - dw)``, ``(1 - dh) dw``,
    ``dh (1 - dw)``, ``dh dw`` in float32. The tower then sums the four weighted embedding rows, repeats each grid's
    rows over its ``t`` frames and orders them by ``spatial_merge_size`` block. ``grid_thw`` is read on the host
    once. Raises ``ValueError`` for a bad ``grid_thw``, negative extents, ``h`` / ``w`` not multiples of
    ``spatial_merge_size``, or ``num_grid_per_side < 1``.
    """
    return _ops.vision_pos_embed_interp(grid_thw, int(num_grid_per_side), int(spatial_merge_size))


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    zero_centered: bool = False,
    *,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head ``q_norm`` / ``k_norm`` (RMSNorm over head_dim) and RoPE as one pass over q and k.

    ``q`` / ``k`` are the raw ``q_proj`` / ``k_proj`` outputs, ``(B, S, H*D)`` or ``(B, S, H, D)``; ``D`` is the norm
    weights' length. Returns ``(B, H, S, D)`` tensors (views of ``(B, S, H, D)`` storage), ready for attention:
    ``apply_rotary_pos_emb(q_norm(q).transpose(1, 2), ..., cos, sin)`` in one op. ``cos`` / ``sin`` are
    ``(B or 1, S, R)`` with ``R <= D`` (partial rotary passes the rest through); 1-D and interleaved-mRoPE cos/sin
    are both just values here. ``zero_centered=True`` is Qwen3.5's ``x * rstd * (1 + w)`` with a single rounding;
    the default is Qwen3's ``w * (x * rstd).to(x.dtype)``. The output dtype is promote(norm dtype, cos dtype).
    ``is_neox`` selects the rotation as in :func:`apply_rope` (``False``: GPT-J pairs, GLM-4V).
    q and k are float32/bfloat16/float16/float64; the weights and cos/sin are in q's dtype or float32.
    Differentiable in q, k and both weights; the weight gradients are reduced in a fixed order (same bits on every
    run, no float atomics). Raises ``RuntimeError`` naming the argument for bad shapes, dtypes or devices.
    """
    return _ops.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, float(eps), bool(zero_centered), bool(is_neox))


def qk_norm_rope_qkv_(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    num_q_heads: int,
    num_kv_heads: int,
    zero_centered: bool = False,
    *,
    is_neox: bool = True,
) -> torch.Tensor:
    """In-place inference variant on a packed ``(B, S, (Hq + 2*Hkv) * D)`` qkv projection: normalises and rotates
    the q and k heads where they are, leaves v untouched, and returns ``qkv``. One kernel launch (the decode path).
    Weights and cos/sin must have qkv's dtype. Refuses tensors that require grad, a ``qkv`` that overlaps itself
    (an expanded view such as ``qkv.expand(2, -1, -1)``) and weights or cos/sin that share memory with ``qkv``."""
    _ops.qk_norm_rope_qkv_(qkv, q_weight, k_weight, cos, sin, float(eps), int(num_q_heads), int(num_kv_heads),
                           bool(zero_centered), bool(is_neox))
    return qkv


# --------------------------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, so torch.compile traces these ops without graph breaks.


def _table_fake(inv_freq, max_position, attention_scaling=1.0):
    shape = (max_position, inv_freq.shape[0])
    return inv_freq.new_empty(shape, dtype=torch.float32), inv_freq.new_empty(shape, dtype=torch.float32)


def _gather_fake(cos_cache, batch, seq, dtype):
    shape = (batch, seq, 2 * cos_cache.shape[1])
    return cos_cache.new_empty(shape, dtype=dtype), cos_cache.new_empty(shape, dtype=dtype)


def _rope_cos_sin_fake(cos_cache, sin_cache, position_ids, dtype, inv_freq=None, attention_scaling=1.0,
                       table_inv_freq=None, is_neox=True):
    torch._check(position_ids.dim() == 2, lambda: "position_ids: expected a 2-D (batch, seq) tensor")
    return _gather_fake(cos_cache, position_ids.shape[0], position_ids.shape[1], dtype)


def _mrope_cos_sin_fake(
    cos_cache, sin_cache, position_ids, mrope_section, dtype, inv_freq=None, attention_scaling=1.0,
    table_inv_freq=None, mrope_interleaved=True, is_neox=True,
):
    batch, seq = position_ids.shape[-2], position_ids.shape[-1]
    return _gather_fake(cos_cache, batch, seq, dtype)


def _rope_outputs_like(x, dtype):
    # Same layout rule as the kernel: a head_dim with a non-unit stride is made contiguous first, then empty_like
    # keeps a dense input's stride order.
    if x.stride(-1) != 1:
        return x.new_empty(x.shape, dtype=dtype)
    return torch.empty_like(x, dtype=dtype)


def _apply_rope_fake(q, k, cos, sin, unsqueeze_dim=1, is_neox=True):
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    return _rope_outputs_like(q, out_dtype), _rope_outputs_like(k, out_dtype)


def _apply_rope_vision_fake(q, k, cos, sin, is_neox=True):
    # the kernel's layout: the batch-1 (1, tokens, heads, dim) view's output, squeezed
    return (_rope_outputs_like(q.unsqueeze(0), q.dtype).squeeze(0),
            _rope_outputs_like(k.unsqueeze(0), q.dtype).squeeze(0))


def _apply_rope_backward_fake(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, is_neox=True):
    # contiguous, whatever the incoming gradients' layout: the layout of autograd's gradient of transformers' rotation
    return grad_q.new_empty(grad_q.shape, dtype=q_dtype), grad_k.new_empty(grad_k.shape, dtype=q_dtype)


def _rope_index_fake(input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids,
                     spatial_merge_size, image_token_id, video_token_id, vision_start_token_id, convention,
                     on_host=True, *, video_frames=True, second_per_grid_ts=None, tokens_per_second=None,
                     video_start_token_id=-1, video_end_token_id=-1, packed=False, cu_seqlens=None, strict=False,
                     temporal_merge_size=1, num_axes=3, audio_seqlens=None, audio_token_id=-1,
                     audio_start_token_id=-1, use_audio_in_video=False, tokens_per_chunk=0, audio_n_window=0):
    batch, seq = input_ids.shape
    pos_dtype, delta_dtype = input_ids.dtype, torch.int64
    is_packed = packed or cu_seqlens is not None
    four_fifty_seven = convention not in TOKEN_TYPE_CONVENTIONS
    omni = convention in ("qwen2_5_omni", "qwen3_omni")
    if omni and image_grid_thw is None and video_grid_thw is None and not is_packed:
        # the mask's cumulative sum; deltas: max + 1 - attention_mask.sum(-1), in the promoted dtype
        pos_dtype = torch.float32 if convention == "qwen3_omni" else torch.int64
        sum_dtype = attention_mask.sum(-1).dtype if attention_mask is not None else torch.int64
        delta_dtype = torch.promote_types(pos_dtype, sum_dtype)
    elif convention == "qwen3_omni":
        pos_dtype = delta_dtype = torch.float32
    elif four_fifty_seven and image_grid_thw is None and video_grid_thw is None and not is_packed:
        pos_dtype = torch.int64  # 4.57's text-only branch: cumsum / arange positions
        if attention_mask is None:
            delta_dtype = input_ids.dtype
    elif batch == 0 and not is_packed:
        delta_dtype = torch.float32  # transformers' torch.tensor([]) of no per-row deltas
    elif convention == "xdrope":
        delta_dtype = input_ids.dtype  # HunYuan-VL: torch.tensor() of its positions' maxima
    return (input_ids.new_empty((num_axes, batch, seq), dtype=pos_dtype),
            input_ids.new_empty((batch, 1), dtype=delta_dtype))


def _vision_position_ids_fake(grid_thw, spatial_merge_size, num_tokens=None):
    if num_tokens is None:
        num_tokens = torch.library.get_ctx().new_dynamic_size()
    return grid_thw.new_empty((num_tokens, 2), dtype=torch.int64)


def _vision_window_index_fake(grid_thw, spatial_merge_size, window_size, patch_size):
    ctx = torch.library.get_ctx()
    return (grid_thw.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64),
            grid_thw.new_empty((ctx.new_dynamic_size(min=1),), dtype=torch.int64))


def _vision_pos_embed_interp_fake(grid_thw, num_grid_per_side, spatial_merge_size):
    n = torch.library.get_ctx().new_dynamic_size()
    return (grid_thw.new_empty((4, n), dtype=torch.int64),
            grid_thw.new_empty((4, n), dtype=torch.get_default_dtype()))


def _norm_out_dtype(q, weight, cos, zero_centered):
    norm = q.dtype if zero_centered else torch.promote_types(q.dtype, weight.dtype)
    return torch.promote_types(norm, cos.dtype)


def _heads_view_shape(x, head_dim):
    return (x.shape[0], x.shape[1], x.shape[2] // head_dim if x.dim() == 3 else x.shape[2], head_dim)


def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, eps, zero_centered=False, is_neox=True):
    dtype = _norm_out_dtype(q, q_weight, cos, zero_centered)
    head_dim = q_weight.shape[0]
    outs = [x.new_empty(_heads_view_shape(x, head_dim), dtype=dtype).transpose(1, 2) for x in (q, k)]
    return outs[0], outs[1]


def _qk_norm_rope_backward_fake(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, zero_centered,
                                is_neox=True):
    return q.new_empty(q.shape), k.new_empty(k.shape), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _qk_norm_rope_qkv_fake(qkv, q_weight, k_weight, cos, sin, eps, num_q_heads, num_kv_heads, zero_centered=False,
                           is_neox=True):
    return None


torch.library.register_fake("ropekit::rope_cache")(_table_fake)
torch.library.register_fake("ropekit::rope_cos_sin")(_rope_cos_sin_fake)
torch.library.register_fake("ropekit::mrope_cos_sin")(_mrope_cos_sin_fake)
torch.library.register_fake("ropekit::apply_rope")(_apply_rope_fake)
torch.library.register_fake("ropekit::apply_rope_vision")(_apply_rope_vision_fake)
torch.library.register_fake("ropekit::apply_rope_backward")(_apply_rope_backward_fake)
torch.library.register_fake("ropekit::rope_index")(_rope_index_fake)
torch.library.register_fake("ropekit::_rope_index_algorithm")(
    lambda *args, algorithm, **kwargs: _rope_index_fake(*args[:10], True, **kwargs))
torch.library.register_fake("ropekit::qk_norm_rope")(_qk_norm_rope_fake)
torch.library.register_fake("ropekit::qk_norm_rope_backward")(_qk_norm_rope_backward_fake)
torch.library.register_fake("ropekit::qk_norm_rope_qkv_")(_qk_norm_rope_qkv_fake)
torch.library.register_fake("ropekit::vision_position_ids")(_vision_position_ids_fake)
torch.library.register_fake("ropekit::vision_window_index")(_vision_window_index_fake)
torch.library.register_fake("ropekit::vision_pos_embed_interp")(_vision_pos_embed_interp_fake)
