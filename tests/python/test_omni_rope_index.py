"""ropekit.rope_index, conventions "qwen2_5_omni" and "qwen3_omni", against the Omni thinkers' own transformers
get_rope_index (whichever transformers line is installed): thousands of random layouts mixing text, images, videos
and audio, use_audio_in_video on and off, padding on either side, odd second_per_grids (float32 and float64), int32
input_ids and bool masks, clean and perturbed, on the host loop and the fused device algorithm (its row code run
serially on the CPU; on CUDA the kernel, with no host sync).

ROPEKIT_OMNI_CASES=N changes the number of clean cases per family and use_audio_in_video setting (default 1000, so
2,000 per family; perturbed: N // 2 per family)."""

from __future__ import annotations

import os
import random

import pytest
import torch

import ropekit

from conftest import requires_cuda
from omni_cases import (
    AUDIO_END, FAMILIES, VISION_END, VISION_START, OmniCase, base_config, make_case, rope_index_kwargs,
    ropekit_outcome, same, transformers_outcome,
)

pytestmark = pytest.mark.transformers

N_CASES = int(os.environ.get("ROPEKIT_OMNI_CASES", "1000"))
AVAILABLE = [f for f in FAMILIES if f.model_class() is not None]


def _check(family, case, ref, ref_error, algorithm):
    got, error = ropekit_outcome(family, case, algorithm)
    if ref is None:
        assert got is None, f"transformers raised ({ref_error}) but ropekit ({algorithm}) returned"
        return "error"
    assert got is not None, f"ropekit ({algorithm}) raised where transformers returns: {error}"
    assert same(got[0], ref[0]), f"{algorithm}: positions differ\n{ref[0]}\n{got[0]}"
    assert same(got[1], ref[1]), f"{algorithm}: deltas differ: {ref[1].flatten()} vs {got[1].flatten()}"
    return "equal"


