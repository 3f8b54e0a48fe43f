"""`make demo`: what ropekit does to a Qwen3 model, shown on a tiny model built from its config (random weights).

1. Patches transformers' Qwen3 with ropekit and checks the logits are unchanged.
2. Times, before and after, the paths ropekit replaces: the cos/sin of the rotary embedding, apply_rotary_pos_emb,
   the attention prologue (q_norm / k_norm + RoPE) and Qwen3-VL's get_rope_index.
"""

from __future__ import annotations

import sys

import torch

import ropekit

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import device_name, format_table, time_us  # noqa: E402


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


def rope_index_timing(device):
    """transformers' get_rope_index vs ropekit.rope_index on one of the benchmark layouts (inputs on `device`)."""
    import inspect
    import random

    from bench_rope_index import MERGE, build_inputs, tiny_vl_model

    model = tiny_vl_model()
    hf = type(model).get_rope_index
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
    assert all(torch.equal(a, b) for a, b in zip(run_hf(), run_rk()))
    return time_us(run_hf, device, warmup=1, iters=5, min_time_s=0.0), time_us(run_rk, device)


def main():
    from transformers import Qwen3ForCausalLM
    from transformers.models.qwen3 import modeling_qwen3

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    print(f"ropekit demo on {device_name(device)}; CUDA kernels in this build: {ropekit.has_cuda_kernels()}\n")

    # 1. Parity ---------------------------------------------------------------------------------------------
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(qwen3_config()).to(device).eval()
    ids = torch.randint(0, 1024, (2, 256), device=device)
    with torch.no_grad():
        before = model(ids).logits
        ropekit.apply_to_qwen3()
        after = model(ids).logits
    diff = (after - before).abs().max().item()
    print("1) tiny Qwen3 (2 layers, head_dim 128), fp32 logits, patched vs unpatched:")
    print(f"   max |difference| = {diff:.3g}  -> {'IDENTICAL' if diff == 0 else 'within 1e-5' if diff <= 1e-5 else 'MISMATCH'}\n")

    # 2. Timing ---------------------------------------------------------------------------------------------
    batch, seq = (4, 4096) if gpu else (1, 2048)
    dtype = torch.bfloat16
    rotary = model.model.rotary_emb
    x = torch.empty(1, dtype=dtype, device=device)
    position_ids = torch.arange(seq, device=device)[None].expand(batch, -1).contiguous()
    original_forward = type(rotary).forward.__ropekit_original__
    hf_us = time_us(lambda: original_forward(rotary, x, position_ids), device)
    rk_us = time_us(lambda: rotary(x, position_ids), device)

    q = torch.randn(batch, seq, 32, 128, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq, 8, 128, device=device, dtype=dtype).transpose(1, 2)
    cos, sin = rotary(q, position_ids)
    hf_apply = modeling_qwen3.apply_rotary_pos_emb.__ropekit_original__
    hf_apply_us = time_us(lambda: hf_apply(q, k, cos, sin), device)
    rk_apply_us = time_us(lambda: modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin), device)
    same = all(torch.equal(a, b) for a, b in zip(original_forward(rotary, x, position_ids), rotary(x, position_ids)))

    q_raw, k_raw = q.transpose(1, 2).reshape(batch, seq, -1), k.transpose(1, 2).reshape(batch, seq, -1)
    q_norm, k_norm = modeling_qwen3.Qwen3RMSNorm(128).to(device, dtype), modeling_qwen3.Qwen3RMSNorm(128).to(device, dtype)

    def prologue_hf():
        qh = q_norm(q_raw.view(batch, seq, -1, 128)).transpose(1, 2)
        kh = k_norm(k_raw.view(batch, seq, -1, 128)).transpose(1, 2)
        return hf_apply(qh, kh, cos, sin)

    with torch.no_grad():
        hf_prologue_us = time_us(prologue_hf, device)
        rk_prologue_us = time_us(lambda: ropekit.qk_norm_rope(q_raw, k_raw, q_norm.weight, k_norm.weight, cos, sin,
                                                              q_norm.variance_epsilon), device)
    ropekit.unpatch()
    hf_index_us, rk_index_us = rope_index_timing(device)

    rows = [
        ["cos/sin (rotary_emb forward)", f"{hf_us:,.1f}", f"{rk_us:,.1f}", f"{hf_us / rk_us:.1f}x",
         "bit-identical" if same else "DIFFERENT"],
        ["apply_rotary_pos_emb (q 32 heads, k 8)", f"{hf_apply_us:,.1f}", f"{rk_apply_us:,.1f}",
         f"{hf_apply_us / rk_apply_us:.1f}x", "<= eager's error vs fp64"],
        ["attention prologue: q/k RMSNorm + RoPE", f"{hf_prologue_us:,.1f}", f"{rk_prologue_us:,.1f}",
         f"{hf_prologue_us / rk_prologue_us:.1f}x", "<= eager's error vs fp64"],
        ["Qwen3-VL get_rope_index (B2 S4096, 8 images + 2 videos)", f"{hf_index_us:,.1f}", f"{rk_index_us:,.1f}",
         f"{hf_index_us / rk_index_us:.1f}x", "identical (torch.equal)"],
    ]
    print(f"2) per-forward cost at B{batch} S{seq}, head_dim 128, bf16 ({'CUDA events' if gpu else 'CPU wall clock'}, median):")
    print(format_table(["path", "transformers us", "ropekit us", "speed-up", "numbers"], rows))
    plot = write_plot(rows, f"{device_name(device)}, B{batch} S{seq}, bf16")
    print(f"\n3) plot: {plot}" if plot else "\n3) plot skipped (matplotlib not installed)")
    print("\nropekit.unpatch() restored the original transformers functions.")


def write_plot(rows, subtitle):
    """Horizontal bars, transformers vs ropekit per path (log scale), saved next to this script."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import os

    labels = [r[0] for r in rows]
    hf = [float(r[1].replace(",", "")) for r in rows]
    rk = [float(r[2].replace(",", "")) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.9 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], hf, height=0.4, label="transformers eager", color="#999999")
    ax.barh([i - 0.2 for i in y], rk, height=0.4, label="ropekit", color="#1f77b4")
    for i, (a, b) in enumerate(zip(hf, rk)):
        ax.text(b, i - 0.2, f"  {a / b:.1f}x faster", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("microseconds per call (median, log scale)")
    ax.set_title(f"ropekit vs transformers\n{subtitle}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
