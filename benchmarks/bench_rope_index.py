"""Benchmark: get_rope_index, transformers vs ropekit (host loop, fused device kernel, ATen reference).

Part 1, Qwen3-VL scenarios (DESIGN section 5 targets on a GPU: B2 S4096 with 8 images + 2 videos <= 65 us, B64 S1024
with 64 images <= 150 us, zero host syncs). Part 2, every mRoPE family's own get_rope_index on one scenario in its
own token layout (Qwen2-VL / Qwen2.5-VL whole videos with time scaling, Qwen3-VL / Qwen3.5 / Qwen4-Exp timestamped
frames, GLM-4V frames inside video brackets).

Inputs live on the benchmark device. transformers runs its own Python code (with its per-row / per-span host syncs on
a GPU); ropekit's host loop pulls the inputs once; the device algorithm never syncs (checked with
torch.cuda.set_sync_debug_mode("error")). Every ropekit result is checked torch.equal to transformers before timing.
The fused kernel is judged on device time: the profiler's sum of the kernels one call launches (the ATen ops that
prepare its inputs included), beside the CUDA-graph replay time and the host-inclusive latency (CUDA events around the
whole Python call: wrapper, checks, launches). Host loop and transformers: synchronous wall time.
Appends both tables to benchmarks/RESULTS.md; --json writes the numbers for gpu_summary.py.

    python benchmarks/bench_rope_index.py [--device cpu|cuda] [--json out.json] [--no-families]
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import sys

import torch

import ropekit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "python"))  # the families' token layouts
import common as bench_common  # noqa: E402
from common import (append_results, bench_graph, bench_host, format_table, kernel_profile, time_us,  # noqa: E402
                    write_json)

MERGE = 2
IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653

# name, batch, seq, images per row, (videos per row, frames per video), left-pad up to this many tokens per row
SCENARIOS = [
    ("B2 S4096, 8 images + 2 videos", 2, 4096, 4, (1, 4), 0),
    ("B4 S8192, 16 images + 4 videos x 4 frames", 4, 8192, 4, (1, 4), 0),
    ("B1 S16384, 8 videos x 16 frames", 1, 16384, 0, (8, 16), 0),
    ("B64 S1024, 64 images", 64, 1024, 1, (0, 0), 0),
    ("B8 S2048 ragged (left pad), 2 images + 1 video x 3 frames", 8, 2048, 2, (1, 3), 1500),
]
TARGETS_US = {"B2 S4096, 8 images + 2 videos": 65.0, "B64 S1024, 64 images": 150.0}


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


def sync_free(fn, device) -> bool | None:
    """Whether fn runs without a host sync (None off CUDA)."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)


def same(out, ref):
    return torch.equal(out[0], ref[0]) and torch.equal(out[1].to(ref[1].device), ref[1])


def time_impls(name, device, run_hf, run_host, run_dev, run_ref, results, rows, target=None):
    ref = run_hf()
    for label, run in (("host", run_host), ("device", run_dev), ("reference", run_ref)):
        if run is not None:
            assert same(run(), ref), f"{name}: ropekit {label} differs from transformers"
    t_hf = bench_host(run_hf, device, warmup=1, reps=5)
    t_host = bench_host(run_host, device, warmup=2, reps=20)
    latency = time_us(run_dev, device, warmup=3, iters=30)  # host-inclusive: events around the whole call
    t_ref = time_us(run_ref, device, warmup=2, iters=10) if run_ref is not None else None
    graph, why = bench_graph(run_dev, device, replays=100)
    kernels_us, launches, _ = kernel_profile(run_dev, device)
    # device time: the kernels' sum from the profiler, else the graph replay; on the CPU the call itself
    t_dev = kernels_us if kernels_us is not None else (graph if graph is not None else latency)
    free = sync_free(run_dev, device)
    record = dict(case=name, transformers_us=t_hf, host_us=t_host, device_us=t_dev, kernels_us=kernels_us,
                  launches=launches, latency_us=latency, reference_us=t_ref, graph_us=graph, graph_note=why,
                  sync_free=free, target_us=target)
    results.append(record)
    write_json(common_json[0], {"device": str(device), "results": results, "partial": True})
    verdict = "" if target is None or device.type != "cuda" else (" PASS" if t_dev <= target and free else " MISS")
    rows.append([name, f"{t_hf:,.0f}", f"{t_host:,.0f}", f"{t_dev:,.1f}", f"{latency:,.1f}",
                 "-" if t_ref is None else f"{t_ref:,.0f}", "-" if graph is None else f"{graph:,.1f}",
                 {None: "-", True: "0", False: "SYNCS"}[free], f"{t_hf / min(t_host, latency):,.0f}x",
                 "-" if target is None else f"<= {target:.0f}{verdict}"])


