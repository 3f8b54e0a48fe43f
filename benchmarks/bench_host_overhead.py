"""Benchmark: host time per call of the patched paths that run on every decode step (DESIGN section 5 / issue 10:
the patched rotary forward <= 10 us of host time; norm + RoPE at decode one launch).

Host time = wall time of N back-to-back calls without synchronizing, divided by N, on shapes small enough that the
GPU keeps up (so the host is what is measured): the cost of Python, the dispatcher, validation and launches. On the
CPU the ops also compute on the host, so there the figure is the whole call.

    python benchmarks/bench_host_overhead.py [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import ropekit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
from common import append_results, format_table, kernel_profile, write_json  # noqa: E402


def host_us(fn, device, calls=2000):
    if common.DRY_RUN:
        calls = 10
    for _ in range(50):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        samples.append((time.perf_counter() - t0) * 1e6 / (calls // 5))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return sorted(samples)[len(samples) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if common.DRY_RUN:
        args.device, args.no_record = "cpu", True
    device = torch.device(args.device)
    from transformers import Qwen3Config, Qwen3VLTextConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    torch.set_num_threads(1)
    results, rows = [], []
    batch = 64
    x = torch.randn(batch, 1, 8, device=device, dtype=torch.bfloat16)
    pos = torch.full((batch, 1), 1000, device=device)
    cases = [
        ("Qwen3 rotary forward, decode B64", Qwen3RotaryEmbedding(Qwen3Config(head_dim=128)).to(device), pos),
        ("Qwen3-VL rotary forward, decode B64",
         Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(head_dim=128)).to(device), pos[None].expand(3, -1, -1)),
    ]
    q = torch.randn(batch, 1, 32 * 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, 1, 8 * 128, device=device, dtype=torch.bfloat16)
    w = torch.ones(128, device=device, dtype=torch.bfloat16)
    for name, module, position_ids in cases:
        for patched in (False, True):
            ropekit.unpatch()
            if patched:
                ropekit.apply_to_qwen3()
                ropekit.apply_to_qwen3_vl()
            fn = lambda: module(x, position_ids)  # noqa: E731
            us = host_us(fn, device)
            _, launches, _ = kernel_profile(fn, device)
            label = "ropekit (patched)" if patched else "transformers"
            results.append(dict(case=name, impl=label, host_us=us, launches=launches))
            write_json(args.json, {"device": str(device), "results": results, "partial": True})
            rows.append([name, label, f"{us:.1f}", "-" if launches is None else f"{launches:.0f}"])
    ropekit.unpatch()
    cos, sin = cases[0][1](x, pos)
    fn = lambda: ropekit.qk_norm_rope(q, k, w, w, cos, sin, 1e-6)  # noqa: E731
    us = host_us(fn, device)
    _, launches, _ = kernel_profile(fn, device)
    results.append(dict(case="qk_norm_rope decode B64 S1", impl="ropekit", host_us=us, launches=launches))
    rows.append(["qk_norm_rope decode B64 S1 (32 q, 8 kv heads, D 128)", "ropekit", f"{us:.1f}",
                 "-" if launches is None else f"{launches:.0f}"])
    table = format_table(["case", "implementation", "host us per call", "kernels per call"], rows)
    notes = ("host time: N calls back to back without a sync, / N (on CUDA the GPU keeps up at these sizes, so this "
             "is Python + dispatch + launch; on the CPU it includes the compute); target: patched rotary <= 10 us on "
             "a GPU host")
    print(table)
    print(notes)
    if not args.no_record:
        append_results("host overhead per call", device, table, notes)
    write_json(args.json, {"device": str(device), "results": results, "partial": False})


if __name__ == "__main__":
    main()
