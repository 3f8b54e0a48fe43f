"""The final table of benchmarks/gpu_check.sh: each step's status, then each DESIGN.md section 5 target with the
value measured in this run and a verdict.

    python benchmarks/gpu_summary.py OUT_DIR [--dry-run]   (--dry-run: no verdicts, the numbers are the CPU's)
"""

from __future__ import annotations

import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def num(v):
    return "-" if v is None else f"{v:.1f}"


def find(results, case_prefix, impl):
    for r in results or []:
        if r["case"].startswith(case_prefix) and r["impl"] == impl:
            return r
    return None


def main(out, dry_run=False):
    lines = ["", "=== gpu_check: steps" + (" (DRY RUN on the CPU: the numbers test the script, not the kernels)"
                                          if dry_run else "")]
    try:
        with open(os.path.join(out, "summary.tsv")) as f:
            rows = [line.rstrip("\n").split("\t") for line in f]
        width = max(len(r[0]) for r in rows)
        lines += [f"{r[0]:<{width}}  {r[1]:<11} {r[2]:>6}  {r[3] if len(r) > 3 else ''}" for r in rows]
    except OSError:
        lines.append("(no summary.tsv)")
    qk = (load(os.path.join(out, "bench_qk_norm_rope.json")) or {}).get("results")
    rope = (load(os.path.join(out, "bench_rope.json")) or {}).get("results")
    checks = []

    def target(name, ok, measured):
        verdict = "n/a" if ok is None or dry_run else ("PASS" if ok else "MISS")
        checks.append((name, measured, verdict))

    for case in ("fwd B4 S4096", "fwd B1 S32768"):
        r = find(qk, case, "ropekit")
        target(f"qk_norm_rope {case}: <= 1.15x byte floor", None if r is None else r["vs_floor"] <= 1.15,
               "-" if r is None else f"{r['device_us']:.1f} us = {r['vs_floor']:.2f}x floor ({r['pct_bw']:.0f}% BW)")
    ours, comp = find(qk, "fwd+bwd", "ropekit"), find(qk, "fwd+bwd", "torch.compile(eager)")
    if ours and comp:
        target("qk_norm_rope fwd+bwd: >= 2x faster than torch.compile", comp["device_us"] / ours["device_us"] >= 2,
               f"{ours['device_us']:.1f} vs {comp['device_us']:.1f} us = {comp['device_us'] / ours['device_us']:.2f}x")
        if ours.get("peak_mib") is not None and comp.get("peak_mib") is not None:
            target("qk_norm_rope fwd+bwd peak memory <= torch.compile's", ours["peak_mib"] <= comp["peak_mib"],
                   f"{ours['peak_mib']:.0f} vs {comp['peak_mib']:.0f} MiB")
    else:
        target("qk_norm_rope fwd+bwd: >= 2x faster than torch.compile", None, "not measured")
    for case in ("fwd B4 S4096", "fwd B1 S32768"):  # the launch-bounds knob (csrc/qk_norm_rope.h): which is faster
        four, five = find(qk, case, "ropekit"), find(qk, case, "ropekit (min blocks 5)")
        if four and five:
            best = 5 if five["device_us"] < four["device_us"] else 4
            target(f"qk_norm_rope {case}: launch bounds min blocks 4 vs 5 (knob, no target)", None,
                   f"{four['device_us']:.1f} vs {five['device_us']:.1f} us: {best} is faster")
    dec = find(qk, "decode", "ropekit")
    if dec and dec.get("kernels") is not None:
        target("decode B64 S1: one launch, <= 10 us device", dec["kernels"] == 1 and dec["profiled_us"] <= 10,
               f"{dec['kernels']:.0f} launch(es), {dec['profiled_us']:.1f} us (profiler), "
               f"{dec['device_us']:.1f} us (L2 flushed), graph {num(dec.get('graph_us'))} us, "
               f"host {num(dec.get('host_us'))} us")
    else:
        target("decode B64 S1: one launch, <= 10 us device", None, "not measured")
    cs = find(rope, "cos/sin", "ropekit (patched module)")
    if cs:
        target("model-level cos/sin B4 S4096: <= 15 us, bit-identical", cs["device_us"] <= 15 and cs["exact"],
               f"{cs['device_us']:.1f} us, {'identical' if cs['exact'] else 'DIFFERS'}")
    else:
        target("model-level cos/sin B4 S4096: <= 15 us, bit-identical", None, "not measured")
    for case in ("apply_rope fwd", "apply_rope fwd+bwd"):
        r = find(rope, case + " ", "ropekit") or find(rope, case, "ropekit")
        if r and r["case"] == case:
            target(f"{case}: (no target) vs byte floor", None,
                   f"{r['device_us']:.1f} us = {r['vs_floor']:.2f}x floor")
    index = (load(os.path.join(out, "bench_rope_index.json")) or {}).get("results") or []
    for r in index:
        if r.get("target_us") is None:
            continue
        free = r.get("sync_free")  # None: not measured on a GPU
        ok = None if free is None else (r["device_us"] <= r["target_us"] and free)
        target(f"get_rope_index {r['case']}: <= {r['target_us']:.0f} us device, zero syncs", ok,
               f"{r['device_us']:.1f} us device ({num(r.get('launches'))} kernels; graph replay "
               f"{num(r.get('graph_us'))} us; host-inclusive latency {num(r.get('latency_us'))} us), "
               f"{ {None: 'syncs not checked', True: 'no sync', False: 'SYNCS'}[free] }; "
               f"transformers {r['transformers_us']:.0f} us")
    host = (load(os.path.join(out, "bench_host_overhead.json")) or {}).get("results") or []
    for r in host:
        if r["impl"] == "ropekit (patched)":
            target(f"{r['case']}: <= 10 us host time", r["host_us"] <= 10,
                   f"{r['host_us']:.1f} us, {num(r.get('launches'))} launch(es)")
    if not host:
        target("patched rotary forward: <= 10 us host time", None, "not measured")
    if not any(r.get("target_us") for r in index):
        target("get_rope_index B2 S4096 / B64 S1024 targets", None, "not measured")
    vision = (load(os.path.join(out, "bench_vision.json")) or {}).get("results") or []
    for case in ("Qwen2.5-VL-7B N8192 fwd", "Qwen2.5-VL-7B N8192 fwd+bwd", "Qwen3-VL-8B N8192 fwd",
                 "Qwen3-VL-8B N8192 fwd+bwd"):
        ours = next((r for r in vision if r["case"] == case and r["impl"] == "ropekit"), None)
        comp = next((r for r in vision if r["case"] == case and r["impl"] == "torch.compile(eager)"), None)
        target(f"vision rotary {case}: <= 1.2x byte floor, bit-identical",
               None if ours is None else ours["vs_floor"] <= 1.2 and ours["exact"],
               "not measured" if ours is None else f"{ours['device_us']:.1f} us = {ours['vs_floor']:.2f}x floor "
               f"({ours['pct_bw']:.0f}% BW), {'identical' if ours['exact'] else 'DIFFERS'}")
        target(f"vision rotary {case}: >= 2x faster than torch.compile",
               None if ours is None or comp is None else comp["device_us"] / ours["device_us"] >= 2,
               "not measured" if ours is None or comp is None else
               f"{ours['device_us']:.1f} vs {comp['device_us']:.1f} us = {comp['device_us'] / ours['device_us']:.2f}x")
    fed = [r for r in vision if r.get("section") == "syncs" and "ropekit.data" in r["impl"]]
    target("vision tower forward fed by ropekit.data (5.x): zero syncs",
           None if not fed else all(r["syncs"] == 0 for r in fed),
           "not measured" if not fed else "; ".join(f"{r['case']}: {r['syncs']}" for r in fed))
    width = max(len(c[0]) for c in checks)
    lines += ["", "=== gpu_check: targets (DESIGN.md section 5)"]
    lines += [f"{name:<{width}}  {verdict:<5} {measured}" for name, measured, verdict in checks]
    if index:
        lines += ["", "=== get_rope_index (us: transformers, host loop, fused kernel device time, its host-inclusive "
                      "latency, CUDA-graph replay)"]
        for r in index:
            lines.append(f"{r['case']:<58} {r['transformers_us']:>9.0f} {r['host_us']:>8.0f} {r['device_us']:>8.1f} "
                         f"{num(r.get('latency_us')):>8} {num(r.get('graph_us')):>8}")
    if qk:
        lines += ["", "=== qk_norm_rope (device us, L2 flushed; x byte floor; rel err vs fp64)"]
        for r in qk:
            err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
            lines.append(f"{r['case']:<20} {r['impl']:<24} {r['device_us']:>9.1f} {r['vs_floor']:>6.2f}x  {err}")
    print("\n".join(lines))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--dry-run"]
    main(args[0] if args else "benchmarks/out", dry_run="--dry-run" in sys.argv[1:])