common_json = [None]  # the --json path, for the per-case writes


def qwen3_vl_scenarios(device, rng, results):
    model = tiny_vl_model()
    hf = type(model).get_rope_index
    hf = getattr(hf, "__ropekit_original__", hf)
    token_types = "mm_token_type_ids" in inspect.signature(hf).parameters
    rows = []
    for name, batch, seq, images, videos, pad in SCENARIOS[:1] if bench_common.DRY_RUN else SCENARIOS:
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
        positional = [common[k] for k in ("mm_token_type_ids", "spatial_merge_size", "image_token_id",
                                          "video_token_id", "vision_start_token_id", "convention")]
        run_ref = lambda: torch.ops.ropekit._rope_index_algorithm(  # noqa: E731
            ids, image_grid, video_grid, mask, *positional, algorithm="reference")
        time_impls(name, device, run_hf, run_host, run_dev, run_ref, results, rows, TARGETS_US.get(name))
    convention = "5.x (mm_token_type_ids)" if token_types else "4.57 (token ids)"
    return rows, convention


def family_scenarios(device, results, only=None):
    """Each family's own get_rope_index on one B2 prompt of ~4K tokens in its layout: 4 images and a video each
    (HunYuan-VL, images only: an image in the video's place)."""
    from family_cases import (FAMILIES, Image, Text, Video, build_family_case, rope_index_model, ropekit_kwargs,
                              tiny_config, transformers_call)

    rows = []
    families = [f for f in FAMILIES.values() if f.available() and (not only or f.name in only)]
    for family in families[:1] if bench_common.DRY_RUN else families:
        config = tiny_config(family)
        row = [Text(40), Image(28, 28), Text(30), Image(20, 36), Text(200), Video(4, 24, 24, [4] * 4), Text(500),
               Image(32, 28), Text(60), Image(16, 16), Text(700)]
        seconds = torch.tensor([2.0, 0.5], dtype=torch.float32) if family.time_scaled else None
        fc = build_family_case(family, config, [row, row[::-1]], m=MERGE, seed=0, second_per_grid_ts=seconds,
                               tokens_per_second=2 if family.time_scaled else None,
                               temporal_merge_size=config.vision_config.temporal_merge_size
                               if family.temporal_merge else 1, num_axes=4 if family.xdrope else 3)
        model = rope_index_model(family, config)
        fn, hf_kwargs = transformers_call(fc, model, device=device)
        case = fc.case.to(device)
        kwargs = ropekit_kwargs(fc)
        for key in ("image_grid_thw", "video_grid_thw", "attention_mask", "mm_token_type_ids", "second_per_grid_ts"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key].to(device)
        run_hf = lambda: fn(model, **hf_kwargs)  # noqa: E731
        run_host = lambda: ropekit.rope_index(case.input_ids, **kwargs, on_host=True)  # noqa: E731
        run_dev = lambda: ropekit.rope_index(case.input_ids, **kwargs, on_host=False)  # noqa: E731
        vision = "10 images" if family.xdrope else "8 images + 2 videos"
        name = f"{family.name}: B2 S{case.input_ids.shape[1]}, {vision}"
        time_impls(name, device, run_hf, run_host, run_dev, None, results, rows)
    return rows


