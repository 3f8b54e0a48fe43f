"""Random Omni layouts (text, images, videos, audio, audio in video, padding) for the Qwen2.5-Omni and Qwen3-Omni-MoE
get_rope_index, and their outcomes: transformers' own function (called on a stand-in `self` that carries a real
thinker config, as the model's get_rope_index reads only config and spatial_merge_size) against ropekit.rope_index.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import types
from dataclasses import dataclass

import torch

import ropekit
from ropekit.transformers.rope_index import MROPE_RULES

VISION_START, VISION_END, AUDIO_END = 151652, 151653, 151648  # the checkpoints' ids (the config classes leave some None)


@dataclass(frozen=True)
class OmniFamily:
    name: str  # convention, and the test id
    module: str
    model: str  # the class defining get_rope_index
    config: str  # the thinker config class

    def model_class(self):
        return MROPE_RULES[self.module].model_class()

    def config_class(self):
        module = importlib.import_module(f"transformers.models.{self.module}.configuration_{self.module}")
        return getattr(module, self.config)

    @property
    def float_positions(self) -> bool:
        return self.name == "qwen3_omni"


FAMILIES = (
    OmniFamily("qwen2_5_omni", "qwen2_5_omni", "Qwen2_5OmniPreTrainedModelForConditionalGeneration",
               "Qwen2_5OmniThinkerConfig"),
    OmniFamily("qwen3_omni", "qwen3_omni_moe", "Qwen3OmniMoePreTrainedModelForConditionalGeneration",
               "Qwen3OmniMoeThinkerConfig"),
)


@dataclass
class OmniCase:
    input_ids: torch.Tensor
    image_grid_thw: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    attention_mask: torch.Tensor | None
    use_audio_in_video: bool
    audio_seqlens: torch.Tensor | None
    second_per_grids: torch.Tensor | None
    merge: int
    pps: int
    seconds_per_chunk: int
    n_window: int


@functools.lru_cache(maxsize=None)
def base_config(family: OmniFamily):
    config = family.config_class()()
    config.vision_start_token_id, config.vision_end_token_id = VISION_START, VISION_END
    return config


def window_of(family: OmniFamily, n_window: int) -> int:
    """The audio window transformers' Qwen3-Omni uses: the config's n_window where its _get_feat_extract_output_lengths
    takes one (5.x), a fixed 50 (chunks of 100) in 4.57."""
    module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    fn = getattr(module, "_get_feat_extract_output_lengths", None)
    if fn is None or "n_window" in inspect.signature(fn).parameters:
        return n_window
    return 50


def audio_tokens(family: OmniFamily, n: int, n_window: int) -> int:
    """How many tokens transformers gives an audio of feature length n."""
    if not family.float_positions:
        return ((n - 1) // 2 + 1 - 2) // 2 + 1
    chunk = window_of(family, n_window) * 2
    feat = (n % chunk - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (n // chunk) * 13


def stand_in(family: OmniFamily, case: OmniCase):
    """`self` for transformers' get_rope_index: a copy of the thinker config with the case's settings, the merge
    size, and the helper methods the function calls on self."""
    import copy

    config = copy.deepcopy(base_config(family))
    config.position_id_per_seconds = case.pps
    if not family.float_positions:
        config.seconds_per_chunk = case.seconds_per_chunk
    config.audio_config.n_window = case.n_window
    config.vision_config.spatial_merge_size = case.merge
    cls = family.model_class()
    me = types.SimpleNamespace(config=config, spatial_merge_size=case.merge)
    for name in ("get_llm_pos_ids_for_vision", "get_chunked_index"):
        if hasattr(cls, name):
            setattr(me, name, functools.partial(getattr(cls, name), me))
    return cls, me


def _tokens(config):
    return (config.image_token_id, config.video_token_id, config.audio_token_id, VISION_START,
            config.audio_start_token_id)


def make_case(rng: random.Random, family: OmniFamily, use_audio_in_video: bool, perturb: bool = False) -> OmniCase:
    config = base_config(family)
    image, video, audio, vs, as_ = _tokens(config)
    merge = rng.choice([2, 2, 2, 1, 3])
    pps = rng.choice([25, 13, 25, 7, 2]) if not family.float_positions else rng.choice([13, 25, 13, 3])
    seconds_per_chunk = rng.choice([2, 2, 1, 3])  # 5.x validates an int
    n_window = rng.choice([50, 50, 25, 8])
    case = OmniCase(None, None, None, None, use_audio_in_video, None, None, merge, pps, seconds_per_chunk, n_window)
    images, videos, audios, seconds = [], [], [], []
    rows = []
    for _ in range(rng.randint(1, 3)):
        row = [rng.randint(1, 1000) for _ in range(rng.randint(0, 4))]
        for _ in range(rng.randint(0, 4)):
            kind = rng.choice(["image", "video", "audio", "audio"])
            if kind == "image":
                t, h, w = rng.choice([1, 1, 1, 2]), merge * rng.randint(1, 4), merge * rng.randint(1, 4)
                images.append([t, h, w])
                row += [vs] + [image] * (t * h * w // merge**2) + [VISION_END]
            elif kind == "video":
                t, h, w = rng.randint(1, 6), merge * rng.randint(1, 3), merge * rng.randint(1, 3)
                videos.append([t, h, w])
                seconds.append(rng.choice([0.5, 1.0, 2.0, 0.3, 1 / 3, 0.7, 0.04, 1.5, 2 / 3]))
                n_video = t * h * w // merge**2
                if use_audio_in_video:
                    n = rng.choice([rng.randint(3, 120), rng.randint(3, 400), rng.randint(100, 1500)])
                    audios.append(n)
                    n_audio = audio_tokens(family, n, n_window)
                    # the clip's interior: video then audio in a few alternating runs (positions depend only on
                    # the counts; transformers finds the clip by its first video token / its two start tokens)
                    inner, a_left, v_left = [], n_audio, n_video
                    while v_left or a_left:
                        k = min(v_left, rng.randint(1, max(1, n_video // 2)))
                        inner += [video] * k
                        v_left -= k
                        k = min(a_left, rng.randint(1, max(1, n_audio // 2)))
                        inner += [audio] * k
                        a_left -= k
                    row += [vs, as_] + inner + [AUDIO_END, VISION_END]
                else:
                    row += [vs] + [video] * n_video + [VISION_END]
            else:
                n = rng.choice([rng.randint(3, 60), rng.randint(3, 400), rng.randint(100, 2500)])
                audios.append(n)
                row += [as_] + [audio] * audio_tokens(family, n, n_window) + [AUDIO_END]
            row += [rng.randint(1, 1000) for _ in range(rng.randint(0, 5))]
        if not row:
            row = [rng.randint(1, 1000)]
        rows.append(row)
    S = max(len(r) for r in rows) + rng.randint(0, 3)
    ids = torch.zeros(len(rows), S, dtype=torch.int64)
    mask = torch.zeros(len(rows), S, dtype=torch.int64)
    left = rng.random() < 0.5
    for b, row in enumerate(rows):
        start = S - len(row) if left else 0
        ids[b, start:start + len(row)] = torch.tensor(row)
        mask[b, start:start + len(row)] = 1
    case.input_ids, case.attention_mask = ids, mask
    case.image_grid_thw = torch.tensor(images, dtype=torch.int64).view(-1, 3) if images or rng.random() < 0.3 else None
    case.video_grid_thw = torch.tensor(videos, dtype=torch.int64).view(-1, 3) if videos or rng.random() < 0.3 else None
    if case.image_grid_thw is None and case.video_grid_thw is None and rng.random() < 0.5:
        case.image_grid_thw = torch.zeros(0, 3, dtype=torch.int64)  # grids given, none used: the span walk
    case.audio_seqlens = torch.tensor(audios, dtype=torch.int64) if audios else None
    if seconds or rng.random() < 0.2:
        case.second_per_grids = torch.tensor(seconds, dtype=rng.choice([torch.float32, torch.float64, torch.float32]))
    if rng.random() < 0.15:
        case.input_ids = case.input_ids.to(torch.int32)
    if rng.random() < 0.15:
        case.attention_mask = case.attention_mask.bool()
    if perturb:
        _perturb(rng, family, case)
    return case


def _perturb(rng: random.Random, family: OmniFamily, case: OmniCase) -> None:
    config = base_config(family)
    specials = list(_tokens(config)) + [VISION_END, AUDIO_END]
    ids = case.input_ids
    B, S = ids.shape
    what = rng.choice(["token", "token", "delete", "mask", "grid", "audio", "seconds", "flip_aiv", "odd_grid"])
    if what == "token":
        b, s = rng.randrange(B), rng.randrange(S)
        ids[b, s] = rng.choice(specials + [rng.randint(1, 1000)])
    elif what == "delete":
        b, s = rng.randrange(B), rng.randrange(S)
        ids[b, s:] = torch.cat([ids[b, s + 1:].clone(), ids.new_zeros(1)])
    elif what == "mask":
        b, s = rng.randrange(B), rng.randrange(S)
        case.attention_mask[b, s] = 1 - int(case.attention_mask[b, s])
    elif what == "grid":
        grids = case.image_grid_thw if rng.random() < 0.5 else case.video_grid_thw
        if grids is not None and len(grids):
            grids[rng.randrange(len(grids)), rng.randrange(3)] = rng.choice([0, 1, 3, 5, -2])
    elif what == "odd_grid":
        grids = case.video_grid_thw if case.video_grid_thw is not None else case.image_grid_thw
        if grids is not None and len(grids):
            grids[rng.randrange(len(grids)), rng.choice([1, 2])] += 1
    elif what == "audio":
        if case.audio_seqlens is not None and len(case.audio_seqlens):
            if rng.random() < 0.5:
                case.audio_seqlens = case.audio_seqlens[:-1]
            else:
                case.audio_seqlens[rng.randrange(len(case.audio_seqlens))] = rng.choice([0, 1, 2, 5, 200])
    elif what == "seconds":
        if rng.random() < 0.5 or case.second_per_grids is None:
            case.second_per_grids = None
        else:
            case.second_per_grids = case.second_per_grids * rng.choice([0.0, -1.0, 3.7, 1e-3])
    else:
        case.use_audio_in_video = not case.use_audio_in_video


def transformers_outcome(family: OmniFamily, case: OmniCase):
    """(result, None) where transformers' get_rope_index returns, (None, error) where it raises."""
    cls, me = stand_in(family, case)

    def copy(t):
        return None if t is None else t.clone()

    try:
        with torch.no_grad():
            return cls.get_rope_index(me, copy(case.input_ids), copy(case.image_grid_thw), copy(case.video_grid_thw),
                                      copy(case.attention_mask), case.use_audio_in_video, copy(case.audio_seqlens),
                                      copy(case.second_per_grids)), None
    except Exception as e:  # noqa: BLE001 - transformers' own failure is an outcome to mirror
        return None, f"{type(e).__name__}: {e}"


