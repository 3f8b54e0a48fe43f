"""Benchmark: the vision towers (issue: native rotary apply in every vision encoder, sync-free vision positions).

1. The per-block rotary apply at real tower shapes (Qwen2.5-VL-7B: 16 heads x 80, N = 8192 and 16384 patches;
   Qwen3-VL-8B: 16 x 72), on the q/k views the towers pass (``qkv.reshape(N, 3, H, D).permute(1, 0, 2, 3).unbind``),
   forward and forward+backward: transformers' ``apply_rotary_pos_emb_vision`` (eager), ``torch.compile`` of it, and
   ``ropekit.apply_rope_vision``, against the byte floor (q and k read and written once, cos/sin read once; the
   backward the same again) and checked bit-identical to eager.
2. Host syncs per tower forward, unpatched vs patched (transformers 4.57) or fed by ``ropekit.data`` (5.x, under a
   flash-style attention): ``torch.cuda.set_sync_debug_mode`` counts on a GPU, the ``tests/python/sync_count.py``
   harness on a CPU.
3. A whole tower forward at real widths and depth 2, patched vs unpatched, per family.

    python benchmarks/bench_vision.py                  # GPU if present, else CPU with the same shapes (fewer runs)
    python benchmarks/bench_vision.py --device cpu --tokens 8192
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

import torch

import ropekit
from ropekit import ops

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "python"))  # sync_count
from common import (  # noqa: E402
    DRY_RUN, append_results, bench_device, bench_host, format_table, kernel_profile, measure_copy_bandwidth, rel_err,
    time_us, write_json,
)

# Real tower configurations (their published configs), depth cut to --depth.
TOWERS = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VisionTransformerPretrainedModel", "Qwen2VLVisionConfig",
                 dict(embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLVisionConfig",
                   dict(hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLVisionModel", "Qwen3VLVisionConfig",
                 dict(hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=[0])),
    "glm4v": ("glm4v", "Glm4vVisionModel", "Glm4vVisionConfig",
              dict(hidden_size=1536, num_heads=12, intermediate_size=4096, out_hidden_size=4096, patch_size=14,
                   image_size=336, spatial_merge_size=2, temporal_patch_size=2)),
}


APPLY = {"qwen2_vl": ropekit.apply_to_qwen2_vl, "qwen2_5_vl": ropekit.apply_to_qwen2_5_vl,
         "qwen3_vl": ropekit.apply_to_qwen3_vl, "glm4v": ropekit.apply_to_glm4v}


def family_function(family):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return getattr(module.apply_rotary_pos_emb_vision, "__ropekit_original__", module.apply_rotary_pos_emb_vision)


def build_tower(name, depth, device, dtype):
    module_name, cls_name, config_name, kwargs = TOWERS[name]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    config_module = importlib.import_module(f"transformers.models.{module_name}.configuration_{module_name}")
    config = getattr(config_module, config_name)(depth=depth, **kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tower = getattr(module, cls_name)(config)
    return tower.to(device, dtype).eval()


def image_grid(name, images, side_px):
    patch = TOWERS[name][3]["patch_size"]
    side = side_px // patch // 2 * 2  # a multiple of the merge size
    return torch.tensor([[1, side, side]] * images)


def apply_cases(args):
    """(label, tokens, heads, head_dim) of the rotary apply cases."""
    cases = [("Qwen2.5-VL-7B", n, 16, 80) for n in args.tokens] + [("Qwen3-VL-8B", args.tokens[0], 16, 72)]
    if DRY_RUN:
        cases = [("Qwen2.5-VL-7B", 64, 2, 80), ("Qwen3-VL-8B", 64, 2, 72)]
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="images per tower forward (448 px on a GPU)")
    parser.add_argument("--only", nargs="+", choices=("apply", "syncs", "tower"), default=None,
                        help="run only these sections")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if DRY_RUN:
        args.device, args.no_compile, args.no_record, args.depth, args.images = "cpu", True, True, 1, 2
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gpu = device.type == "cuda"
    elt = torch.tensor([], dtype=dtype).element_size()
    bandwidth = measure_copy_bandwidth(device)
    results = []

    def save(final=False):
        write_json(args.json, {"results": results, "partial": not final})

    sections = set(args.only or ("apply", "syncs", "tower"))

    # ---- 1. the rotary apply ---------------------------------------------------------------------------------
    eager = family_function("qwen2_5_vl")
    for label, n, heads, head_dim in apply_cases(args) if "apply" in sections else ():
        gen = torch.Generator().manual_seed(0)
        qkv = torch.randn(n, 3 * heads * head_dim, generator=gen).to(device, dtype)
        q, k, _ = qkv.reshape(n, 3, heads, head_dim).permute(1, 0, 2, 3).unbind(0)
        pos = torch.randint(0, 64, (n, 2), generator=gen).float()
        inv = 1.0 / (1e4 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2)))
        freqs = (pos[..., None] * inv).reshape(n, -1)
        emb = torch.cat([freqs, freqs], -1).to(device)
        cos, sin = emb.cos(), emb.sin()
        impls = {"transformers eager": eager, "ropekit": ops.apply_rope_vision}  # compile last: its compile time
        if not args.no_compile:
            torch._dynamo.reset()  # one function compiled per case (shapes, grad mode): no recompile limit to meet
            impls["torch.compile(eager)"] = torch.compile(eager, fullgraph=True)
        qk_bytes = 2 * n * heads * head_dim * elt
        fwd_bytes = 2 * qk_bytes + 2 * n * head_dim * 4  # q, k read and written once; fp32 cos, sin read once
        reference = eager(q, k, cos, sin)
        ref64 = [(x.double() * cos.double()[:, None] + torch.cat(
            [-x.double()[..., head_dim // 2:], x.double()[..., :head_dim // 2]], -1) * sin.double()[:, None])
            for x in (q, k)]
        gq, gk = torch.randn_like(reference[0]), torch.randn_like(reference[1])
        qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()
        for name, fn in impls.items():
            with torch.no_grad():
                out = fn(q, k, cos, sin)
            exact = all(torch.equal(a, b) for a, b in zip(out, reference))
            err = max(rel_err(o, r) for o, r in zip(out, ref64))

            def step(fn=fn):
                return torch.autograd.grad(fn(qr, kr, cos, sin), [qr, kr], [gq, gk])

            for case, fn_, nbytes in ((f"{label} N{n} fwd", lambda fn=fn: fn(q, k, cos, sin), fwd_bytes),
                                      (f"{label} N{n} fwd+bwd", step, 2 * fwd_bytes)):
                dev = bench_device(fn_, device) if gpu else time_us(fn_, device, iters=5 if n > 4096 else 10)
                floor = nbytes / bandwidth * 1e6
                launches = kernel_profile(fn_, device)[1] if gpu else None
                results.append(dict(section="apply", case=case, impl=name, device_us=dev, floor_us=floor,
                                    vs_floor=dev / floor, pct_bw=100 * floor / dev, rel_err=err, exact=exact,
                                    host_us=bench_host(fn_, device) if gpu else None, kernels=launches))
                print(f"  {case:<32} {name:<22} {dev:10.1f} us  floor {floor:8.1f} us  {dev / floor:6.2f}x  "
                      f"{'identical' if exact else 'DIFFERS'}", flush=True)
                save()

    # ---- 2. host syncs per tower forward ---------------------------------------------------------------------
    for name, images in (("qwen2_5_vl", 1), ("qwen2_5_vl", 64), ("qwen3_vl", 64), ("glm4v", 64), ("qwen2_vl", 64)):
        if "syncs" not in sections or DRY_RUN and images > 2:
            continue
        tower = build_tower(name, 1, device, torch.float32)
        grid = image_grid(name, images, 56)
        config = tower.config
        patch = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        pixels = torch.randn(int(grid.prod(-1).sum()), patch).to(device)
        counts = {}
        takes_inputs = tower_takes_inputs(tower)
        if takes_inputs:  # 5.x: both runs under the flash-style attention, whose own path needs no host value
            use_varlen_attention(tower)
        for mode in ("transformers", "ropekit"):
            ropekit.unpatch()
            kwargs = {}
            if mode == "ropekit":
                APPLY[name]()
                kwargs = tower_inputs(tower, grid, device) if takes_inputs else {}
            counts[mode] = count_syncs(tower, pixels, grid.to(device), kwargs, device)
        ropekit.unpatch()
        how = "ropekit.data inputs" if takes_inputs else "patched helpers"
        results.append(dict(section="syncs", case=f"{name} {images} images", impl="transformers",
                            syncs=counts["transformers"]))
        results.append(dict(section="syncs", case=f"{name} {images} images", impl=f"ropekit ({how})",
                            syncs=counts["ropekit"]))
        print(f"  syncs {name:<12} {images:3d} images: transformers {counts['transformers']:5d}, "
              f"ropekit ({how}) {counts['ropekit']:3d}", flush=True)
        save()

    # ---- 3. a tower forward, patched vs unpatched ------------------------------------------------------------
    side_px = 448 if gpu else 224
    for name in TOWERS:
        if "tower" not in sections or importlib.util.find_spec(f"transformers.models.{TOWERS[name][0]}") is None:
            continue
        tower = build_tower(name, args.depth, device, dtype)
        grid = image_grid(name, args.images, 56 if DRY_RUN else side_px)
        config = tower.config
        patch = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        gen = torch.Generator().manual_seed(1)
        pixels = torch.randn(int(grid.prod(-1).sum()), patch, generator=gen).to(device, dtype)
        grid_d = grid.to(device)
        times = {}
        for patched in (False, True):
            ropekit.unpatch()
            if patched:
                APPLY[name]()
            with torch.no_grad():
                times[patched] = time_us(lambda: tower(pixels, grid_thw=grid_d), device, iters=3 if not gpu else 10,
                                         warmup=1 if not gpu else 3)
        ropekit.unpatch()
        tokens = int(grid.prod(-1).sum())
        results.append(dict(section="tower", case=f"{name} depth {args.depth}, {args.images} x {side_px}px "
                            f"({tokens} patches)", impl="transformers", device_us=times[False]))
        results.append(dict(section="tower", case=results[-1]["case"], impl="ropekit (patched)",
                            device_us=times[True], speedup=times[False] / times[True]))
        print(f"  tower {name:<12} unpatched {times[False] / 1e3:9.2f} ms  patched {times[True] / 1e3:9.2f} ms  "
              f"{times[False] / times[True]:.2f}x", flush=True)
        save()

    # ---- report ----------------------------------------------------------------------------------------------
    def fmt(v, spec=",.1f"):
        return "-" if v is None else format(v, spec)

    apply_rows = [[r["case"], r["impl"], fmt(r["device_us"]), fmt(r["floor_us"]), f"{r['vs_floor']:.2f}x",
                   f"{r['pct_bw']:.0f}%", fmt(r.get("host_us")), fmt(r.get("kernels"), ".0f"),
                   "identical" if r["exact"] else "DIFFERS", f"{r['rel_err']:.1e}"]
                  for r in results if r["section"] == "apply"]
    tower_rows = [[r["case"], r["impl"], fmt(r["device_us"] / 1e3, ",.2f"), fmt(r.get("speedup"), ".2f")]
                  for r in results if r["section"] == "tower"]
    sync_rows = [[r["case"], r["impl"], str(r["syncs"])] for r in results if r["section"] == "syncs"]
    tables = []
    if apply_rows:
        tables.append(format_table(["case", "implementation", "us", "floor us", "vs floor", "% BW", "host us",
                                    "kernels", "vs eager", "rel err vs fp64"], apply_rows))
    if tower_rows:
        tables.append(format_table(["tower forward", "implementation", "ms", "speed-up"], tower_rows))
    if sync_rows:
        tables.append(format_table(["host syncs per tower forward", "implementation", "syncs"], sync_rows))
    text = "\n\n".join(tables)
    notes = (f"{args.dtype} rotary apply on the towers' strided q/k views with fp32 cos/sin; copy bandwidth measured "
             f"{bandwidth / 1e9:,.0f} GB/s; byte floor = q, k read + written once and cos, sin read once (twice that "
             f"fwd+bwd); {'device medians, L2 flushed' if gpu else 'CPU wall-clock medians'}. Tower forwards at their "
             f"real widths, depth {args.depth}, sdpa attention, random weights. Syncs: towers of depth 1 with 64 "
             f"images of 56 px (4 x 4 patches), counted by "
             f"{'torch.cuda.set_sync_debug_mode warnings' if gpu else 'tests/python/sync_count.py (CPU stand-in)'}; "
             f"transformers 4.57 towers: patched vs unpatched (vision_positions); 5.x towers: with vs without "
             f"ropekit.data's inputs, both under a flash-style varlen attention (defined in this script, sync-free).")
    print(text)
    print(notes)
    save(final=True)
    if not args.no_record:
        append_results("vision towers: rotary apply, tower forward, host syncs", device, text, notes)


def tower_takes_inputs(tower) -> bool:
    from ropekit.data import VisionInputs, VisionInputsUnavailable

    try:
        VisionInputs.for_tower(tower)
    except VisionInputsUnavailable:
        return False
    return True


_VARLEN = "ropekit_bench_flash_varlen"


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      **kwargs):
    positions = torch.arange(query.shape[2], device=query.device)
    segment = torch.searchsorted(cu_seq_lens_q[1:].contiguous(), positions, right=True)
    mask = segment[:, None] == segment[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


def use_varlen_attention(tower):
    from transformers import AttentionInterface

    AttentionInterface.register(_VARLEN, _varlen_attention)
    tower.config._attn_implementation = _VARLEN


def tower_inputs(tower, grid, device):
    """5.x: the tower's precomputed inputs (ropekit.data's derivation; derived after the attention is chosen, so
    that a flash attention's max_seqlen is precomputed too)."""
    from ropekit.data import VisionInputs

    inputs = VisionInputs.for_tower(tower)
    return {k[len("image_"):]: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in inputs(image_grid_thw=grid).items()}


def count_syncs(tower, pixels, grid, kwargs, device) -> int:
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.no_grad():
                    tower(pixels, grid_thw=grid, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchronizing" in str(w.message).lower() for w in caught)
    from sync_count import SyncCounter

    with torch.no_grad(), SyncCounter(tower, pixels, grid, *kwargs.values()) as syncs:
        tower(pixels, grid_thw=grid, **kwargs)
    return syncs.count


if __name__ == "__main__":
    main()