@pytest.mark.parametrize("use_audio_in_video", [False, True], ids=["no_aiv", "aiv"])
@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_clean_layouts_match_transformers(family, use_audio_in_video):
    rng = random.Random(f"{family.name}-{use_audio_in_video}")
    seen = {"equal": 0, "error": 0, "fractional": 0, "clips": 0, "audio": 0, "images": 0}
    for _ in range(N_CASES):
        case = make_case(rng, family, use_audio_in_video)
        ref, ref_error = transformers_outcome(family, case)
        for algorithm in ("host", "kernel"):
            seen[_check(family, case, ref, ref_error, algorithm)] += 1
        if ref is not None and family.float_positions:
            seen["fractional"] += int(bool((ref[0] != ref[0].round()).any()))
        seen["clips"] += int(use_audio_in_video and case.video_grid_thw is not None and len(case.video_grid_thw) > 0)
        seen["audio"] += int(case.audio_seqlens is not None)
        seen["images"] += int(case.image_grid_thw is not None and len(case.image_grid_thw) > 0)
    # clean layouts have a result (Qwen2.5-Omni's int32 input_ids with a mask aside: transformers' index_put fails)
    assert seen["equal"] >= 1.6 * N_CASES, seen
    assert seen["audio"] >= N_CASES // 2 and seen["images"] >= N_CASES // 4, seen
    if use_audio_in_video:
        assert seen["clips"] >= N_CASES // 4, seen
    if family.float_positions:
        assert seen["fractional"] >= N_CASES // 10, seen  # positions off the integer grid are covered


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_perturbed_layouts_match_transformers(family):
    """Tokens replaced or deleted, mask holes, odd / zero / negative grids, missing or tiny audio lengths, second_per_
    grids missing, zero or negative, use_audio_in_video flipped: a result exactly where transformers has one, else a
    ValueError (transformers' own failure)."""
    rng = random.Random(f"{family.name}-perturbed")
    seen = {"equal": 0, "error": 0}
    for k in range(max(N_CASES // 2, 1)):
        case = make_case(rng, family, use_audio_in_video=k % 2 == 1, perturb=True)
        ref, ref_error = transformers_outcome(family, case)
        for algorithm in ("host", "kernel"):
            seen[_check(family, case, ref, ref_error, algorithm)] += 1
    assert seen["error"] > 0 and seen["equal"] > 0, seen


def _fixed_case(family, *, aiv=False, seconds=(0.3,), ids_dtype=torch.int64, mask=True, pps=13):
    """Text, an image, an audio, a video (or a clip) and text."""
    config = base_config(family)
    img, vid, aud, ast = config.image_token_id, config.video_token_id, config.audio_token_id, config.audio_start_token_id
    n_audio = 25 if not family.float_positions else 13  # feature lengths 100
    tokens = [5, VISION_START] + [img] * 4 + [VISION_END, 6, ast] + [aud] * n_audio + [AUDIO_END, 7]
    audios = [100]
    if aiv:
        tokens += [VISION_START, ast] + [vid] * 6 + [aud] * n_audio + [AUDIO_END, VISION_END, 8]
        audios.append(100)
    else:
        tokens += [VISION_START] + [vid] * 6 + [VISION_END, 8]
    ids = torch.tensor([tokens], dtype=ids_dtype)
    return OmniCase(ids, torch.tensor([[1, 4, 4]]), torch.tensor([[3, 2, 4]]), torch.ones_like(ids) if mask else None,
                    aiv, torch.tensor(audios), torch.tensor(list(seconds)), 2, pps, 2, 50)


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_fused_algorithm_repairs_rows_that_consume_otherwise(family):
    """A clip (vision_start, audio_start, ...) passed without use_audio_in_video in row 0, an image in row 1: the
    token scan's counts are not what row 0 consumes (Qwen3-Omni takes the clip's video and audio by its tokens), so
    the fused algorithm's count-based cursors are wrong for both rows; its repair pass walks them again in order."""
    clip, image = _fixed_case(family, aiv=True), _fixed_case(family)
    S = max(clip.input_ids.shape[1], image.input_ids.shape[1])
    ids = torch.zeros(2, S, dtype=torch.int64)
    mask = torch.zeros(2, S, dtype=torch.int64)
    for b, c in enumerate((clip, image)):
        n = c.input_ids.shape[1]
        ids[b, :n], mask[b, :n] = c.input_ids[0], 1
    case = OmniCase(ids, torch.cat([clip.image_grid_thw, image.image_grid_thw]),
                    torch.cat([clip.video_grid_thw, image.video_grid_thw]), mask, False,
                    torch.cat([clip.audio_seqlens, image.audio_seqlens]),
                    torch.cat([clip.second_per_grids, image.second_per_grids]), 2, 13, 2, 50)
    ref, ref_error = transformers_outcome(family, case)
    for algorithm in ("host", "kernel"):
        assert _check(family, case, ref, ref_error, algorithm) == ("equal" if ref is not None else "error")
    if family.float_positions:
        assert ref is not None  # Qwen3-Omni takes it: the case the repair exists for


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_a_clip_too_long_for_its_sample_fails_at_once(family):
    """An audio of 10^13 feature frames in a clip: the tokens cannot fit the sample, so the walk fails before its
    merge / chunking would take a step per token (transformers fails allocating the positions)."""
    import time

    case = _fixed_case(family, aiv=True)
    case.audio_seqlens = torch.tensor([100, 10**13])
    for on_host in (True, False):
        start = time.perf_counter()
        with pytest.raises(ValueError):
            ropekit.rope_index(case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask,
                               on_host=on_host, **rope_index_kwargs(family, case))
        assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_dtypes_and_fractional_positions(family):
    case = _fixed_case(family)
    ref, _ = transformers_outcome(family, case)
    got, _ = ropekit_outcome(family, case)
    assert same(got[0], ref[0]) and same(got[1], ref[1])
    if family.float_positions:
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
        assert (got[0] != got[0].round()).any()  # 0.3 s * 13: temporal positions 3.9, 7.8, then text from there
    else:
        assert got[0].dtype == torch.int64 and got[1].dtype == torch.int64
        # int32 input_ids: int32 positions without a mask; with one, transformers' index_put fails, as ropekit does
        case = _fixed_case(family, ids_dtype=torch.int32, mask=False)
        ref, _ = transformers_outcome(family, case)
        got, _ = ropekit_outcome(family, case)
        assert got[0].dtype == torch.int32 and same(got[0], ref[0]) and same(got[1], ref[1])
        case = _fixed_case(family, ids_dtype=torch.int32)
        assert transformers_outcome(family, case)[0] is None
        with pytest.raises(ValueError, match="int64"):
            ropekit.rope_index(case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask,
                               **rope_index_kwargs(family, case))


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32])
@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_without_grids_the_mask_numbers_tokens(family, mask_dtype):
    """No image or video grid (audio only, or text): transformers' mask-cumsum branch, dtypes included."""
    case = _fixed_case(family)
    case.image_grid_thw = case.video_grid_thw = None
    case.attention_mask = torch.tensor([[0, 0] + [1] * (case.input_ids.shape[1] - 2)]).to(mask_dtype)
    ref, _ = transformers_outcome(family, case)
    for algorithm in ("host", "kernel"):
        got, error = ropekit_outcome(family, case, algorithm)
        assert got is not None, error
        assert same(got[0], ref[0]) and same(got[1], ref[1]), (algorithm, ref, got)


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_packed_samples_equal_each_sample_alone(family):
    """cu_seqlens packing (a ropekit extension: transformers has none for the Omni thinkers): each sample's positions
    are those it has alone; grids and audios are consumed in order."""
    first, second = _fixed_case(family, aiv=True, seconds=(0.5,)), _fixed_case(family, aiv=True)
    alone = [ropekit_outcome(family, c)[0] for c in (first, second)]
    ids = torch.cat([first.input_ids, second.input_ids], 1)
    L1, L2 = first.input_ids.shape[1], second.input_ids.shape[1]
    kwargs = rope_index_kwargs(family, second)  # use_audio_in_video and the scales: one setting per call
    kwargs.update(second_per_grid_ts=torch.cat([first.second_per_grids, second.second_per_grids]),
                  audio_seqlens=torch.cat([first.audio_seqlens, second.audio_seqlens]))
    for on_host in (True, False):
        pos, deltas = ropekit.rope_index(
            ids, torch.cat([first.image_grid_thw, second.image_grid_thw]),
            torch.cat([first.video_grid_thw, second.video_grid_thw]), None,
            cu_seqlens=torch.tensor([0, L1, L1 + L2]), on_host=on_host, **kwargs)
        assert same(pos[:, :, :L1], alone[0][0]) and same(pos[:, :, L1:], alone[1][0])
        assert same(deltas, alone[1][1])


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_argument_errors(family):
    case = _fixed_case(family)
    kwargs = rope_index_kwargs(family, case)
    args = (case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask)
    with pytest.raises(ValueError, match="audio_token_id"):
        ropekit.rope_index(*args, **{**kwargs, "audio_token_id": -1})
    with pytest.raises(ValueError, match="position_id_per_seconds"):
        ropekit.rope_index(*args, **{**kwargs, "tokens_per_second": 2.5})
    with pytest.raises(ValueError, match="strict"):
        ropekit.rope_index(*args, **kwargs, strict=True)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        ropekit.rope_index(*args, **kwargs, mm_token_type_ids=torch.zeros_like(case.input_ids))
    with pytest.raises(ValueError, match="audio_seqlens"):
        ropekit.rope_index(*args, **{**kwargs, "audio_seqlens": case.audio_seqlens.float()})
    with pytest.raises(ValueError, match="omni conventions"):  # audio arguments with another convention
        ropekit.rope_index(*args, **{**kwargs, "convention": "vision_start"})
    with pytest.raises(ValueError, match="only the omni conventions"):  # the op itself, too
        torch.ops.ropekit.rope_index(*args, None, 2, 1, 2, 3, "vision_start", audio_token_id=4)
    with pytest.raises(ValueError, match="ATen reference"):
        names = ["spatial_merge_size", "image_token_id", "video_token_id", "vision_start_token_id", "convention"]
        positional = [kwargs.pop(name) for name in names]
        torch.ops.ropekit._rope_index_algorithm(*args, None, *positional, algorithm="reference", **kwargs)
    if family.float_positions:
        kwargs = rope_index_kwargs(family, case)
        with pytest.raises(ValueError, match="attention_mask"):  # transformers indexes it unconditionally
            ropekit.rope_index(*args[:3], None, **kwargs)
        with pytest.raises(ValueError, match="n_window"):
            ropekit.rope_index(*args, **{**kwargs, "audio_n_window": 0})


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_failures_name_the_cause(family):
    case = _fixed_case(family)
    case.audio_seqlens = case.audio_seqlens[:0]
    assert transformers_outcome(family, case)[0] is None
    with pytest.raises(ValueError, match="audio_seqlens"):
        ropekit.rope_index(case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask,
                           **rope_index_kwargs(family, case))
    case = _fixed_case(family)
    case.second_per_grids = None
    assert transformers_outcome(family, case)[0] is None
    with pytest.raises(ValueError, match="second_per_grid"):
        ropekit.rope_index(case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask,
                           **rope_index_kwargs(family, case))