def rope_index_kwargs(family: OmniFamily, case: OmniCase) -> dict:
    config = base_config(family)
    return dict(
        spatial_merge_size=case.merge, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=VISION_START, convention=family.name, second_per_grid_ts=case.second_per_grids,
        tokens_per_second=case.pps, audio_seqlens=case.audio_seqlens, audio_token_id=config.audio_token_id,
        audio_start_token_id=config.audio_start_token_id, use_audio_in_video=case.use_audio_in_video,
        tokens_per_chunk=int(case.pps * case.seconds_per_chunk) if not family.float_positions else 0,
        audio_n_window=window_of(family, case.n_window) if family.float_positions else 0,
    )


def ropekit_outcome(family: OmniFamily, case: OmniCase, algorithm: str = "host", device: str = "cpu"):
    """ropekit's result through one algorithm ("host": the host loop, "kernel": the fused device algorithm), or the
    error it raises."""

    def to(t):
        return None if t is None else t.to(device)

    kwargs = rope_index_kwargs(family, case)
    kwargs["second_per_grid_ts"] = to(kwargs["second_per_grid_ts"])
    kwargs["audio_seqlens"] = to(kwargs["audio_seqlens"])
    try:
        return ropekit.rope_index(to(case.input_ids), to(case.image_grid_thw), to(case.video_grid_thw),
                                  to(case.attention_mask), on_host=algorithm == "host", **kwargs), None
    except (ValueError, RuntimeError) as e:
        return None, f"{type(e).__name__}: {e}"


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Element-wise identical: dtype, shape, values (NaN where NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point():
        a_nan, b_nan = a.isnan(), b.isnan()
        return torch.equal(a_nan, b_nan) and torch.equal(a[~a_nan], b[~b_nan])
    return torch.equal(a, b)
