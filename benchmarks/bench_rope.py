"""Benchmark: model-level cos/sin and apply_rope (forward, forward+backward).

Compares ropekit with transformers eager, torch.compile of the same eager code, and Liger-Kernel's rope (when
importable), with the byte floor of each case. Appends the table to benchmarks/RESULTS.md.

    python benchmarks/bench_rope.py                    # GPU if present: B4 S4096, Qwen3-8B heads, bf16
    python benchmarks/bench_rope.py --device cpu --batch 1 --seq 1024
"""

from __future__ import annotations

import copy
import sys

import torch

import ropekit
from ropekit import ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import H100_COPY_BW, append_results, attention_case_args, format_table, measure_copy_bandwidth, time_us  # noqa: E402


def qwen3_8b_rotary():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    kwargs = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960)
    if hasattr(Qwen3Config(), "rope_parameters"):
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    else:
        kwargs["rope_theta"] = 1e6
    return Qwen3RotaryEmbedding(Qwen3Config(**kwargs))


def eager_apply_rotary_pos_emb():
    from transformers.models.qwen3 import modeling_qwen3

    return getattr(modeling_qwen3.apply_rotary_pos_emb, "__ropekit_original__", modeling_qwen3.apply_rotary_pos_emb)


def liger_rope():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception:  # not installed, or no Triton backend for this device
        return None
    # Liger rotates in place on contiguous copies of q/k; clone so every timed call sees the same inputs.
    return lambda q, k, cos, sin: LigerRopeFunction.apply(q.clone(), k.clone(), cos, sin)


def main():
    args, device, batch, seq, dtype, elt = attention_case_args(__doc__)
    gpu = device.type == "cuda"
    H, Hk, D = args.heads, args.kv_heads, args.head_dim

    bandwidth = measure_copy_bandwidth(device)
    floor_us = lambda nbytes: nbytes / bandwidth * 1e6  # noqa: E731
    rows = []

    def row(case, impl, us, nbytes):
        fl = floor_us(nbytes)
        rows.append([case, impl, f"{us:,.1f}", f"{fl:,.1f}", f"{us / fl:.2f}x", f"{100 * fl / us:.0f}%"])

    # --- model-level cos/sin -------------------------------------------------------------------------------
    rotary = qwen3_8b_rotary().to(device)
    x = torch.empty(1, dtype=dtype, device=device)
    position_ids = torch.arange(seq, device=device)[None].expand(batch, -1).contiguous()
    hf_forward = type(rotary).forward
    cos_sin_bytes = 2 * batch * seq * D * elt + position_ids.numel() * 8 + 2 * batch * seq * (D // 2) * 4
    row("cos/sin", "transformers eager", time_us(lambda: hf_forward(rotary, x, position_ids), device), cos_sin_bytes)
    ropekit.apply_to_qwen3()
    patched = copy.deepcopy(rotary)
    row("cos/sin", "ropekit", time_us(lambda: patched(x, position_ids), device), cos_sin_bytes)
    ropekit.unpatch()

    # --- apply_rope ----------------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seq, H, D, generator=gen).to(device, dtype).transpose(1, 2)
    k = torch.randn(batch, seq, Hk, D, generator=gen).to(device, dtype).transpose(1, 2)
    cos, sin = hf_forward(rotary, q, position_ids)
    eager = eager_apply_rotary_pos_emb()
    impls = {"transformers eager": eager}
    if not args.no_compile:
        impls["torch.compile(eager)"] = torch.compile(eager, fullgraph=True)
    liger = liger_rope() if gpu else None
    if liger is not None:
        impls["Liger-Kernel"] = liger
    impls["ropekit"] = ops.apply_rope

    qk_bytes = batch * seq * (H + Hk) * D * elt
    fwd_bytes = 2 * qk_bytes + 2 * batch * seq * D * elt  # read q,k + write q,k + read cos,sin
    for name, fn in impls.items():
        with torch.no_grad():
            row("apply_rope fwd", name, time_us(lambda: fn(q, k, cos, sin), device), fwd_bytes)

    gq, gk = torch.randn_like(q), torch.randn_like(k)
    for name, fn in impls.items():
        qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()

        def step():
            out_q, out_k = fn(qr, kr, cos, sin)
            torch.autograd.backward([out_q, out_k], [gq, gk])
            qr.grad = kr.grad = None

        row("apply_rope fwd+bwd", name, time_us(step, device), 2 * fwd_bytes)

    headers = ["case", "implementation", "median us", "byte floor us", "vs floor", "% of copy BW"]
    table = format_table(headers, rows)
    notes = (
        f"B{batch} S{seq} Hq{H} Hkv{Hk} D{D} {args.dtype}; copy bandwidth measured {bandwidth / 1e9:,.0f} GB/s"
        + (f" (DESIGN reference H100: {H100_COPY_BW / 1e12:.1f} TB/s)" if gpu else "")
        + "; byte floor = (bytes read + written) / copy bandwidth"
    )
    print(table)
    print(notes)
    if not args.no_record:
        append_results("apply_rope and model-level cos/sin", device, table, notes)


if __name__ == "__main__":
    main()
