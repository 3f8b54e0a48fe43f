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

# --dry-run (benchmarks/gpu_check.sh --dry-run, run by `make test`): every benchmark runs its whole code path on the
# CPU with tiny shapes and one or two repetitions, records nothing and writes its JSON, so the GPU check cannot rot
# between GPU runs. Taken off sys.argv here, before the scripts parse their own arguments.
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    sys.argv = [a for a in sys.argv if a != "--dry-run"]
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
    if DRY_RUN:
        args.device, args.batch, args.seq, args.no_compile, args.no_record = "cpu", 1, 8, True, True
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
    if DRY_RUN:
        warmup, iters, min_time_s = 1, 2, 0.0
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
    if DRY_RUN:
        nbytes = 1 << 16
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


# ---------------------------------------------------------------------------------------------------------------
# GPU method (DESIGN.md section 5): device medians with the L2 flushed, host-inclusive synchronous times, CUDA-graph
# replay, per-kernel device times from the profiler, peak memory, and accuracy against float64.

_L2_FLUSH = {}


def flush_l2(device):
    """Overwrite a buffer larger than any L2 (256 MiB), so the next call reads its inputs from device memory."""
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(1 << 26, dtype=torch.int32, device=device)
    buf.zero_()


def bench_device(fn, device, warmup=5, reps=40):
    """do_bench-style median device time in us: each rep flushes L2, then CUDA events around fn() alone.
    On CPU: the median wall time (time_us)."""
    if device.type != "cuda":
        return time_us(fn, device, warmup=min(warmup, 3), iters=max(5, reps // 4))
    if DRY_RUN:
        warmup, reps = 1, 2
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush_l2(device)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def bench_host(fn, device, warmup=5, reps=50):
    """Median host-inclusive synchronous latency in us: synchronize, call, synchronize (what a caller waits)."""
    if DRY_RUN:
        warmup, reps = 1, 2
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def bench_graph(fn, device, replays=200):
    """Median time per CUDA-graph replay of fn in us (launch overhead gone), or (None, reason)."""
    if device.type != "cuda":
        return None, "not a CUDA device"
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for _ in range(5):
            graph.replay()
        samples = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays // 5):
                graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / (replays // 5))
        return statistics.median(samples), ""
    except Exception as exc:  # a baseline that syncs or allocates in a way capture refuses
        torch.cuda.synchronize(device)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def kernel_profile(fn, device, iters=5):
    """Device time per call (us) and kernels per call from the profiler: (total_us, launches, {kernel: us})."""
    if device.type != "cuda":
        return None, None, {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    per_kernel = {}
    launches = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.name.startswith("Memset"):
            continue
        per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time / iters
        launches += 1
    return sum(per_kernel.values()), launches / iters, per_kernel


def peak_memory(fn, device):
    """Bytes allocated at the peak of fn() beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


def rel_err(out, ref64):
    out, ref64 = out.detach().double(), ref64.detach().double().to(out.device)
    return ((out - ref64).norm() / ref64.norm()).item()


def short_kernel(name, width=60):
    name = name.split("(")[0]
    for prefix in ("void ", "ropekit::", "(anonymous namespace)::"):
        name = name.replace(prefix, "")
    return name if len(name) <= width else name[: width - 3] + "..."


def liger_source():
    """Make Liger-Kernel importable from third_party/liger/src (git-ignored copy) if present; returns a note."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party", "liger", "src")
    if os.path.isdir(src) and src not in sys.path:
        sys.path.insert(0, src)
    try:
        import liger_kernel  # noqa: F401

        return "Liger-Kernel from " + (src if os.path.isdir(src) else "site-packages")
    except Exception as exc:
        return f"Liger-Kernel unavailable ({type(exc).__name__}: {exc})"


def write_json(path, payload):
    """Write payload as JSON (atomically: a file cut off by a time limit is never half written). The benchmarks call
    it after every measured case, so a run stopped by gpu_check.sh's limit keeps every case measured so far."""
    import json

    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        os.replace(tmp, path)
