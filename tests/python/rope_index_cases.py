"""Shared helpers for the `ropekit.rope_index` tests: a seeded generator of realistic Qwen3-VL prompt layouts, the
call into transformers' own `Qwen3VLModel.get_rope_index` (whichever version is installed), a structural reference
computed from the layout itself (used only to validate the generator against transformers), and comparison helpers
that describe a failing input exactly.

Reproduce one fuzz case from the command line (prints the layout, the tensors and transformers' answer):

    PYTHONPATH=python python tests/python/rope_index_cases.py --seed 12345
"""

from __future__ import annotations

import contextlib
import inspect
import random
from dataclasses import dataclass, field

import torch

CONVENTIONS = ("token_types", "vision_start")
FUZZ_BASE_SEED = 0x5EED_0000  # case i of a fuzz run uses seed FUZZ_BASE_SEED + i

# Qwen3-VL's real special ids (Qwen3VLConfig defaults) and the <|endoftext|> pad id.
DEFAULT_IDS = dict(image=151655, video=151656, vision_start=151652, vision_end=151653, pad=151643, vocab=151936)
# A small-vocabulary id set, so that nothing can rely on the defaults being hard coded.
CUSTOM_IDS = dict(image=7, video=9, vision_start=3, vision_end=4, pad=0, vocab=64)


# ----------------------------------------------------------------------------------------------------------------
# layout


@dataclass
class Text:
    n: int

    def label(self) -> str:
        return f"T{self.n}"


@dataclass
class Image:
    h: int
    w: int

    def label(self) -> str:
        return f"I({self.h}x{self.w})"


@dataclass
class Video:
    t: int
    h: int
    w: int
    stamps: list[int]  # number of timestamp text tokens before each frame

    def label(self) -> str:
        return f"V(t={self.t},{self.h}x{self.w},ts={self.stamps})"


def vision_tokens(h: int, w: int, m: int) -> int:
    return (h // m) * (w // m)


def item_length(item, m: int) -> int:
    if isinstance(item, Text):
        return item.n
    if isinstance(item, Image):
        return 2 + vision_tokens(item.h, item.w, m)
    return sum(s + 2 + vision_tokens(item.h, item.w, m) for s in item.stamps)


@dataclass
class Case:
    seed: int | None
    rows: list[list]  # per row: list of Text / Image / Video items
    spatial_merge_size: int
    ids: dict
    pad_side: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    mm_token_type_ids: torch.Tensor
    image_grid_thw: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    notes: list[str] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [sum(item_length(it, self.spatial_merge_size) for it in row) for row in self.rows]

    def tensors(self) -> dict:
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            mm_token_type_ids=self.mm_token_type_ids,
            image_grid_thw=self.image_grid_thw,
            video_grid_thw=self.video_grid_thw,
        )

    def to(self, device) -> "Case":
        moved = {k: (None if v is None else v.to(device)) for k, v in self.tensors().items()}
        return Case(self.seed, self.rows, self.spatial_merge_size, self.ids, self.pad_side, **moved, notes=self.notes)

    def describe(self, with_tensors: bool = False) -> str:
        def dt(t):
            if t is None:
                return "None"
            s = f"{str(t.dtype).replace('torch.', '')}{tuple(t.shape)}"
            return s if t.is_contiguous() else s + "[non-contiguous]"

        def grid(t):
            return "None" if t is None else str(t.tolist())

        ids = "default" if self.ids == DEFAULT_IDS else f"custom {self.ids}"
        lines = [
            f"seed={self.seed} B={self.input_ids.shape[0]} S={self.input_ids.shape[1]} m={self.spatial_merge_size} "
            f"pad_side={self.pad_side} special_ids={ids} device={self.input_ids.device}",
            f"  input_ids={dt(self.input_ids)} attention_mask={dt(self.attention_mask)} "
            f"mm_token_type_ids={dt(self.mm_token_type_ids)}",
            f"  image_grid_thw={grid(self.image_grid_thw)} video_grid_thw={grid(self.video_grid_thw)}",
        ]
        for b, row in enumerate(self.rows):
            lines.append(f"  row {b} (len {self.lengths[b]}): " + " ".join(it.label() for it in row))
        if self.notes:
            lines.append("  notes: " + ", ".join(self.notes))
        if with_tensors:
            torch.set_printoptions(linewidth=200, threshold=100000)
            for k, v in self.tensors().items():
                lines.append(f"  {k} = {v}")
        return "\n".join(lines)


