"""Benchmark: Qwen3 q_norm / k_norm + RoPE (forward, forward+backward, decode).

transformers eager (Qwen3RMSNorm modules + apply_rotary_pos_emb), torch.compile of the same code, Liger-Kernel
(LigerRMSNorm + liger_rotary_pos_emb, when importable) and ropekit's fused op, with the byte floor of each case.
Appends the table to benchmarks/RESULTS.md.

    python benchmarks/bench_qk_norm_rope.py                       # GPU if present: B4 S4096 + decode B64 S1
    python benchmarks/bench_qk_norm_rope.py --device cpu --batch 1 --seq 1024
"""

from __future__ import annotations

import sys

import torch

from ropekit import ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import append_results, attention_case_args, format_table, measure_copy_bandwidth, time_us  # noqa: E402

EPS = 1e-6


def eager_impl():
    from transformers.models.qwen3 import modeling_qwen3

    apply = getattr(modeling_qwen3.apply_rotary_pos_emb, "__ropekit_original__", modeling_qwen3.apply_rotary_pos_emb)
    norm_cls = modeling_qwen3.Qwen3RMSNorm

    def build(q_weight, k_weight):
        q_norm, k_norm = norm_cls(q_weight.numel(), EPS), norm_cls(k_weight.numel(), EPS)
        q_norm.weight, k_norm.weight = q_weight, k_weight
        d = q_weight.numel()

        def run(q, k, cos, sin):
            qh = q_norm(q.view(*q.shape[:2], -1, d)).transpose(1, 2)
            kh = k_norm(k.view(*k.shape[:2], -1, d)).transpose(1, 2)
            return apply(qh, kh, cos, sin)

        return run

    return build


def liger_impl():
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        return None

    def build(q_weight, k_weight):
        d = q_weight.numel()
        q_norm, k_norm = LigerRMSNorm(d, EPS).to(q_weight.device), LigerRMSNorm(d, EPS).to(q_weight.device)
        q_norm.weight, k_norm.weight = q_weight, k_weight

        def run(q, k, cos, sin):
            qh = q_norm(q.view(*q.shape[:2], -1, d)).transpose(1, 2)
            kh = k_norm(k.view(*k.shape[:2], -1, d)).transpose(1, 2)
            return liger_rotary_pos_emb(qh, kh, cos, sin)

        return run

    return build


def main():
    args, device, batch, seq, dtype, elt = attention_case_args(__doc__)
    gpu = device.type == "cuda"
    H, Hk, D = args.heads, args.kv_heads, args.head_dim
    bandwidth = measure_copy_bandwidth(device)
    rows = []

    gen = torch.Generator().manual_seed(0)
    q_weight = torch.nn.Parameter((torch.randn(D, generator=gen) * 0.2 + 1).to(device, dtype))
    k_weight = torch.nn.Parameter((torch.randn(D, generator=gen) * 0.2 + 1).to(device, dtype))
    builders = {"transformers eager": eager_impl()(q_weight, k_weight)}
    if not args.no_compile:
        builders["torch.compile(eager)"] = torch.compile(eager_impl()(q_weight, k_weight), fullgraph=True)
    liger = liger_impl() if gpu else None
    if liger is not None:
        builders["Liger-Kernel"] = liger(q_weight, k_weight)
    builders["ropekit"] = lambda q, k, cos, sin: ops.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, EPS)

    for case, (b, s) in {"fwd": (batch, seq), "decode fwd": (64 if gpu else 16, 1)}.items():
        q = torch.randn(b, s, H * D, generator=gen).to(device, dtype)
        k = torch.randn(b, s, Hk * D, generator=gen).to(device, dtype)
        pos = torch.randint(0, 32768, (b, s), generator=gen).to(device)
        inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=device).float() / D))
        cos, sin = ops.rope_cos_sin(*ops.rope_cache(inv, 32768), pos, dtype)
        qk_bytes = b * s * (H + Hk) * D * elt
        fwd_bytes = 2 * qk_bytes + 2 * b * s * D * elt
        for name, fn in builders.items():
            with torch.no_grad():
                us = time_us(lambda: fn(q, k, cos, sin), device)
            floor = fwd_bytes / bandwidth * 1e6
            rows.append([f"{case} B{b} S{s}", name, f"{us:,.1f}", f"{floor:,.1f}", f"{us / floor:.2f}x",
                         f"{100 * floor / us:.0f}%"])
        if case != "fwd":
            continue
        gq = torch.randn(b, H, s, D, generator=gen).to(device, dtype)
        gk = torch.randn(b, Hk, s, D, generator=gen).to(device, dtype)
        bwd_bytes = 3 * qk_bytes + 2 * b * s * D * elt  # read grads + q/k, write dq/dk, read cos/sin
        for name, fn in builders.items():
            qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()

            def step():
                out_q, out_k = fn(qr, kr, cos, sin)
                torch.autograd.backward([out_q, out_k], [gq, gk])
                qr.grad = kr.grad = q_weight.grad = k_weight.grad = None

            us = time_us(step, device)
            floor = (fwd_bytes + bwd_bytes) / bandwidth * 1e6
            rows.append([f"fwd+bwd B{b} S{s}", name, f"{us:,.1f}", f"{floor:,.1f}", f"{us / floor:.2f}x",
                         f"{100 * floor / us:.0f}%"])

    table = format_table(["case", "implementation", "median us", "byte floor us", "vs floor", "% of copy BW"], rows)
    notes = (f"Hq{H} Hkv{Hk} D{D} {args.dtype}, random norm weights; copy bandwidth measured "
             f"{bandwidth / 1e9:,.0f} GB/s; byte floor = (bytes read + written) / copy bandwidth")
    print(table)
    print(notes)
    if not args.no_record:
        append_results("q/k RMSNorm + RoPE (qk_norm_rope)", device, table, notes)


if __name__ == "__main__":
    main()
