"""Timing and reporting helpers shared by the benchmark scripts (median of repeated runs; CUDA events on GPU)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
# Copy bandwidth measured on the reference H100 (DESIGN.md section 5); on other devices measure_copy_bandwidth.
H100_COPY_BW = 3.0e12


def attention_case_args(doc):
    """The CLI shared by the attention benchmarks; returns (args, device, batch, seq, dtype, element size).
    Defaults: the DESIGN reference case on a GPU (B4 S4096, Qwen3-8B heads, bf16), B1 S1024 on CPU."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch, seq = args.batch or (4 if gpu else 1), args.seq or (4096 if gpu else 1024)
    dtype = getattr(torch, args.dtype)
    return args, device, batch, seq, dtype, torch.tensor([], dtype=dtype).element_size()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn, device, warmup=5, iters=30, min_time_s=0.3):
    """Median wall time of fn() in microseconds. CUDA: CUDA events around each call; CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    start_all = time.perf_counter()
    while len(samples) < iters or (time.perf_counter() - start_all < min_time_s and len(samples) < 10 * iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def measure_copy_bandwidth(device, nbytes=1 << 28):
    """Bytes moved per second by a device-to-device copy (read + write), the byte-floor reference."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, iters=20)
    return 2 * nbytes / (us * 1e-6)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def versions():
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False)
        if rev.returncode == 0:
            parts.append(f"ropekit {rev.stdout.strip()}")
    except OSError:
        pass
    return ", ".join(parts)


def format_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def append_results(title, device, table, notes=""):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    block = (
        f"\n## {title}\n\n- date: {stamp}\n- device: {device_name(device)}\n- versions: {versions()}\n"
        f"- command: `python {command}`\n"
        + (f"- notes: {notes}\n" if notes else "")
        + f"\n{table}\n"
    )
    with open(RESULTS, "a") as f:
        f.write(block)
    return block
