"""rope_index fuzzing for every mRoPE family: realistic random prompts in each family's own token layout, the call
into that family's own transformers get_rope_index (whichever transformers line is installed), and the matching
ropekit.rope_index arguments.

Families: Qwen2-VL and Qwen2.5-VL (whole-video grids; Qwen2.5-VL scales temporal positions by tokens_per_second *
second_per_grid_ts), Qwen3-VL, Qwen3.5 and Qwen4-Exp (videos split into frames separated by timestamps), and the
GLM-4V family (glm4v, glm4v_moe, glm46v: frames of image tokens inside <|begin_of_video|> ... <|end_of_video|>),
and the 5.x model types that carry one of those indexes in their own classes (paddleocr_vl: Qwen2-VL's; glm_ocr:
GLM-4V's; cosmos3_omni, cosmos3_edge, cohere_compass: Qwen3-VL's; ernie4_5_vl_moe: Qwen2-VL's with a temporal merge of
video frames, in its own <|IMAGE_START|> / <|VIDEO_START|> brackets); hunyuan_vl: XD-RoPE (images only, 3 to 5
position rows, an image's span its (h // m) * (w // m + 1) grid tokens and, mostly, a first and last token); hy_v4_vl:
frame blocks (images and whole videos, every frame's rows ending in a newline token: t * (h // m) * (w // m + 1)
tokens of type 1 / 2 between text tokens).

Reproduce one case: PYTHONPATH=python python tests/python/family_cases.py --family qwen2_5_vl --seed 12345
"""

from __future__ import annotations

import importlib
import inspect
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from rope_index_cases import Case, Image, Text, Video, compare, pad_rows, vision_tokens  # noqa: F401 (re-exported)
from ropekit.ops import TOKEN_TYPE_CONVENTIONS


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # transformers.models.<module>.modeling_<module>
    model: str  # the class defining get_rope_index
    config: str  # its configuration class (in transformers)
    frames: bool  # videos split into single frames
    time_scaled: bool = False  # Qwen2.5-VL
    glm: bool = False  # GLM token layout; 4.57 classifies video frames by the video brackets
    temporal_merge: bool = False  # ERNIE-4.5-VL: t // temporal_merge_size positions per video, image/video brackets
    xdrope: bool = False  # HunYuan-VL: images only, num_axes rows, spans of the grid's tokens (+ first and last)
    frame_blocks: bool = False  # HY-V4-VL: spans of t * (h // m) * (w // m + 1) tokens, whole videos

    def modeling(self):
        try:
            return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        except ImportError:
            return None

    def available(self) -> bool:
        return self.modeling() is not None

    def model_class(self):
        return getattr(self.modeling(), self.model)

    def convention(self) -> str:
        """The convention of the installed transformers: 5.x reads mm_token_type_ids."""
        params = inspect.signature(self.model_class().get_rope_index).parameters
        if "mm_token_type_ids" in params:
            return "xdrope" if self.xdrope else "frame_blocks" if self.frame_blocks else "token_types"
        return "video_brackets" if self.glm else "vision_start"


