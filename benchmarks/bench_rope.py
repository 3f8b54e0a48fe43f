"""Benchmark: model-level cos/sin and apply_rope (forward, forward+backward).

Compares ropekit with transformers eager, torch.compile of the same eager code, and Liger-Kernel's rope (from
third_party/liger/src when copied there), on random inputs, with DESIGN.md section 5's method (device medians with
the L2 flushed, host-inclusive synchronous times, per-kernel device times from the profiler, forward+backward as
torch.autograd.grad with the incoming grads made once, the byte floor from the copy bandwidth measured in this
run, accuracy against float64; cos/sin must be bit-identical). Appends the table to benchmarks/RESULTS.md.

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
from common import (  # noqa: E402
    append_results, attention_case_args, bench_device, bench_host, format_table, kernel_profile, liger_source,
    measure_copy_bandwidth, peak_memory, rel_err, short_kernel, write_json,
)


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
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:  # not installed, or no Triton backend for this device
        return None
    return liger_rotary_pos_emb


def main():
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--json", default=None, help="also write the results as JSON here")
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args, device, batch, seq, dtype, elt = attention_case_args(__doc__)
    gpu = device.type == "cuda"
    H, Hk, D = args.heads, args.kv_heads, args.head_dim
    bandwidth = measure_copy_bandwidth(device)
    liger_note = liger_source() if gpu else "Liger-Kernel: GPU only"
    results, kernel_rows = [], []

    def record(case, name, fn, nbytes, err=None, mem_fn=None, exact=None):
        dev = bench_device(fn, device)
        host = bench_host(fn, device) if gpu else None
        total, launches, per_kernel = kernel_profile(fn, device)
        mem = peak_memory(mem_fn, device) if mem_fn is not None else None
        fl = nbytes / bandwidth * 1e6
        results.append(dict(case=case, impl=name, device_us=dev, floor_us=fl, bytes=nbytes, vs_floor=dev / fl,
                            pct_bw=100 * fl / dev, host_us=host, kernels=launches, profiled_us=total, rel_err=err,
                            exact=exact, peak_mib=None if mem is None else mem / 2 ** 20))
        for kname, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:3]:
            kernel_rows.append([case, name, short_kernel(kname), f"{us:,.1f}"])
        print(f"  {case:<28} {name:<22} {dev:10.1f} us  floor {fl:8.1f} us  {dev / fl:5.2f}x", flush=True)
        write_json(known.json, {"results": results, "kernels": kernel_rows, "partial": True})

    # --- model-level cos/sin (the rotary embedding forward) ------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    rotary = qwen3_8b_rotary().to(device)
    x = torch.empty(1, dtype=dtype, device=device)
    position_ids = torch.randint(0, 40960, (batch, seq), generator=gen).to(device)
    hf_forward = type(rotary).forward
    ref_cos, ref_sin = hf_forward(rotary, x, position_ids)
    cos_sin_bytes = 2 * batch * seq * D * elt + position_ids.numel() * 8 + 2 * batch * seq * (D // 2) * 4
    record("cos/sin", "transformers eager", lambda: hf_forward(rotary, x, position_ids), cos_sin_bytes, exact=True)
    if not args.no_compile:
        compiled_rotary = torch.compile(lambda x, p: hf_forward(rotary, x, p), fullgraph=True)
        c_cos, c_sin = compiled_rotary(x, position_ids)
        record("cos/sin", "torch.compile(eager)", lambda: compiled_rotary(x, position_ids), cos_sin_bytes,
               exact=bool(torch.equal(c_cos, ref_cos) and torch.equal(c_sin, ref_sin)))
    ropekit.apply_to_qwen3()
    try:
        patched = copy.deepcopy(rotary)
        p_cos, p_sin = patched(x, position_ids)
        record("cos/sin", "ropekit (patched module)", lambda: patched(x, position_ids), cos_sin_bytes,
               exact=bool(torch.equal(p_cos, ref_cos) and torch.equal(p_sin, ref_sin)))
    finally:
        ropekit.unpatch()
    tables = ops.rope_cache(rotary.inv_freq, 40960, rotary.attention_scaling)
    o_cos, o_sin = ops.rope_cos_sin(*tables, position_ids, dtype)
    record("cos/sin", "ropekit rope_cos_sin op", lambda: ops.rope_cos_sin(*tables, position_ids, dtype),
           cos_sin_bytes, exact=bool(torch.equal(o_cos, ref_cos) and torch.equal(o_sin, ref_sin)))

    # --- apply_rope ----------------------------------------------------------------------------------------
    q = (torch.randn(batch, seq, H, D, generator=gen) * 2).to(device, dtype).transpose(1, 2)
    k = (torch.randn(batch, seq, Hk, D, generator=gen) * 2).to(device, dtype).transpose(1, 2)
    cos, sin = ref_cos, ref_sin
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
    ref = eager(q.double(), k.double(), cos.double(), sin.double())
    for name, fn in impls.items():
        with torch.no_grad():
            out = fn(q, k, cos, sin)
            err = max(rel_err(o, r) for o, r in zip(out, ref))
            record("apply_rope fwd", name, lambda fn=fn: fn(q, k, cos, sin), fwd_bytes, err=err)

    gq, gk = torch.randn_like(q), torch.randn_like(k)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    ref_grads = torch.autograd.grad(eager(q64, k64, cos.double(), sin.double()), [q64, k64],
                                    [gq.double(), gk.double()])
    qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()
    for name, fn in impls.items():
        def step(fn=fn):
            return torch.autograd.grad(fn(qr, kr, cos, sin), [qr, kr], [gq, gk])

        err = max(rel_err(g, r) for g, r in zip(step(), ref_grads))
        record("apply_rope fwd+bwd", name, step, 2 * fwd_bytes, err=err, mem_fn=step)

    def fmt(v, spec=",.1f"):
        return "-" if v is None else format(v, spec)

    headers = ["case", "implementation", "device us", "floor us", "vs floor", "% BW", "host us", "kernels",
               "rel err vs fp64 / bit-identical", "peak MiB"]
    rows = [[r["case"], r["impl"], fmt(r["device_us"]), fmt(r["floor_us"]), f"{r['vs_floor']:.2f}x",
             f"{r['pct_bw']:.0f}%", fmt(r["host_us"]), fmt(r["kernels"], ".0f"),
             fmt(r["rel_err"], ".2e") if r["exact"] is None else ("identical" if r["exact"] else "DIFFERS"),
             fmt(r["peak_mib"])] for r in results]
    table = format_table(headers, rows)
    ktable = format_table(["case", "implementation", "kernel (profiler)", "device us / call"], kernel_rows) \
        if kernel_rows else ""
    notes = (f"B{batch} S{seq} Hq{H} Hkv{Hk} D{D} {args.dtype}, random positions and inputs; copy bandwidth measured "
             f"{bandwidth / 1e9:,.0f} GB/s; byte floor = (bytes read + written once) / copy bandwidth; device us: "
             f"median with L2 flushed; host us: synchronous, launch included; cos/sin compared with torch.equal to "
             f"transformers' own forward; {liger_note}")
    print(table)
    if ktable:
        print(ktable)
    print(notes)
    write_json(known.json, {"results": results, "kernels": kernel_rows, "notes": notes, "partial": False})
    if not args.no_record:
        append_results("apply_rope and model-level cos/sin", device, table + ("\n\n" + ktable if ktable else ""),
                       notes)


if __name__ == "__main__":
    main()
