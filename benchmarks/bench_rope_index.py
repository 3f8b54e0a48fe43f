"""Benchmark: Qwen3-VL get_rope_index, transformers vs ropekit (host path and device path).

Inputs live on the benchmark device (GPU if present). transformers runs its own Python implementation (with its
per-row / per-span host syncs on a GPU); ropekit's host path pulls the inputs once; its device path never syncs.
Appends the table to benchmarks/RESULTS.md.

    python benchmarks/bench_rope_index.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys

import torch

import ropekit

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import append_results, format_table, time_us  # noqa: E402

MERGE = 2
IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653

# name, batch, seq, images per row, (videos per row, frames per video), left-pad up to this many tokens per row
SCENARIOS = [
    ("B2 S4096, 8 images + 2 videos", 2, 4096, 4, (1, 4), 0),
    ("B4 S8192, 16 images + 4 videos x 4 frames", 4, 8192, 4, (1, 4), 0),
    ("B1 S16384, 8 videos x 16 frames", 1, 16384, 0, (8, 16), 0),
    ("B64 S1024, one image per row", 64, 1024, 1, (0, 0), 0),
    ("B8 S2048 ragged (left pad), 2 images + 1 video x 3 frames", 8, 2048, 2, (1, 3), 1500),
]


def build_inputs(batch, seq, images_per_row, videos, max_pad, device, rng):
    videos_per_row, frames = videos
    ids, image_grids, video_grids = [], [], []
    for _ in range(batch):
        pad = rng.randint(0, max_pad)
        budget = seq - pad
        items = ["image"] * images_per_row + ["video"] * videos_per_row
        rng.shuffle(items)
        share = budget // (len(items) + 1)
        row = []
        for item in items:
            n_frames = 1 if item == "image" else frames
            # largest (h, w) grid, multiples of the merge size, whose tokens fit in this item's share
            per_frame = max(1, (share - 4 * n_frames) // n_frames)
            side = max(1, int((per_frame ** 0.5)))
            h, w = side * MERGE, max(1, per_frame // side) * MERGE
            tokens = (h // MERGE) * (w // MERGE)
            text = share - n_frames * (tokens + 3)
            row += [rng.randint(100, 1000) for _ in range(max(1, text))]
            for _ in range(n_frames):
                row += [rng.randint(100, 1000), START] + [IMAGE if item == "image" else VIDEO] * tokens + [END]
            (image_grids if item == "image" else video_grids).append([1 if item == "image" else n_frames, h, w])
        row += [rng.randint(100, 1000) for _ in range(budget - len(row))]
        row = row[:budget]
        ids.append([0] * pad + row)
    ids = torch.tensor(ids, device=device)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : (ids[b] == 0).sum()] = 0 if max_pad else 1
    types = torch.where(ids == IMAGE, 1, torch.where(ids == VIDEO, 2, 0))
    to = lambda g: torch.tensor(g, device=device, dtype=torch.long) if g else None  # noqa: E731
    return ids, mask, types, to(image_grids), to(video_grids)


def tiny_vl_model():
    from transformers import Qwen3VLConfig, Qwen3VLModel

    text = dict(vocab_size=160000, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    if not hasattr(Qwen3VLConfig().text_config, "rope_parameters"):  # 4.57 reads mrope_section from rope_scaling
        text["rope_scaling"] = {"rope_type": "default", "mrope_section": [4, 2, 2]}
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=32,
                  spatial_merge_size=MERGE, deepstack_visual_indexes=[0])
    return Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = tiny_vl_model()
    hf = type(model).get_rope_index
    hf = getattr(hf, "__ropekit_original__", hf)
    token_types = "mm_token_type_ids" in inspect.signature(hf).parameters
    rng = random.Random(0)
    rows = []
    for name, batch, seq, images, videos, pad in SCENARIOS:
        ids, mask, types, image_grid, video_grid = build_inputs(batch, seq, images, videos, pad, device, rng)
        if token_types:
            run_hf = lambda: hf(model, ids, types, image_grid, video_grid, mask)  # noqa: E731
        else:
            run_hf = lambda: hf(model, ids, image_grid, video_grid, mask)  # noqa: E731
        common = dict(mm_token_type_ids=types if token_types else None, spatial_merge_size=MERGE,
                      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
                      convention="token_types" if token_types else "vision_start")
        run_host = lambda: ropekit.rope_index(ids, image_grid, video_grid, mask, on_host=True, **common)  # noqa: E731
        run_dev = lambda: ropekit.rope_index(ids, image_grid, video_grid, mask, on_host=False, **common)  # noqa: E731
        ref = run_hf()
        for run in (run_host, run_dev):
            out = run()
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), f"{name}: ropekit differs"
        t_hf = time_us(run_hf, device, warmup=1, iters=5, min_time_s=0.0)
        t_host = time_us(run_host, device, warmup=2, iters=20)
        t_dev = time_us(run_dev, device, warmup=2, iters=20)
        rows.append([name, f"{t_hf:,.0f}", f"{t_host:,.0f}", f"{t_dev:,.0f}", f"{t_hf / min(t_host, t_dev):,.0f}x"])
    headers = ["scenario", "transformers us", "ropekit host us", "ropekit device us", "best speed-up"]
    table = format_table(headers, rows)
    notes = (f"inputs on {device.type}; transformers {'5.x (mm_token_type_ids)' if token_types else '4.57 (token ids)'}"
             " convention; every ropekit result checked torch.equal to transformers before timing")
    print(table)
    print(notes)
    if not args.no_record:
        append_results("get_rope_index", device, table, notes)


if __name__ == "__main__":
    main()