def _as(t: torch.Tensor, dtype: torch.dtype, noncontiguous: bool) -> torch.Tensor:
    t = t.to(dtype)
    if noncontiguous and t.dim() == 2:
        out = torch.empty(t.shape[1], t.shape[0], dtype=dtype).t()  # same shape, transposed strides
        out.copy_(t)
        assert not out.is_contiguous() or t.numel() <= 1 or 1 in t.shape
        return out
    return t


def build_case(
    rows: list[list],
    *,
    m: int = 2,
    ids: dict = DEFAULT_IDS,
    pad_side: str = "right",
    extra_pad: int = 0,
    length: int | None = None,  # pad every row to exactly this many tokens (instead of extra_pad)
    mask: str | None = "auto",  # "auto": a mask when padded; None: never; "always": even when unpadded
    rng: random.Random | None = None,
    seed: int | None = None,
    ids_dtype: torch.dtype = torch.int64,
    mask_dtype: torch.dtype = torch.int64,
    mm_dtype: torch.dtype = torch.int64,
    noncontiguous: tuple[str, ...] = (),
    empty_grids: tuple[str, ...] = (),  # modalities without spans given as a (0, 3) tensor instead of None
    notes: list[str] | None = None,
) -> Case:
    """Token ids, modality types, mask and grids for a batch of rows described by Text/Image/Video items."""
    rng = rng or random.Random(0 if seed is None else seed)
    special = {ids["image"], ids["video"], ids["vision_start"], ids["vision_end"], ids["pad"]}
    text_pool = [i for i in range(min(ids["vocab"], 4096)) if i not in special]

    def text(n):
        return [rng.choice(text_pool) for _ in range(n)]

    seqs, types, image_grids, video_grids = [], [], [], []
    for row in rows:
        seq, typ = [], []
        for item in row:
            if isinstance(item, Text):
                seq += text(item.n)
                typ += [0] * item.n
            elif isinstance(item, Image):
                n = vision_tokens(item.h, item.w, m)
                seq += [ids["vision_start"]] + [ids["image"]] * n + [ids["vision_end"]]
                typ += [0] + [1] * n + [0]
                image_grids.append([1, item.h, item.w])
            else:
                assert len(item.stamps) == item.t
                n = vision_tokens(item.h, item.w, m)
                for s in item.stamps:
                    seq += text(s) + [ids["vision_start"]] + [ids["video"]] * n + [ids["vision_end"]]
                    typ += [0] * s + [0] + [2] * n + [0]
                video_grids.append([item.t, item.h, item.w])
        assert len(seq) >= 1, "every row needs at least one token"
        seqs.append(seq)
        types.append(typ)

    B = len(rows)
    S = max(len(s) for s in seqs) + extra_pad
    if length is not None:
        assert length >= S, f"length {length} < longest row {S}"
        S = length
    input_ids, mm, am = pad_rows(seqs, types, S, ids["pad"], pad_side)
    padded = bool((am == 0).any())
    if mask == "auto":
        attention_mask = am if padded else None
    elif mask == "always":
        attention_mask = am
    else:
        assert not padded, "a padded batch needs an attention mask"
        attention_mask = None

    def grids(rows_, modality):
        if rows_:
            t = torch.tensor(rows_, dtype=torch.int64)
            if f"{modality}_grid" in noncontiguous:
                wide = torch.zeros(len(rows_), 5, dtype=torch.int64)
                wide[:, 1:4] = t
                t = wide[:, 1:4]
            return t
        return torch.empty((0, 3), dtype=torch.int64) if modality in empty_grids else None

    return Case(
        seed=seed,
        rows=rows,
        spatial_merge_size=m,
        ids=ids,
        pad_side=pad_side,
        input_ids=_as(input_ids, ids_dtype, "input_ids" in noncontiguous),
        attention_mask=None if attention_mask is None else _as(attention_mask, mask_dtype, "attention_mask" in noncontiguous),
        mm_token_type_ids=_as(mm, mm_dtype, "mm_token_type_ids" in noncontiguous),
        image_grid_thw=grids(image_grids, "image"),
        video_grid_thw=grids(video_grids, "video"),
        notes=list(notes or []),
    )


def _random_hw(rng: random.Random, m: int) -> tuple[int, int]:
    hi = 16 if m > 1 else 8  # keep spans <= 64 tokens
    choices = list(range(m, hi + 1, m))
    return rng.choice(choices), rng.choice(choices)


