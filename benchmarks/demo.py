"""`make demo`: what ropekit does to Qwen3 and Qwen3-VL models, on tiny models built from their configs (random
weights, nothing downloaded).

1. Parity: patches transformers with ropekit and checks that fp32 logits, a training step's gradients and a
   multimodal greedy `generate` (images, a 2-frame video, a left-padded row) are unchanged.
2. Timing: the paths ropekit replaces, at a realistic size (Qwen3-8B heads: 32 q heads, 8 kv heads, head_dim
   128, bf16): the rotary embedding's cos/sin, apply_rotary_pos_emb, the attention prologue (q_norm / k_norm + RoPE)
   and Qwen3-VL's get_rope_index; against transformers eager, `torch.compile` of the same eager code, and
   Liger-Kernel when it is importable on a GPU.
3. A PNG bar chart of the timings (`--plot`, default benchmarks/demo.png).

The checkout is left as it was: only `--record` (`make demo RECORD=1`) appends the parity and timing tables of a
full run (not `--quick`) to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

import torch

import ropekit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, device_name, format_table, time_us, versions  # noqa: E402

LAYERS_8B = 36  # Qwen3-8B's decoder layers, to turn a per-layer saving into a per-forward one


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    kwargs = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=40960)
    kwargs.update(overrides)
    if hasattr(Qwen3Config(), "rope_parameters"):
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    else:
        kwargs["rope_theta"] = 1e6
    config = Qwen3Config(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def qwen3_vl_model(device):
    """A tiny Qwen3-VL (vision tower included) whose image/video tokens use the real special token ids."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    rope = {"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True}
    text = dict(vocab_size=152000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    if hasattr(Qwen3VLConfig().text_config, "rope_parameters"):
        text["rope_parameters"] = dict(rope, rope_theta=5e6)
    else:
        text.update(rope_theta=5e6, rope_scaling=rope)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
                  spatial_merge_size=2, patch_size=4, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    return Qwen3VLForConditionalGeneration(config).to(device).eval()


def multimodal_prompt(model, device):
    """Row 0: text, an image and a 2-frame video; row 1: left-padded text and a smaller image."""
    config = model.config
    image, video, start, end = (config.image_token_id, config.video_token_id, config.vision_start_token_id,
                                config.vision_end_token_id)
    image_grid, video_grid = torch.tensor([[1, 4, 6], [1, 4, 4]]), torch.tensor([[2, 4, 4]])
    tokens = lambda grid: int(grid.prod()) // 4  # noqa: E731  (2x2 merge)
    row0 = [11, 12, start] + [image] * tokens(image_grid[0]) + [end, 13, start]
    row0 += ([video] * (tokens(video_grid[0]) // 2) + [end, 14, start]) + [video] * (tokens(video_grid[0]) // 2)
    row0 += [end, 15]
    row1 = [21, start] + [image] * tokens(image_grid[1]) + [end, 22, 23]
    pad = len(row0) - len(row1)
    ids = torch.tensor([row0, [0] * pad + row1])
    patch = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    gen = torch.Generator().manual_seed(2)
    inputs = dict(
        input_ids=ids, attention_mask=torch.tensor([[1] * len(row0), [0] * pad + [1] * len(row1)]),
        image_grid_thw=image_grid, video_grid_thw=video_grid,
        pixel_values=torch.randn(int(image_grid.prod(-1).sum()), patch, generator=gen),
        pixel_values_videos=torch.randn(int(video_grid.prod(-1).sum()), patch, generator=gen),
    )
    if "mm_token_type_ids" in inspect.signature(type(model.model).get_rope_index).parameters:  # transformers 5.x
        inputs["mm_token_type_ids"] = torch.where(ids == image, 1, torch.where(ids == video, 2, 0))
    return {name: value.to(device) for name, value in inputs.items()}


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def verdict(diff: float, tolerance: float = 1e-5) -> str:
    return "identical" if diff == 0 else f"within {tolerance:g}" if diff <= tolerance else "MISMATCH"


def parity(device):
    """Patched vs unpatched on the same models; returns table rows and whether everything matched."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(qwen3_config()).to(device)
    ids = torch.randint(0, 1024, (2, 256), device=device)

    def logits_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = logits_and_grads()
    ropekit.apply_to_qwen3(model)
    logits, grads = logits_and_grads()
    grad_diff = max(max_diff(grads[n], ref_grads[n]) for n in ref_grads)

    vl = qwen3_vl_model(device)
    inputs = multimodal_prompt(vl, device)
    with torch.no_grad():
        ref_vl = vl(**inputs).logits
        ref_tokens = vl.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        ropekit.apply_to_qwen3_vl(vl)
        vl_logits = vl(**inputs).logits
        tokens = vl.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    same_tokens = torch.equal(tokens, ref_tokens)
    # the ropekit paths really ran (a silent fallback would also give equal numbers)
    took_ropekit_paths = all("_ropekit_table" in vars(rotary) for rotary in
                             (model.model.rotary_emb, vl.model.language_model.rotary_emb))
    new = tokens.shape[1] - inputs["input_ids"].shape[1]
    checks = [
        ("Qwen3, fp32 logits (B2 S256)", max_diff(logits, ref_logits), 1e-5),
        ("Qwen3, one training step: every parameter gradient", grad_diff, 1e-4),
        ("Qwen3-VL, logits with 2 images + a 2-frame video, left padding", max_diff(vl_logits, ref_vl), 1e-5),
    ]
    rows = [[name, f"{diff:.2g}", verdict(diff, tol)] for name, diff, tol in checks]
    rows.append([f"Qwen3-VL, greedy generate ({new} new tokens x 2 rows)", "-",
                 "same tokens" if same_tokens else "DIFFERENT TOKENS"])
    rows.append(["the patched models served cos/sin from ropekit's cached tables", "-",
                 "yes" if took_ropekit_paths else "NO (fell back)"])
    ok = same_tokens and took_ropekit_paths and all(diff <= tol for _, diff, tol in checks)
    return rows, ok


def liger_functions():
    """Liger-Kernel's RoPE and RMSNorm (Triton, GPU only) when importable, else None."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None
    return liger_rotary_pos_emb, LigerRMSNormFunction


def timings(device, compile_baseline: bool, quick: bool = False):
    """Per-call medians (us) of each replaced path: {path: {"transformers eager": t, ..., "ropekit": t}}."""
    from transformers.models.qwen3 import modeling_qwen3

    gpu = device.type == "cuda"
    batch, seq = (4, 4096) if gpu else (1, 256 if quick else 2048)
    dtype = torch.bfloat16
    torch.manual_seed(3)
    rotary = modeling_qwen3.Qwen3RotaryEmbedding(qwen3_config()).to(device)
    x = torch.empty(1, dtype=dtype, device=device)
    position_ids = torch.arange(seq, device=device)[None].expand(batch, -1).contiguous()
    hf_rotary = type(rotary).forward.__ropekit_original__
    hf_apply = modeling_qwen3.apply_rotary_pos_emb.__ropekit_original__

    q = torch.randn(batch, seq, 32, 128, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq, 8, 128, device=device, dtype=dtype).transpose(1, 2)
    cos, sin = rotary(q, position_ids)
    q_raw, k_raw = q.transpose(1, 2).reshape(batch, seq, -1), k.transpose(1, 2).reshape(batch, seq, -1)
    q_norm = modeling_qwen3.Qwen3RMSNorm(128).to(device, dtype)
    k_norm = modeling_qwen3.Qwen3RMSNorm(128).to(device, dtype)
    with torch.no_grad():
        q_norm.weight.normal_(1.0, 0.2)
        k_norm.weight.normal_(1.0, 0.2)
    eps = q_norm.variance_epsilon

    def prologue_hf():
        qh = q_norm(q_raw.view(batch, seq, -1, 128)).transpose(1, 2)
        kh = k_norm(k_raw.view(batch, seq, -1, 128)).transpose(1, 2)
        return hf_apply(qh, kh, cos, sin)

    paths = {
        "cos/sin (rotary_emb forward)": {
            "transformers eager": lambda: hf_rotary(rotary, x, position_ids),
            "ropekit": lambda: rotary(x, position_ids),
        },
        "apply_rotary_pos_emb (32 q + 8 kv heads)": {
            "transformers eager": lambda: hf_apply(q, k, cos, sin),
            "ropekit": lambda: modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin),
        },
        "attention prologue: q/k RMSNorm + RoPE": {
            "transformers eager": prologue_hf,
            "ropekit": lambda: ropekit.qk_norm_rope(q_raw, k_raw, q_norm.weight, k_norm.weight, cos, sin, eps),
        },
    }
    if compile_baseline:
        paths["apply_rotary_pos_emb (32 q + 8 kv heads)"]["torch.compile"] = (
            lambda f=torch.compile(hf_apply): f(q, k, cos, sin))
        paths["attention prologue: q/k RMSNorm + RoPE"]["torch.compile"] = torch.compile(prologue_hf)
    liger = liger_functions() if gpu else None
    if liger is not None:
        liger_rope, liger_rms = liger
        paths["apply_rotary_pos_emb (32 q + 8 kv heads)"]["Liger-Kernel"] = lambda: liger_rope(q, k, cos, sin)

        def prologue_liger():
            qh = liger_rms.apply(q_raw.view(batch, seq, -1, 128), q_norm.weight, eps, 0.0, "llama").transpose(1, 2)
            kh = liger_rms.apply(k_raw.view(batch, seq, -1, 128), k_norm.weight, eps, 0.0, "llama").transpose(1, 2)
            return liger_rope(qh, kh, cos, sin)

        paths["attention prologue: q/k RMSNorm + RoPE"]["Liger-Kernel"] = prologue_liger

    results = {}
    with torch.no_grad():
        rk_cos_sin = rotary(x, position_ids)
        same_table = all(torch.equal(a, b) for a, b in zip(hf_rotary(rotary, x, position_ids), rk_cos_sin))
        for path, impls in paths.items():
            results[path] = {name: time_us(fn, device) for name, fn in impls.items()}
    hf_index, rk_index = rope_index_timing(device)
    results["Qwen3-VL get_rope_index (B2 S4096, 8 images + 2 videos)"] = {
        "transformers eager": hf_index, "ropekit": rk_index}
    return results, same_table, f"B{batch} S{seq}"


def rope_index_timing(device):
    """transformers' get_rope_index vs ropekit.rope_index on one of the benchmark layouts (inputs on `device`)."""
    import random

    from bench_rope_index import MERGE, build_inputs, tiny_vl_model

    model = tiny_vl_model()
    hf = type(model).get_rope_index
    hf = getattr(hf, "__ropekit_original__", hf)  # transformers' own, patched or not
    ids, mask, types, image_grid, video_grid = build_inputs(2, 4096, 4, (1, 4), 0, device, random.Random(0))
    if "mm_token_type_ids" in inspect.signature(hf).parameters:
        run_hf = lambda: hf(model, ids, types, image_grid, video_grid, mask)  # noqa: E731
        kwargs = dict(mm_token_type_ids=types, convention="token_types")
    else:
        run_hf = lambda: hf(model, ids, image_grid, video_grid, mask)  # noqa: E731
        kwargs = dict(image_token_id=model.config.image_token_id, video_token_id=model.config.video_token_id,
                      vision_start_token_id=model.config.vision_start_token_id, convention="vision_start")
    run_rk = lambda: ropekit.rope_index(ids, image_grid, video_grid, mask, spatial_merge_size=MERGE,  # noqa: E731
                                        on_host=device.type == "cpu", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(run_hf(), run_rk())), "rope_index differs from transformers"
    return time_us(run_hf, device, warmup=1, iters=5, min_time_s=0.0), time_us(run_rk, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.png"))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to build)")
    parser.add_argument("--quick", action="store_true", help="a short CPU run (S256, no compile): the test suite's")
    parser.add_argument("--record", action="store_true",
                        help="append the tables of a full run to benchmarks/RESULTS.md (a tracked file)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"ropekit demo on {device_name(device)}\n{versions()}; CUDA kernels in this build: "
          f"{ropekit.has_cuda_kernels()}\n")

    rows, ok = parity(device)
    parity_text = ("1) Does patching change any number? Same tiny models, unpatched vs ropekit.apply_to_*(model):\n"
                   + format_table(["check", "max |difference|", "result"], rows))
    print(parity_text)

    results, same_table, shape = timings(device, compile_baseline=not (args.no_compile or args.quick), quick=args.quick)
    ropekit.unpatch()
    baselines = [name for name in ("transformers eager", "torch.compile", "Liger-Kernel")
                 if any(name in r for r in results.values())]
    table = []
    for path, times in results.items():
        cells = [f"{times[b]:,.1f}" if b in times else "-" for b in baselines]
        table.append([path, *cells, f"{times['ropekit']:,.1f}",
                      f"{times['transformers eager'] / times['ropekit']:.1f}x"])
    clock = "CUDA events" if device.type == "cuda" else "CPU wall clock"
    timing_text = (f"2) Time per call at {shape}, Qwen3-8B heads (32 q, 8 kv, head_dim 128), bf16 ({clock}, median "
                   f"us):\n" + format_table(["path", *[f"{b} us" for b in baselines], "ropekit us", "vs eager"], table)
                   + f"\n   cos/sin from the cached table are bit-identical to transformers': {same_table}")
    print("\n" + timing_text)

    prologue = results["attention prologue: q/k RMSNorm + RoPE"]
    rotary = results["cos/sin (rotary_emb forward)"]
    saved_ms = ((prologue["transformers eager"] - prologue["ropekit"]) * LAYERS_8B
                + rotary["transformers eager"] - rotary["ropekit"]) / 1e3
    print(f"\n   In words: at {shape} a Qwen3-8B forward runs the rotary embedding once and the attention prologue "
          f"{LAYERS_8B} times;\n   ropekit takes {saved_ms:,.1f} ms off that forward here, with the numbers above "
          "unchanged.")

    if args.record and not args.quick:
        append_results(f"make demo (tiny models; paths timed at {shape}, Qwen3-8B heads, bf16)", device,
                       parity_text + "\n\n" + timing_text)
    plot = write_plot(results, baselines, f"{device_name(device)}, {shape}, bf16", args.plot)
    print(f"\n3) plot: {plot}" if plot else "\n3) plot skipped (matplotlib not installed)")
    print("\nropekit.unpatch() restored the original transformers functions.")
    if not ok or not same_table:
        sys.exit("PARITY FAILURE: see the tables above")


def write_plot(results, baselines, subtitle, path):
    """Grouped horizontal bars per path (log scale): each baseline and ropekit, annotated with the speed-up."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = [*baselines, "ropekit"]
    colors = {"transformers eager": "#999999", "torch.compile": "#f2a541", "Liger-Kernel": "#6aa84f",
              "ropekit": "#1f77b4"}
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9.5, 1.1 * len(results) + 1.6))
    for s, name in enumerate(series):
        ys = [i - 0.4 + (s + 0.5) * height for i in range(len(results))]
        xs = [times.get(name, 0.0) for times in results.values()]
        ax.barh(ys, xs, height=height, label=name, color=colors[name])
        if name == "ropekit":
            for y, (xv, times) in zip(ys, zip(xs, results.values())):
                ax.text(xv, y, f"  {times['transformers eager'] / xv:.1f}x vs eager", va="center", fontsize=8)
    ax.set_yticks(range(len(results)), list(results), fontsize=8)
    ax.invert_yaxis()  # table order, top to bottom
    ax.set_xscale("log")
    ax.set_xlabel("microseconds per call (median, log scale; lower is better)")
    ax.set_title(f"ropekit vs the baselines\n{subtitle}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