def omni_case(family, seconds, device):
    """One clip of `seconds` s at 2 fps, 336 x 336 pixels (24 x 24 patches, 12 x 12 tokens a frame after the 2 x 2
    merge, one grid frame a second: temporal patches of 2 frames), with its 16 kHz audio (100 feature frames a
    second), in the thinker's use_audio_in_video layout between a short prompt and an answer."""
    from omni_cases import AUDIO_END, VISION_END, VISION_START, OmniCase, audio_tokens, base_config

    config = base_config(family)
    t, h, w = seconds, 24, 24
    features = 100 * seconds
    pps = 13 if family.float_positions else 25
    n_audio = audio_tokens(family, features, 50)
    n_video = t * (h // MERGE) * (w // MERGE)
    rng = random.Random(0)
    tokens = [rng.randint(100, 1000) for _ in range(20)] + [VISION_START, config.audio_start_token_id]
    tokens += [config.video_token_id] * n_video + [config.audio_token_id] * n_audio  # interior order: positions only
    tokens += [AUDIO_END, VISION_END] + [rng.randint(100, 1000) for _ in range(30)]
    ids = torch.tensor([tokens], device=device)
    return OmniCase(ids, None, torch.tensor([[t, h, w]], device=device), torch.ones_like(ids), True,
                    torch.tensor([features], device=device), torch.tensor([1.0], device=device), MERGE, pps, 2, 50)


def omni_scenarios(device, results):
    """The Omni thinkers' get_rope_index (issue targets on the CPU host loop: >= 100x transformers for 30 s with audio
    in video, <= 1 ms for 120 s)."""
    from omni_cases import FAMILIES, rope_index_kwargs, stand_in

    rows = []
    for family in [f for f in FAMILIES if f.model_class() is not None]:
        for seconds in (30, 120):
            case = omni_case(family, seconds, device)
            cls, me = stand_in(family, case)
            run_hf = lambda: cls.get_rope_index(  # noqa: E731
                me, case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask, True,
                case.audio_seqlens, case.second_per_grids)
            kwargs = rope_index_kwargs(family, case)
            args = (case.input_ids, case.image_grid_thw, case.video_grid_thw, case.attention_mask)
            run_host = lambda: ropekit.rope_index(*args, **kwargs, on_host=True)  # noqa: E731
            run_dev = lambda: ropekit.rope_index(*args, **kwargs, on_host=False)  # noqa: E731
            name = f"{family.name}: {seconds} s clip, audio in video, S{case.input_ids.shape[1]}"
            time_impls(name, device, run_hf, run_host, run_dev, None, results, rows,
                       1000.0 if seconds == 120 else None)
            if bench_common.DRY_RUN:
                return rows
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-families", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--family", action="append", default=None,
                        help="time only these families' own get_rope_index (family_cases names; repeatable): no "
                             "Qwen3-VL scenarios, no Omni clips unless named")
    args = parser.parse_args()
    if bench_common.DRY_RUN:
        args.device, args.no_record = "cpu", True
    common_json[0] = args.json
    device = torch.device(args.device)
    results = []
    headers = ["scenario", "transformers us", "ropekit host us", "ropekit device us", "device latency us",
               "ATen reference us", "device graph us", "syncs", "best speed-up", "target us"]
    if not args.family:
        rows, convention = qwen3_vl_scenarios(device, random.Random(0), results)
        table = format_table(headers, rows)
        notes = (f"Qwen3-VL get_rope_index; inputs on {device.type}; transformers {convention} convention; device = "
                 "the fused algorithm (a kernel on CUDA, its serial row code on the CPU): device us = the profiler's "
                 "sum of the kernels of one call (on the CPU the call), latency = CUDA events around the whole Python "
                 "call; every result torch.equal to transformers")
        print(table)
        print(notes)
        if not args.no_record:
            append_results("get_rope_index (Qwen3-VL)", device, table, notes)
    if not args.no_families:
        family_rows = family_scenarios(device, results, only=args.family)
        table = format_table(headers, family_rows)
        notes = (f"each family's own get_rope_index on its own token layout; inputs on {device.type}; every result "
                 "torch.equal to transformers")
        print(table)
        print(notes)
        if not args.no_record:
            append_results("get_rope_index (every mRoPE family)", device, table, notes)
    if not args.no_families and (not args.family or {"qwen2_5_omni", "qwen3_omni"} & set(args.family)):
        omni_rows = omni_scenarios(device, results)
        table = format_table(headers, omni_rows)
        notes = (f"the Omni thinkers' own get_rope_index (Qwen2.5-Omni: position_id_per_seconds 25, int64; Qwen3-Omni: "
                 f"13, float32) on one clip with use_audio_in_video; inputs on {device.type}; targets: host loop >= "
                 "100x transformers at 30 s, <= 1000 us at 120 s; every result torch.equal to transformers")
        print(table)
        print(notes)
        if not args.no_record:
            append_results("get_rope_index (Omni thinkers, audio in video)", device, table, notes)
    write_json(args.json, {"device": str(device), "results": results, "partial": False})


if __name__ == "__main__":
    main()