def _random_vision(rng: random.Random, kind: str, m: int, room: int):
    """A random image or video that fits in `room` tokens, or None."""
    modality = {"images": "image", "videos": "video"}.get(kind) or rng.choice(["image", "image", "video"])
    for _ in range(6):
        h, w = _random_hw(rng, m)
        if rng.random() < 0.3:
            h, w = m, rng.choice([m, 2 * m])  # small ones too, so short rows still get vision
        if modality == "image":
            item = Image(h, w)
        else:
            t = rng.choice([1, 2, 2, 3, 4])
            item = Video(t, h, w, [rng.randint(1, 5) for _ in range(t)])
        if item_length(item, m) <= room:
            return item
    return None


def _random_row(rng: random.Random, kind: str, m: int, budget: int) -> list:
    row: list = []
    used = 0

    def add_text(n):
        nonlocal used
        n = min(n, budget - used)
        if n > 0:
            row.append(Text(n))
            used += n

    add_text(rng.choice([0, rng.randint(1, 4), rng.randint(1, 20)]))
    n_vision = 0 if kind == "text" or rng.random() < 0.2 else rng.choice([1, 1, 2, 2, 3, 4])
    for _ in range(n_vision):
        item = _random_vision(rng, kind, m, budget - used)
        if item is None:
            break
        row.append(item)
        used += item_length(item, m)
        add_text(rng.choice([0, rng.randint(1, 3), rng.randint(1, 15)]))
    if rng.random() < 0.45:
        add_text(rng.randint(0, budget - used))  # sometimes fill the row up
    if used == 0:
        add_text(max(1, min(budget, rng.randint(1, 8))))
    return row