FAMILIES = {
    f.name: f
    for f in (
        Family("qwen2_vl", "qwen2_vl", "Qwen2VLModel", "Qwen2VLConfig", frames=False),
        Family("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLModel", "Qwen2_5_VLConfig", frames=False, time_scaled=True),
        Family("qwen3_vl", "qwen3_vl", "Qwen3VLModel", "Qwen3VLConfig", frames=True),
        Family("qwen3_vl_moe", "qwen3_vl_moe", "Qwen3VLMoeModel", "Qwen3VLMoeConfig", frames=True),
        Family("qwen3_5", "qwen3_5", "Qwen3_5Model", "Qwen3_5Config", frames=True),
        Family("qwen4_exp", "qwen4_exp", "Qwen4ExpModel", "Qwen4ExpConfig", frames=True),
        Family("glm4v", "glm4v", "Glm4vModel", "Glm4vConfig", frames=True, glm=True),
        Family("glm4v_moe", "glm4v_moe", "Glm4vMoeModel", "Glm4vMoeConfig", frames=True, glm=True),
        Family("glm46v", "glm46v", "Glm46VModel", "Glm46VConfig", frames=True, glm=True),
        # 5.x model types with a known family's get_rope_index in their own modules
        Family("paddleocr_vl", "paddleocr_vl", "PaddleOCRVLModel", "PaddleOCRVLConfig", frames=False),
        Family("glm_ocr", "glm_ocr", "GlmOcrModel", "GlmOcrConfig", frames=True, glm=True),
        Family("cosmos3_omni", "cosmos3_omni", "Cosmos3OmniModel", "Cosmos3OmniConfig", frames=True),
        Family("cosmos3_edge", "cosmos3_edge", "Cosmos3EdgeModel", "Cosmos3EdgeConfig", frames=True),
        Family("cohere_compass", "cohere_compass", "CohereCompassModel", "CohereCompassConfig", frames=True),
        Family("ernie4_5_vl_moe", "ernie4_5_vl_moe", "Ernie4_5_VLMoeModel", "Ernie4_5_VLMoeConfig", frames=False,
               temporal_merge=True),
        Family("hunyuan_vl", "hunyuan_vl", "HunYuanVLModel", "HunYuanVLConfig", frames=False, xdrope=True),
        Family("hy_v4_vl", "hy_v4_vl", "HYV4VLModel", "HYV4VLConfig", frames=False, frame_blocks=True),
    )
}


def ids_of(config) -> dict:
    get = lambda name: getattr(config, name, None)  # noqa: E731
    return dict(
        image=get("image_token_id"), video=get("video_token_id"), vision_start=get("vision_start_token_id"),
        vision_end=get("vision_end_token_id"), image_start=get("image_start_token_id"),
        image_end=get("image_end_token_id"), video_start=get("video_start_token_id"),
        video_end=get("video_end_token_id"),
    )


@dataclass
class FamilyCase:
    family: Family
    case: Case  # its tensors (ids: the family's special ids)
    second_per_grid_ts: torch.Tensor | None = None
    tokens_per_second: int | float | None = None
    notes: list[str] = field(default_factory=list)
    temporal_merge_size: int = 1
    num_axes: int = 3  # xdrope: position rows (len(mrope_section))

    def describe(self, with_tensors: bool = False) -> str:
        extra = (f" tokens_per_second={self.tokens_per_second!r} temporal_merge_size={self.temporal_merge_size}"
                 f" num_axes={self.num_axes}")
        if self.second_per_grid_ts is not None:
            extra += f" second_per_grid_ts={self.second_per_grid_ts.tolist()} ({self.second_per_grid_ts.dtype})"
        return f"family={self.family.name}{extra}\n{self.case.describe(with_tensors)}"