@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_opcheck(family):
    """Schema, fake kernel (dtypes: float32 for Qwen3-Omni) and dispatch of the op on the Omni conventions."""
    for aiv in (False, True):
        case = _fixed_case(family, aiv=aiv)
        kwargs = rope_index_kwargs(family, case)
        for on_host in (True, False):
            torch.library.opcheck(
                torch.ops.ropekit.rope_index.default,
                (case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask, None,
                 kwargs.pop("spatial_merge_size"), kwargs.pop("image_token_id"), kwargs.pop("video_token_id"),
                 kwargs.pop("vision_start_token_id"), kwargs.pop("convention"), on_host),
                kwargs,
            )
            kwargs = rope_index_kwargs(family, case)


@requires_cuda
@pytest.mark.parametrize("family", AVAILABLE, ids=lambda f: f.name)
def test_cuda_kernel_matches_host_without_syncs(family):
    rng = random.Random(f"{family.name}-cuda")
    for k in range(200):
        case = make_case(rng, family, use_audio_in_video=k % 2 == 1)
        host, error = ropekit_outcome(family, case, "host")
        if host is None:
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got, got_error = ropekit_outcome(family, case, "kernel", device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert got is not None, got_error
        assert same(got[0].cpu(), host[0]) and same(got[1].cpu(), host[1])