def random_case(seed: int, convention: str) -> Case:
    """A realistic random Qwen3-VL batch: ragged rows of text, images and multi-frame videos, left or right padded.

    The layout does not depend on `convention`; only whether int32 input_ids may be drawn does: transformers itself
    fails on int32 input_ids whenever it index_puts int64 positions into the int32 output (5.x: with an attention
    mask; 4.57: whenever grids are given), so int32 is only drawn where transformers accepts it."""
    rng = random.Random(seed)
    m = 2 if rng.random() < 0.85 else rng.choice([1, 3])
    ids = DEFAULT_IDS if rng.random() < 0.8 else CUSTOM_IDS
    kind = rng.choices(["mixed", "images", "videos", "text"], weights=[6, 2, 2, 1])[0]
    B = rng.randint(1, 4)
    max_len = rng.choice([16, 32, 64, 128, 200, 300])
    rows = [_random_row(rng, kind, m, rng.randint(1 if rng.random() < 0.15 else max_len // 2, max_len)) for _ in range(B)]
    if rng.random() < 0.15:  # equal-length rows: unpadded batch
        rows = [rows[0]] * B
    extra_pad = rng.randint(1, 6) if rng.random() < 0.1 else 0  # e.g. padding to a multiple of 8
    lengths = {sum(item_length(it, m) for it in row) for row in rows}
    padded = len(lengths) > 1 or extra_pad > 0
    notes = []
    mask = "auto" if padded else rng.choice([None, "always"])
    pad_side = rng.choice(["left", "right"])
    has_vision = any(not isinstance(it, Text) for row in rows for it in row)
    int32_ok = mask is None if convention == "token_types" else not has_vision
    ids_dtype = torch.int32 if rng.random() < (0.3 if int32_ok else 0.0) else torch.int64
    mask_dtype = rng.choices([torch.int64, torch.bool, torch.int32], weights=[8, 1, 1])[0]
    mm_dtype = torch.int32 if rng.random() < 0.3 else torch.int64
    noncontiguous = tuple(
        name
        for name in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid", "video_grid")
        if rng.random() < 0.06
    )
    empty_grids = tuple(mod for mod in ("image", "video") if rng.random() < 0.04)
    if ids_dtype == torch.int32 and convention == "vision_start":
        empty_grids = ()  # an empty grid tensor takes 4.57 into its main branch, which fails on int32
    return build_case(
        rows,
        m=m,
        ids=ids,
        pad_side=pad_side,
        extra_pad=extra_pad,
        mask=mask,
        rng=rng,
        seed=seed,
        ids_dtype=ids_dtype,
        mask_dtype=mask_dtype,
        mm_dtype=mm_dtype,
        noncontiguous=noncontiguous,
        empty_grids=empty_grids,
        notes=notes,
    )


# ----------------------------------------------------------------------------------------------------------------
# wild inputs: what real pipelines feed transformers besides clean batches


WILD_KINDS = (
    "mask_holes",       # random masked-out ranges, hiding text and (parts of) vision spans
    "tril_mask",        # a causal-LM style tril(ones) mask: row b attends to tokens 0..b only
    "segment_ids",      # packed-style segment ids in the mask (1, 2, 3...): 4.57 treats mask != 1 as padding
    "extra_grids",      # grids left over after the last span
    "drop_grid",        # one grid fewer than spans
    "span_length",      # a vision token turned into text, or text into a vision token
    "odd_grid",         # h or w not a multiple of the merge size, t = 0 or t = 2 images, a zero-sized grid
    "vision_start_end", # vision_start as the last token of a row
    "no_vision_start",  # a span's vision_start turned into text: 4.57 reads its vision tokens as text (or finds
                        # them by list.index for a later span); 5.x reads mm_token_type_ids and is unaffected
)


def _mutable(case: Case) -> dict:
    return {k: (None if v is None else v.clone().contiguous()) for k, v in case.tensors().items()}


def perturb(case: Case, seed: int, kind: str | None = None) -> Case:
    """A variant of a clean case that a real pipeline might produce and transformers handles in its own way
    (returning positions for some, failing for others). `kind` is one of WILD_KINDS (random by default)."""
    rng = random.Random(seed)
    kind = kind or rng.choice(WILD_KINDS)
    t = _mutable(case)
    ids, mm = t["input_ids"], t["mm_token_type_ids"]
    B, S = ids.shape
    mask = t["attention_mask"]
    if mask is None:
        mask = torch.ones(B, S, dtype=torch.int64)
    else:
        mask = mask.to(torch.int64)
    attended = mask != 0
    special = case.ids

    def vision_positions(b):
        return [s for s in range(S) if attended[b, s] and int(ids[b, s]) in (special["image"], special["video"])]

    if kind == "mask_holes":
        for _ in range(rng.randint(1, 3)):
            b = rng.randrange(B)
            cols = [s for s in range(S) if attended[b, s]]
            if len(cols) < 2:
                continue
            start = rng.choice(cols[1:]) if rng.random() < 0.5 else rng.choice(vision_positions(b) or cols[1:])
            length = rng.randint(1, 8)
            mask[b, start:start + length] = 0
        if not bool((mask.sum(1) > 0).all()):  # keep every row non-empty (an empty row is another test)
            mask[:, 0] = torch.where(mask.sum(1) > 0, mask[:, 0], torch.ones_like(mask[:, 0]))
    elif kind == "tril_mask":
        tril = torch.tril(torch.ones(B, S, dtype=torch.int64))
        mask = mask * tril if rng.random() < 0.5 else tril
        if not bool((mask.sum(1) > 0).all()):
            mask = tril
    elif kind == "segment_ids":
        for b in range(B):
            cols = [s for s in range(S) if attended[b, s]]
            if len(cols) > 2:
                cut = rng.choice(cols[1:])
                mask[b, cut:] = torch.where(mask[b, cut:] != 0, 2, 0)
                if rng.random() < 0.3 and cut + 3 < S:
                    mask[b, cut + 3:] = torch.where(mask[b, cut + 3:] != 0, 3, 0)
    elif kind == "extra_grids":
        extra = torch.tensor([[rng.choice([1, 2]), rng.choice([2, 4, 6]), rng.choice([2, 4])]])
        key = rng.choice(["image_grid_thw", "video_grid_thw"])
        grid = t[key]
        t[key] = extra if grid is None else torch.cat([grid, extra.to(grid.dtype)])
    elif kind == "drop_grid":
        keys = [k for k in ("image_grid_thw", "video_grid_thw") if t[k] is not None and len(t[k]) > 0]
        if keys:
            key = rng.choice(keys)
            t[key] = t[key][:-1] if rng.random() < 0.5 else t[key][1:]
    elif kind == "span_length":
        for _ in range(rng.randint(1, 2)):
            b = rng.randrange(B)
            vis = vision_positions(b)
            if vis and rng.random() < 0.6:
                s = rng.choice(vis)  # a vision token becomes text
                ids[b, s] = 5
                mm[b, s] = 0
            else:
                cols = [s for s in range(S) if attended[b, s] and int(mm[b, s]) == 0]
                if cols:
                    s = rng.choice(cols)  # a text token becomes a vision token of its neighbour's kind
                    vis_kind = 1 if rng.random() < 0.6 else 2
                    ids[b, s] = special["image"] if vis_kind == 1 else special["video"]
                    mm[b, s] = vis_kind
    elif kind == "odd_grid":
        keys = [k for k in ("image_grid_thw", "video_grid_thw") if t[k] is not None and len(t[k]) > 0]
        if keys:
            key = rng.choice(keys)
            i = rng.randrange(len(t[key]))
            change = rng.choice(["h_odd", "w_odd", "t0", "t2", "zero"])
            if change == "h_odd":
                t[key][i, 1] += 1
            elif change == "w_odd":
                t[key][i, 2] += 1
            elif change == "t0":
                t[key][i, 0] = 0
            elif change == "t2":
                t[key][i, 0] = 2
            else:
                t[key][i, 1] = case.spatial_merge_size - 1 if case.spatial_merge_size > 1 else 0
    elif kind == "no_vision_start":
        for _ in range(rng.randint(1, 2)):
            b = rng.randrange(B)
            starts = [s for s in range(S) if attended[b, s] and int(ids[b, s]) == special["vision_start"]]
            if starts:
                ids[b, rng.choice(starts)] = 5
    elif kind == "vision_start_end":
        b = rng.randrange(B)
        cols = [s for s in range(S) if attended[b, s]]
        ids[b, cols[-1]] = special["vision_start"]
        mm[b, cols[-1]] = 0
    # int64 ids: transformers' index_put of int64 positions into an int32 output fails on the dtype alone, a quirk
    # these cases are not about (ropekit returns the positions, cast)
    t["input_ids"], t["mm_token_type_ids"] = ids.to(torch.int64), mm.to(case.mm_token_type_ids.dtype)
    had_mask = case.attention_mask is not None or not bool((mask == 1).all())
    t["attention_mask"] = mask.to(case.attention_mask.dtype if case.attention_mask is not None
                                  and case.attention_mask.dtype != torch.bool else torch.int64) if had_mask else None
    if case.attention_mask is not None and case.attention_mask.dtype == torch.bool and kind != "segment_ids":
        t["attention_mask"] = mask.bool()
    return Case(case.seed, case.rows, case.spatial_merge_size, case.ids, case.pad_side, **t,
                notes=case.notes + [f"wild:{kind} (seed {seed}); rows describe the case before it"])


def in_vision_start_device_domain(case: Case, frames: bool = True) -> bool:
    """Whether the device algorithm covers this 4.57 ("vision_start") case: every attended vision run matches the
    grid it takes, and per row the vision_start pairs announce exactly those runs. Outside it, transformers' scan
    still turns the spans into positions (which the host algorithm reproduces), and the device algorithm asserts."""
    m, ids = case.spatial_merge_size, case.ids
    B, S = case.input_ids.shape
    mask = case.attention_mask
    images = [] if case.image_grid_thw is None else case.image_grid_thw.tolist()
    entries = []
    for t, h, w in ([] if case.video_grid_thw is None else case.video_grid_thw.tolist()):
        entries += [[1, h, w]] * max(t, 0) if frames else [[t, h, w]]
    grids = {1: iter(images), 2: iter(entries)}
    for b in range(B):
        row = [int(v) for s, v in enumerate(case.input_ids[b].tolist()) if mask is None or mask[b, s] == 1]
        kinds = [2 if v == ids["video"] else 1 if v == ids["image"] else 0 for v in row]
        pairs = {1: 0, 2: 0}
        for i, v in enumerate(row):
            if v == ids["vision_start"]:
                if i + 1 >= len(row):
                    return False
                if kinds[i + 1]:
                    pairs[kinds[i + 1]] += 1
        runs = {1: 0, 2: 0}
        i = 0
        while i < len(row):
            j = i + 1
            while j < len(row) and kinds[j] == kinds[i]:
                j += 1
            if kinds[i]:
                runs[kinds[i]] += 1
                grid = next(grids[kinds[i]], None)
                if grid is None or j - i != grid[0] * (grid[1] // m) * (grid[2] // m):
                    return False
            i = j
        if pairs != runs:
            return False
    return True


def transformers_outcome(model, case: Case):
    """(result, None) when transformers returns, (None, "ExceptionType: message") when it raises."""
    try:
        return transformers_rope_index(model, case), None
    except Exception as e:  # noqa: BLE001 - any failure of transformers' own code is an outcome to mirror
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------------------
# transformers


def installed_convention() -> str:
    """"token_types" for transformers 5.x (get_rope_index takes mm_token_type_ids), "vision_start" for 4.57."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    params = inspect.signature(Qwen3VLModel.get_rope_index).parameters
    return "token_types" if "mm_token_type_ids" in params else "vision_start"


def tiny_qwen3_vl_model():
    """One tiny Qwen3VLModel (random weights) whose get_rope_index we call; its config is adjusted per case."""
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    from conftest import tiny_qwen3_vl_text_config

    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        deepstack_visual_indexes=[0],
        num_position_embeddings=16,
        patch_size=4,
        spatial_merge_size=2,
    )
    torch.manual_seed(0)
    config = Qwen3VLConfig(text_config=tiny_qwen3_vl_text_config().to_dict(), vision_config=vision)
    return Qwen3VLModel(config).eval()


@contextlib.contextmanager
def configured(model, case: Case):
    """Point model.config at the case's merge size and special ids for the duration of one reference call."""
    cfg = model.config
    saved = (
        cfg.vision_config.spatial_merge_size,
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    )
    cfg.vision_config.spatial_merge_size = case.spatial_merge_size
    cfg.image_token_id = case.ids["image"]
    cfg.video_token_id = case.ids["video"]
    cfg.vision_start_token_id = case.ids["vision_start"]
    cfg.vision_end_token_id = case.ids["vision_end"]
    try:
        yield
    finally:
        (
            cfg.vision_config.spatial_merge_size,
            cfg.image_token_id,
            cfg.video_token_id,
            cfg.vision_start_token_id,
            cfg.vision_end_token_id,
        ) = saved


def _clone(t):
    return None if t is None else t.clone()


def transformers_rope_index(model, case: Case, patched: bool = False):
    """transformers' own, unpatched Qwen3VLModel.get_rope_index on (clones of) the case's tensors (patched=True:
    whatever Qwen3VLModel.get_rope_index is now, e.g. ropekit's replacement)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    from ropekit.transformers._patching import original

    fn = Qwen3VLModel.get_rope_index if patched else original(Qwen3VLModel, "get_rope_index")
    with configured(model, case), torch.no_grad():
        if installed_convention() == "token_types":
            return fn(
                model,
                _clone(case.input_ids),
                _clone(case.mm_token_type_ids),
                image_grid_thw=_clone(case.image_grid_thw),
                video_grid_thw=_clone(case.video_grid_thw),
                attention_mask=_clone(case.attention_mask),
            )
        return fn(
            model,
            _clone(case.input_ids),
            _clone(case.image_grid_thw),
            _clone(case.video_grid_thw),
            _clone(case.attention_mask),
        )


# ----------------------------------------------------------------------------------------------------------------
# structural reference (validates the generator: computed from the layout, not from the token ids)


def structural_rope_index(case: Case, convention: str):
    m = case.spatial_merge_size
    B, S = case.input_ids.shape
    has_grids = case.image_grid_thw is not None or case.video_grid_thw is not None
    if convention == "vision_start" and not has_grids:
        # 4.57's separate branch: cumsum of the mask (padding 1), or a plain arange without a mask.
        if case.attention_mask is None:
            pos = torch.arange(S).view(1, 1, S).expand(3, B, S)
            return pos, torch.zeros(B, 1, dtype=case.input_ids.dtype)
        mask = case.attention_mask.long()
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        pos = pos.unsqueeze(0).expand(3, -1, -1)
        return pos, pos.amax(dim=(0, 2)).view(B, 1) + 1 - S

    fill = 0 if convention == "token_types" else 1
    position_ids = torch.full((3, B, S), fill, dtype=case.input_ids.dtype)
    deltas = []
    for b, row in enumerate(case.rows):
        cols: list[list[int]] = [[], [], []]
        pos = 0

        def text(n):
            nonlocal pos
            for k in range(3):
                cols[k] += list(range(pos, pos + n))
            pos += n

        def vision(h, w):
            nonlocal pos
            hh, ww = h // m, w // m
            for i in range(hh):
                for j in range(ww):
                    cols[0].append(pos)
                    cols[1].append(pos + i)
                    cols[2].append(pos + j)
            pos += max(hh, ww)

        for item in row:
            if isinstance(item, Text):
                text(item.n)
            elif isinstance(item, Image):
                text(1), vision(item.h, item.w), text(1)
            else:
                for s in item.stamps:
                    text(s + 1), vision(item.h, item.w), text(1)
        L = len(cols[0])
        sl = slice(S - L, S) if case.pad_side == "left" else slice(0, L)
        position_ids[:, b, sl] = torch.tensor(cols, dtype=position_ids.dtype)
        top = max(max(c) for c in cols)
        deltas.append(top + 1 - (L if convention == "token_types" else S))
    return position_ids, torch.tensor(deltas, dtype=torch.int64).view(B, 1)


# ----------------------------------------------------------------------------------------------------------------
# comparison


def mismatch(got, expected, name: str) -> str | None:
    """None when got is torch.equal to expected with the same dtype, device and shape; otherwise what differs."""
    if not isinstance(got, torch.Tensor):
        return f"{name}: expected a tensor, got {type(got).__name__}"
    if got.dtype != expected.dtype:
        return f"{name}: dtype expected {expected.dtype}, got {got.dtype}"
    if got.device != expected.device:
        return f"{name}: device expected {expected.device}, got {got.device}"
    if got.shape != expected.shape:
        return f"{name}: shape expected {tuple(expected.shape)}, got {tuple(got.shape)}"
    if torch.equal(got, expected):
        return None
    diff = (got.cpu() != expected.cpu()).nonzero().tolist()
    first = diff[:5]
    where = "; ".join(
        f"[{','.join(map(str, idx))}] expected {expected.cpu()[tuple(idx)].item()} got {got.cpu()[tuple(idx)].item()}"
        for idx in first
    )
    out = f"{name}: {len(diff)} element(s) differ, first: {where}"
    if expected.dim() == 3:  # position_ids: show the first differing row in full
        b = first[0][1]
        out += f"\n    row {b} expected:\n{expected.cpu()[:, b].tolist()}\n    row {b} got:\n{got.cpu()[:, b].tolist()}"
    elif expected.dim() == 2:
        out += f"\n    expected {expected.cpu().view(-1).tolist()}\n    got      {got.cpu().view(-1).tolist()}"
    return out


def pad_rows(seqs, types, seq_len: int, pad_id: int, pad_side: str):
    """(input_ids, mm_token_type_ids, attention_mask), each (B, seq_len) int64: the rows' tokens and token types
    padded with `pad_id` / 0 on `pad_side`, the mask 1 on the tokens."""
    batch = len(seqs)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.int64)
    mm = torch.zeros((batch, seq_len), dtype=torch.int64)
    am = torch.zeros((batch, seq_len), dtype=torch.int64)
    for b, (seq, typ) in enumerate(zip(seqs, types)):
        sl = slice(seq_len - len(seq), seq_len) if pad_side == "left" else slice(0, len(seq))
        input_ids[b, sl] = torch.tensor(seq)
        mm[b, sl] = torch.tensor(typ)
        am[b, sl] = 1
    return input_ids, mm, am


def compare(got, expected) -> str | None:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a (position_ids, deltas) pair, got {type(got).__name__}"
    problems = [p for p in (mismatch(got[0], expected[0], "position_ids"), mismatch(got[1], expected[1], "deltas")) if p]
    return "\n  ".join(problems) or None


def outcome_problem(got, expected, error) -> str | None:
    """What differs between a call's result `got` and transformers' outcome (`expected` positions, or None and the
    `error` transformers raised); None when they agree."""
    if expected is None:
        return f"returned positions where transformers raises {error}"
    return compare(got, expected)


def fail_on(failures, total: int, what: str) -> None:
    """pytest.fail listing the first three (case, problem) pairs, if there are any."""
    if failures:
        import pytest

        shown = "\n\n".join(f"{case.describe(with_tensors=True)}\n  {problem}" for case, problem in failures[:3])
        pytest.fail(f"{len(failures)}/{total} {what}:\n{shown}", pytrace=False)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--convention", choices=CONVENTIONS, default=None, help="default: the installed one")
    args = parser.parse_args()
    case = random_case(args.seed, args.convention or installed_convention())
    print(case.describe(with_tensors=True))
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    model = tiny_qwen3_vl_model()
    pos, deltas = transformers_rope_index(model, case)
    print(f"transformers ({installed_convention()}): position_ids =\n{pos}\ndeltas = {deltas.view(-1).tolist()}")
