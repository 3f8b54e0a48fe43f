"""`make demo`: what ropekit does to a Qwen3 model, shown on a tiny model built from its config (random weights).

1. Patches transformers' Qwen3 with ropekit and checks the logits are unchanged.
2. Times the cos/sin path (the rotary embedding every forward runs) and apply_rotary_pos_emb, before and after.
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
    ropekit.unpatch()

    rows = [
        ["cos/sin (rotary_emb forward)", f"{hf_us:,.1f}", f"{rk_us:,.1f}", f"{hf_us / rk_us:.1f}x",
         "bit-identical" if same else "DIFFERENT"],
        ["apply_rotary_pos_emb (q 32 heads, k 8)", f"{hf_apply_us:,.1f}", f"{rk_apply_us:,.1f}",
         f"{hf_apply_us / rk_apply_us:.1f}x", "<= eager's error vs fp64"],
    ]
    print(f"2) per-forward cost at B{batch} S{seq}, head_dim 128, bf16 ({'CUDA events' if gpu else 'CPU wall clock'}, median):")
    print(format_table(["path", "transformers us", "ropekit us", "speed-up", "numbers"], rows))
    print("\nropekit.unpatch() restored the original transformers functions.")


if __name__ == "__main__":
    main()
