"""Benchmark: Qwen3 q_norm / k_norm + RoPE (forward, forward+backward, decode).

transformers eager (Qwen3RMSNorm modules + apply_rotary_pos_emb, as the attention runs them), torch.compile of the
same code, Liger-Kernel (LigerRMSNorm + liger_rotary_pos_emb; from third_party/liger/src when copied there) and
ropekit's fused op, on random inputs, with DESIGN.md section 5's method:

- device time: median of CUDA-event timings with the L2 flushed before each call (do_bench style);
- host: median synchronous latency including the launch (what a caller waits);
- decode also as CUDA-graph replay; kernels per call and device time per call from the profiler;
- forward+backward as torch.autograd.grad(outputs, inputs, grads) with the incoming grads made once;
- byte floor = (bytes read + bytes written once) / the device-to-device copy bandwidth measured in this run;
- accuracy: relative error against a float64 reference (outputs; gradients for fwd+bwd), peak memory of fwd+bwd.

Appends the tables to benchmarks/RESULTS.md (device, versions, date, command).

    python benchmarks/bench_qk_norm_rope.py                   # GPU: B4 S4096, B1 S32768, fwd+bwd, decode B64 S1
    python benchmarks/bench_qk_norm_rope.py --device cpu --batch 1 --seq 1024
"""

from __future__ import annotations

import sys

import torch

from ropekit import ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    append_results, attention_case_args, bench_device, bench_graph, bench_host, format_table, kernel_profile,
    liger_source, measure_copy_bandwidth, peak_memory, rel_err, short_kernel, write_json,
)

EPS = 1e-6


def eager_impl():
    from transformers.models.qwen3 import modeling_qwen3

    apply = getattr(modeling_qwen3.apply_rotary_pos_emb, "__ropekit_original__", modeling_qwen3.apply_rotary_pos_emb)
    norm_cls = modeling_qwen3.Qwen3RMSNorm
    norm_forward = getattr(norm_cls.forward, "__ropekit_original__", norm_cls.forward)

    def build(q_weight, k_weight):
        q_norm, k_norm = norm_cls(q_weight.numel(), EPS), norm_cls(k_weight.numel(), EPS)
        q_norm.weight, k_norm.weight = q_weight, k_weight
        d = q_weight.numel()

        def run(q, k, cos, sin):
            qh = norm_forward(q_norm, q.view(*q.shape[:2], -1, d)).transpose(1, 2)
            kh = norm_forward(k_norm, k.view(*k.shape[:2], -1, d)).transpose(1, 2)
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


def reference64(q, k, q_weight, k_weight, cos, sin):
    """float64 q_norm/k_norm + RoPE: the exact function every implementation approximates."""
    d = q_weight.numel()

    def one(x, w):
        x = x.double().view(*x.shape[:2], -1, d)
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double()
        n = n.transpose(1, 2)
        c, s = cos.double()[:, None], sin.double()[:, None]
        half = d // 2
        rot = torch.cat((-n[..., half:], n[..., :half]), -1)
        return n * c + rot * s

    return one(q, q_weight), one(k, k_weight)