def build_family_case(family: Family, config, rows, *, m=2, pad_side="right", extra_pad=0, mask="auto", rng=None,
                      seed=None, second_per_grid_ts=None, tokens_per_second=None, temporal_merge_size=1,
                      num_axes=3) -> FamilyCase:
    rng = rng or random.Random(0 if seed is None else seed)
    ids = ids_of(config)
    special = {v for v in ids.values() if v is not None}
    text_pool = [i for i in range(1000, 5000) if i not in special]

    def text(n):
        return [rng.choice(text_pool) for _ in range(n)], [0] * n

    seqs, types, images, videos = [], [], [], []
    for row in rows:
        seq, typ = [], []

        def add(tokens, kinds):
            seq.extend(tokens)
            typ.extend(kinds)

        for item in row:
            if isinstance(item, Text):
                add(*text(item.n))
                continue
            n = vision_tokens(item.h, item.w, m)
            if family.xdrope:  # images only (a video's place: an image of its frame size)
                if typ and typ[-1] == 1:  # two images back to back would be one span: a text token between
                    add(*text(1))
                images.append([1, item.h, item.w])
                n = (item.h // m) * (item.w // m + 1)  # a newline column per row
                # the processor's span: a first and last token around the grid, all image tokens of type 1;
                # sometimes the grid's tokens alone (transformers takes both)
                bare = rng.random() < 0.2
                add([ids["image"]] * (n + (0 if bare else 2)), [1] * (n + (0 if bare else 2)))
                continue
            if family.frame_blocks:  # text, then the grid's tokens (a newline column per row of every frame), text
                t = 1 if isinstance(item, Image) else item.t
                (images if isinstance(item, Image) else videos).append([t, item.h, item.w])
                kind = 1 if isinstance(item, Image) else 2
                n = t * (item.h // m) * (item.w // m + 1)
                add(*text(1))
                add([ids["image" if kind == 1 else "video"]] * n, [kind] * n)
                add(*text(1))
                continue
            if isinstance(item, Image):
                images.append([1, item.h, item.w])
                if family.temporal_merge:
                    add([ids["image_start"]] + [ids["image"]] * n + [ids["image_end"]], [0] + [1] * n + [0])
                elif family.glm:
                    add([ids["image_start"]] + [ids["image"]] * n + [ids["image_end"]], [0] + [1] * n + [0])
                else:
                    add([ids["vision_start"]] + [ids["image"]] * n + [ids["vision_end"]], [0] + [1] * n + [0])
                continue
            videos.append([item.t, item.h, item.w])
            if family.temporal_merge:  # <|VIDEO_START|> (t // merge) * n tokens <|VIDEO_END|>
                span = item.t // temporal_merge_size * n
                add([ids["video_start"]] + [ids["video"]] * span + [ids["video_end"]], [0] + [2] * span + [0])
            elif family.glm:  # <|begin_of_video|> (<|begin_of_image|> frame <|end_of_image|> stamp)* <|end_of_video|>
                add([ids["video_start"]], [0])
                for s in item.stamps:
                    add([ids["image_start"]] + [ids["image"]] * n + [ids["image_end"]], [0] + [2] * n + [0])
                    add(*text(s))
                add([ids["video_end"]], [0])
            elif family.frames:  # stamp <vision_start> frame <vision_end>, per frame
                for s in item.stamps:
                    add(*text(s))
                    add([ids["vision_start"]] + [ids["video"]] * n + [ids["vision_end"]], [0] + [2] * n + [0])
            else:  # one span of t * n tokens
                add([ids["vision_start"]] + [ids["video"]] * (item.t * n) + [ids["vision_end"]],
                    [0] + [2] * (item.t * n) + [0])
        seqs.append(seq)
        types.append(typ)
    S = max(len(s) for s in seqs) + extra_pad
    input_ids, mm, am = pad_rows(seqs, types, S, 151643, pad_side)
    padded = bool((am == 0).any())
    attention_mask = am if (padded or mask == "always") else None
    case_ids = dict(ids, pad=151643, vocab=5000)
    if case_ids["video"] is None:  # HunYuan-VL has no video token; perturbations that make video tokens use this id
        case_ids["video"] = 151642
    case = Case(seed, rows, m, case_ids, pad_side, input_ids, attention_mask, mm,
                torch.tensor(images, dtype=torch.int64) if images else None,
                torch.tensor(videos, dtype=torch.int64) if videos else None)
    if family.time_scaled and videos and second_per_grid_ts is not None:
        second_per_grid_ts = second_per_grid_ts[: len(videos)]
    elif not videos:
        second_per_grid_ts = None
    return FamilyCase(family, case, second_per_grid_ts, tokens_per_second, temporal_merge_size=temporal_merge_size,
                      num_axes=num_axes)


def _accepts_float_tokens_per_second(config) -> bool:
    """transformers 5.x's configs validate tokens_per_second as an int; 4.57's take a float too."""
    try:
        saved = config.vision_config.tokens_per_second
        config.vision_config.tokens_per_second = 2.5
        config.vision_config.tokens_per_second = saved
        return True
    except (TypeError, ValueError) as e:  # noqa: F841
        return False
    except Exception:  # noqa: BLE001 - huggingface_hub's strict dataclass error
        return False


def random_family_case(family: Family, config, seed: int) -> FamilyCase:
    """A realistic random batch in the family's layout: ragged rows of text, images and multi-frame videos, left or
    right padded; Qwen2.5-VL with random second_per_grid_ts (fp32 as processors make it, sometimes fp64, sometimes
    absent) and tokens_per_second (int, sometimes float)."""
    rng = random.Random(seed)
    m = 2 if rng.random() < 0.85 else rng.choice([1, 3])
    merge = rng.choice([2, 2, 2, 1, 3]) if family.temporal_merge else 1
    axes = rng.choice([4, 4, 3, 5]) if family.xdrope else 3
    B = rng.randint(1, 4)
    max_len = rng.choice([16, 32, 64, 128, 200])
    rows = []
    for _ in range(B):
        row, used, budget = [], 0, rng.randint(max(2, max_len // 3), max_len)
        if rng.random() < 0.7:
            row.append(Text(rng.randint(1, 6)))
            used += row[-1].n
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            hi = 12 if m > 1 else 6
            h, w = rng.choice(range(m, hi + 1, m)), rng.choice(range(m, hi + 1, m))
            if rng.random() < 0.55:
                item = Image(h, w)
                size = vision_tokens(h, w, m) + 2
            else:
                # a temporal merge: frame counts around its multiples, odd ones included (t // merge floors them)
                t = rng.choice([1, 2, 2, 3] if merge == 1 else [merge, 2 * merge, 2 * merge + 1, 3 * merge])
                item = Video(t, h, w, [rng.randint(1, 3) for _ in range(t)])
                size = t * (vision_tokens(h, w, m) + 2 + 3) + 2
            if used + size > budget:
                break
            row.append(item)
            used += size
            if rng.random() < 0.7:
                row.append(Text(rng.randint(1, 5)))
                used += row[-1].n
        if not row:
            row.append(Text(rng.randint(1, 8)))
        rows.append(row)
    n_videos = sum(isinstance(it, Video) for row in rows for it in row)
    seconds = tps = None
    if family.time_scaled:
        tps = rng.choice([getattr(config.vision_config, "tokens_per_second", 4), 2, 25, 4, 2.5])
        if isinstance(tps, float) and not _accepts_float_tokens_per_second(config):
            tps = 3
        if rng.random() < 0.85:
            values = [rng.choice([0.5, 1.0, 2.0, 1 / 3, 1.5, 0.1, 2 / 7]) for _ in range(max(n_videos, 1))]
            seconds = torch.tensor(values, dtype=torch.float64 if rng.random() < 0.2 else torch.float32)
    return build_family_case(family, config, rows, m=m, pad_side=rng.choice(["left", "right"]),
                             extra_pad=rng.randint(1, 4) if rng.random() < 0.1 else 0,
                             mask="always" if rng.random() < 0.3 else "auto", rng=rng, seed=seed,
                             second_per_grid_ts=seconds, tokens_per_second=tps, temporal_merge_size=merge,
                             num_axes=axes)


# ----------------------------------------------------------------------------------------------------------------
# transformers' side


def tiny_config(family: Family):
    """The family's configuration with its real special ids and defaults (nothing else is read by get_rope_index)."""
    import transformers

    return getattr(transformers, family.config)()


def rope_index_model(family: Family, config):
    """An instance of the family's <X>Model class carrying only `config`: transformers' get_rope_index reads
    nothing else (its methods, e.g. get_vision_position_ids, are the class's own)."""
    cls = family.model_class()
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    model.config = config
    return model


def _clone(t):
    return None if t is None else t.clone()


def transformers_call(family_case: FamilyCase, model, fn=None, device="cpu"):
    """(fn, kwargs): the family's own unpatched get_rope_index (or `fn`, called as it) and the case's arguments as the
    model passes them (copies, on `device`), with `model.config` set to the case's merge sizes, tokens_per_second and
    axes."""
    from ropekit.transformers._patching import original

    family, case = family_case.family, family_case.case
    fn = fn or original(family.model_class(), "get_rope_index")
    config = model.config
    config.vision_config.spatial_merge_size = case.spatial_merge_size
    if family.time_scaled:
        config.vision_config.tokens_per_second = family_case.tokens_per_second  # (5.x validates: an int)
    if family.temporal_merge:
        config.vision_config.temporal_merge_size = family_case.temporal_merge_size
    if family.xdrope:
        config.text_config.rope_parameters = dict(config.text_config.rope_parameters or {},
                                                  mrope_section=[1] * family_case.num_axes)

    def copy(t):
        return None if t is None else t.clone().to(device)

    kwargs = dict(input_ids=copy(case.input_ids), image_grid_thw=copy(case.image_grid_thw),
                  video_grid_thw=copy(case.video_grid_thw), attention_mask=copy(case.attention_mask))
    if family.xdrope:  # images only: its get_rope_index has no video_grid_thw (5.18: no **kwargs either)
        del kwargs["video_grid_thw"]
    if family.time_scaled:
        kwargs["second_per_grid_ts"] = copy(family_case.second_per_grid_ts)
    if family.convention() in TOKEN_TYPE_CONVENTIONS:
        kwargs["mm_token_type_ids"] = copy(case.mm_token_type_ids)
    return fn, kwargs


def transformers_outcome(family_case: FamilyCase, model, fn=None):
    """(result, None) when the family's own unpatched get_rope_index (or `fn`, called as it) returns, (None, error)
    when it raises."""
    fn, kwargs = transformers_call(family_case, model, fn)
    try:
        with torch.no_grad():
            return fn(model, **kwargs), None
    except Exception as e:  # noqa: BLE001 - transformers' own failure is an outcome to mirror
        return None, f"{type(e).__name__}: {e}"


def ropekit_kwargs(family_case: FamilyCase, convention: str | None = None) -> dict:
    family, case = family_case.family, family_case.case
    convention = convention or family.convention()
    ids = case.ids
    kwargs = dict(
        image_grid_thw=case.image_grid_thw, video_grid_thw=case.video_grid_thw, attention_mask=case.attention_mask,
        spatial_merge_size=case.spatial_merge_size, image_token_id=ids["image"],
        video_token_id=ids["video"] if ids["video"] is not None else -1,
        vision_start_token_id=ids["vision_start"] if ids["vision_start"] is not None else -1,
        convention=convention, video_frames=family.frames,
    )
    if convention in TOKEN_TYPE_CONVENTIONS:
        kwargs["mm_token_type_ids"] = case.mm_token_type_ids
    if family.glm:
        kwargs.update(video_start_token_id=ids["video_start"], video_end_token_id=ids["video_end"])
    if family.time_scaled:
        kwargs.update(tokens_per_second=family_case.tokens_per_second,
                      second_per_grid_ts=family_case.second_per_grid_ts)
    if family.temporal_merge:
        kwargs["temporal_merge_size"] = family_case.temporal_merge_size
    if family.xdrope:
        kwargs.update(num_axes=family_case.num_axes, video_grid_thw=None)  # its get_rope_index takes no videos
    return kwargs


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
    family = FAMILIES[args.family]
    config = tiny_config(family)
    fc = random_family_case(family, config, args.seed)
    print(fc.describe(with_tensors=True))
    print(transformers_outcome(fc, rope_index_model(family, config)))