def main():
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--json", default=None, help="also write the results as JSON here")
    extra.add_argument("--skip-long", action="store_true", help="skip the B1 S32768 forward")
    extra.add_argument("--compile-long", action="store_true", help="also time torch.compile at B1 S32768")
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args, device, batch, seq, dtype, elt = attention_case_args(__doc__)
    gpu = device.type == "cuda"
    H, Hk, D = args.heads, args.kv_heads, args.head_dim
    bandwidth = measure_copy_bandwidth(device)
    liger_note = liger_source() if gpu else "Liger-Kernel: GPU only"
    results, kernel_rows = [], []

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
    if gpu and dtype in (torch.bfloat16, torch.float16):
        # the forward's launch-bounds knob (csrc/qk_norm_rope.h): 5 resident blocks per SM instead of 4, for the
        # summary to choose by measurement; same bits
        def min_blocks_5(q, k, cos, sin):
            previous = torch.ops.ropekit._cuda_forward_min_blocks(5)
            try:
                return ops.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, EPS)
            finally:
                torch.ops.ropekit._cuda_forward_min_blocks(previous)

        builders["ropekit (min blocks 5)"] = min_blocks_5

    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=device).float() / D))
    tables = ops.rope_cache(inv, 40960)

    def inputs(b, s):
        q = (torch.randn(b, s, H * D, generator=gen) * 2).to(device, dtype)
        k = (torch.randn(b, s, Hk * D, generator=gen) * 2).to(device, dtype)
        pos = torch.randint(0, 40960, (b, s), generator=gen).to(device)
        cos, sin = ops.rope_cos_sin(*tables, pos, dtype)
        return q, k, cos, sin

    def floor_us(nbytes):
        return nbytes / bandwidth * 1e6

    def record(case, name, dev_us, nbytes, **extra_cols):
        fl = floor_us(nbytes)
        results.append(dict(case=case, impl=name, device_us=dev_us, floor_us=fl, bytes=nbytes,
                            vs_floor=dev_us / fl, pct_bw=100 * fl / dev_us, **extra_cols))
        print(f"  {case:<22} {name:<22} {dev_us:10.1f} us  floor {fl:8.1f} us  {dev_us / fl:5.2f}x", flush=True)
        write_json(known.json, {"results": results, "kernels": kernel_rows, "partial": True})

    # ordered by value: the targets first, so a run stopped by its time limit has measured them
    cases = [("fwd", batch, seq), ("fwd+bwd", batch, seq), ("decode fwd", 64 if gpu else 16, 1)]
    if gpu and not known.skip_long:
        cases.append(("fwd", 1, 32768))
    for kind, b, s in cases:
        case = f"{kind} B{b} S{s}"
        q, k, cos, sin = inputs(b, s)
        tokens = b * s
        qk_bytes = tokens * (H + Hk) * D * elt
        cs_bytes = 2 * tokens * D * elt
        fwd_bytes = 2 * qk_bytes + cs_bytes  # read q, k and cos, sin; write q, k
        ref_q, ref_k = reference64(q, k, q_weight.detach(), k_weight.detach(), cos, sin)
        if kind != "fwd+bwd":
            for name, fn in builders.items():
                if name == "ropekit (min blocks 5)" and kind.startswith("decode"):
                    continue  # one block: the knob is about occupancy at scale
                if s == 32768 and name.startswith("torch.compile") and not known.compile_long:
                    continue  # its target is the byte floor; a recompile for this shape costs the GPU check ~20 s
                with torch.no_grad():
                    call = lambda: fn(q, k, cos, sin)  # noqa: E731
                    out = call()
                    err = max(rel_err(out[0], ref_q), rel_err(out[1], ref_k))
                    dev = bench_device(call, device)
                    host = bench_host(call, device) if gpu else None
                    graph, why = bench_graph(call, device) if kind.startswith("decode") else (None, "")
                    total, launches, per_kernel = kernel_profile(call, device)
                record(case, name, dev, fwd_bytes, host_us=host, graph_us=graph, graph_note=why, kernels=launches,
                       profiled_us=total, rel_err=err)
                for kname, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:4]:
                    kernel_rows.append([case, name, short_kernel(kname), f"{us:,.1f}"])
            if kind.startswith("decode"):  # the in-place qkv form an inference engine calls
                qkv = torch.cat([q, k, torch.randn_like(k)], -1)
                call = lambda: ops.qk_norm_rope_qkv_(qkv, q_weight.detach(), k_weight.detach(), cos, sin,  # noqa: E731
                                                     EPS, H, Hk)
                dev = bench_device(call, device)
                host = bench_host(call, device) if gpu else None
                graph, why = bench_graph(call, device)
                total, launches, _ = kernel_profile(call, device)
                record(case, "ropekit qkv_ (in place)", dev, fwd_bytes, host_us=host, graph_us=graph, graph_note=why,
                       kernels=launches, profiled_us=total, rel_err=None)
            continue
        # forward + backward: autograd.grad with the incoming gradients made once
        gq = torch.randn(b, H, s, D, generator=gen).to(device, dtype)
        gk = torch.randn(b, Hk, s, D, generator=gen).to(device, dtype)
        qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()
        q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
        qw64, kw64 = q_weight.detach().double().requires_grad_(), k_weight.detach().double().requires_grad_()
        r_out = reference64(q64, k64, qw64, kw64, cos, sin)
        ref_grads = torch.autograd.grad(r_out, [q64, k64, qw64, kw64], [gq.double(), gk.double()])
        bwd_bytes = 3 * qk_bytes + cs_bytes  # read x and its gradient, write dx; read cos, sin
        for name, fn in builders.items():
            if name == "ropekit (min blocks 5)":
                continue  # a forward-only knob
            def step(fn=fn):
                return torch.autograd.grad(fn(qr, kr, cos, sin), [qr, kr, q_weight, k_weight], [gq, gk])

            grads = step()
            err = max(rel_err(g, r) for g, r in zip(grads, ref_grads))
            del grads
            dev = bench_device(step, device)
            host = bench_host(step, device) if gpu else None
            mem = peak_memory(step, device)
            total, launches, per_kernel = kernel_profile(step, device)
            record(case, name, dev, fwd_bytes + bwd_bytes, host_us=host, graph_us=None, graph_note="",
                   kernels=launches, profiled_us=total, rel_err=err, peak_mib=None if mem is None else mem / 2 ** 20)
            for kname, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:4]:
                kernel_rows.append([case, name, short_kernel(kname), f"{us:,.1f}"])

    def fmt(v, spec=",.1f"):
        return "-" if v is None else format(v, spec)

    headers = ["case", "implementation", "device us", "floor us", "vs floor", "% BW", "host us", "graph us",
               "kernels", "rel err vs fp64", "peak MiB"]
    rows = [[r["case"], r["impl"], fmt(r["device_us"]), fmt(r["floor_us"]), f"{r['vs_floor']:.2f}x",
             f"{r['pct_bw']:.0f}%", fmt(r.get("host_us")), fmt(r.get("graph_us")),
             fmt(r.get("kernels"), ".0f"), fmt(r.get("rel_err"), ".2e"), fmt(r.get("peak_mib"))] for r in results]
    table = format_table(headers, rows)
    ktable = format_table(["case", "implementation", "kernel (profiler)", "device us / call"], kernel_rows) \
        if kernel_rows else ""
    graph_notes = sorted({f"{r['impl']}: {r['graph_note']}" for r in results if r.get("graph_note")})
    notes = (f"Hq{H} Hkv{Hk} D{D} {args.dtype}, random inputs and norm weights; copy bandwidth measured "
             f"{bandwidth / 1e9:,.0f} GB/s; byte floor = (bytes read + written once) / copy bandwidth (fwd: q, k, "
             f"cos, sin read, q, k written; bwd: x and dy read, dx written, cos, sin read); device us: median with "
             f"L2 flushed; host us: synchronous, launch included; {liger_note}"
             + (f"; graph capture failed for {'; '.join(graph_notes)}" if graph_notes else ""))
    print(table)
    if ktable:
        print(ktable)
    print(notes)
    write_json(known.json, {"results": results, "kernels": kernel_rows, "notes": notes, "partial": False})
    if not args.no_record:
        append_results("q/k RMSNorm + RoPE (qk_norm_rope)", device, table + ("\n\n" + ktable if ktable else ""),
                       notes)


if __name__ == "__main__":
    main()
