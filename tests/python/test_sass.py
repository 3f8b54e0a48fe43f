"""Static check of the built CUDA kernels, no GPU needed: the sm_90 SASS of the bf16 fast paths moves 16 bytes per
global access (LDG.E.128 / STG.E.128) and never touches local memory (no LDL / STL: no spills, no stack arrays) in
its own code; only the cos/sin gather calls a device function that does (its cold exact-rows path).

The SASS comes from cuobjdump (shipped inside triton's NVIDIA backend, else the CUDA toolkit's) on the built
extension; kernels are picked by name from the per-function sections, demangled with c++filt. Skips when the build
has no CUDA kernels or the tools are missing, and says which. Run as a script to print the per-kernel counts:

    python tests/python/test_sass.py
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

# (label, required substrings of the demangled name, every global load 16 bytes wide?, every store?)
# The weight-gradient backward writes one scalar partial per column per block (a few hundred bytes per block); the
# gather reads the token's positions (8 bytes each) and, for mRoPE vision tokens, single table values.
KERNELS = [
    ("qk_norm_rope fwd", ["qk_norm_rope_vec_kernel<", "NormRopeTypes<c10::BFloat16"], True, True),
    ("qk_norm_rope bwd", ["qk_norm_rope_backward_vec_kernel<", "NormRopeTypes<c10::BFloat16"], True, False),
    ("apply_rope fwd", ["apply_rope_vec_kernel<", "RopeTypes<c10::BFloat16", ", false, "], True, True),
    ("apply_rope bwd", ["apply_rope_vec_kernel<", "RopeTypes<float, float, c10::BFloat16>", ", true, "], True, True),
    ("apply_rope bwd", ["apply_rope_vec_kernel<", "RopeTypes<c10::BFloat16, c10::BFloat16, c10::BFloat16>",
                        ", true, "], True, True),
    ("cos/sin gather", ["gather_cos_sin_vec_kernel<c10::BFloat16"], False, True),
]

LDG_128 = re.compile(r"\bLDG(\.[A-Z0-9_]+)*\.128\b")
STG_128 = re.compile(r"\bSTG(\.[A-Z0-9_]+)*\.128\b")
LDG_ANY = re.compile(r"\bLDG(\.[A-Z0-9_]+)*\s")
STG_ANY = re.compile(r"\bSTG(\.[A-Z0-9_]+)*\s")
LOCAL = re.compile(r"\b(LDL|STL)(\.[A-Z0-9_]+)*\s")


def find_cuobjdump():
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = os.path.join(root, "backends", "nvidia", "bin", "cuobjdump")
            if os.access(candidate, os.X_OK):
                return candidate
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(home, "bin", "cuobjdump")
    return shutil.which("cuobjdump")


def why_not_checkable():
    """None when the check can run, else the reason to skip."""
    import ropekit

    if not ropekit.has_cuda_kernels():
        return "ropekit was built without CUDA kernels (no nvcc or ROPEKIT_FORCE_CPU=1): no SASS to check"
    if find_cuobjdump() is None:
        return "cuobjdump not found (looked in triton's backends/nvidia/bin, CUDA_HOME and PATH)"
    if shutil.which("c++filt") is None:
        return "c++filt not found (binutils), needed to select kernels by name"
    return None


def sass_functions(arch="sm_90"):
    """{demangled kernel name: SASS text} for the extension's `arch` code."""
    import ropekit._C as ext

    out = subprocess.run([find_cuobjdump(), "-sass", "-arch", arch, ext.__file__], capture_output=True, text=True,
                         check=True).stdout
    sections = re.split(r"^\s*Function : (\S+)\s*$", out, flags=re.M)
    mangled = sections[1::2]
    bodies = sections[2::2]
    names = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return dict(zip(names, bodies))


def split_subroutines(body):
    """(the kernel's own code, its subroutines): cuobjdump lists non-inlined device functions (the gather's cold
    exact_cos_sin with libdevice's cosf / sinf slow path, 64-bit division helpers) after the kernel's last EXIT,
    each ended by RET. The kernel's own code is everything up to the last EXIT before the first RET."""
    lines = body.splitlines()
    first_ret = next((i for i, line in enumerate(lines) if re.search(r"\bRET\b", line)), None)
    if first_ret is None:
        return body, ""
    exits = [i for i, line in enumerate(lines[:first_ret]) if re.search(r"\bEXIT\b", line)]
    if not exits:
        return body, ""
    return "\n".join(lines[: exits[-1] + 1]), "\n".join(lines[exits[-1] + 1:])


def counts(body):
    own, subroutines = split_subroutines(body)
    ldg = len(LDG_ANY.findall(body))
    stg = len(STG_ANY.findall(body))
    ldg128 = len(LDG_128.findall(body))
    stg128 = len(STG_128.findall(body))
    return {"LDG.128": ldg128, "LDG other": ldg - ldg128, "STG.128": stg128, "STG other": stg - stg128,
            "LDL/STL": len(LOCAL.findall(own)), "cold LDL/STL": len(LOCAL.findall(subroutines))}


def allows_cold_local(label):
    """Only the gather calls a function with local memory: exact_cos_sin, for rows the table cannot serve (cosf's
    slow-path argument reduction keeps a stack array), never on the fast path."""
    return label == "cos/sin gather"


def check(functions):
    """Rows (label, kernel, counts, problems) for every selected kernel; raises nothing."""
    rows = []
    for label, needles, all_loads_wide, all_stores_wide in KERNELS:
        selected = {n: b for n, b in functions.items() if all(s in n for s in needles)}
        if not selected:
            rows.append((label, " & ".join(needles), None, ["no such kernel in the sm_90 SASS"]))
            continue
        for name, body in sorted(selected.items()):
            c = counts(body)
            problems = []
            if c["LDG.128"] == 0:
                problems.append("no 16-byte global load")
            if all_loads_wide and c["LDG other"]:
                problems.append(f"{c['LDG other']} narrower global loads")
            if c["STG.128"] == 0:
                problems.append("no 16-byte global store")
            if all_stores_wide and c["STG other"]:
                problems.append(f"{c['STG other']} narrower global stores")
            if c["LDL/STL"]:
                problems.append(f"{c['LDL/STL']} local-memory accesses (spills or stack arrays)")
            if c["cold LDL/STL"] and not allows_cold_local(label):
                problems.append(f"{c['cold LDL/STL']} local-memory accesses in called device functions")
            rows.append((label, name, c, problems))
    return rows


def short(name):
    name = re.sub(r"ropekit::(\(anonymous namespace\)::)?", "", name).replace("c10::", "")
    return name.split("(")[0]


def test_bf16_fast_paths_use_16_byte_accesses_and_no_local_memory():
    reason = why_not_checkable()
    if reason:
        pytest.skip(reason)
    rows = check(sass_functions())
    bad = [f"{label}: {short(name)}: {', '.join(problems)}" for label, name, _, problems in rows if problems]
    assert not bad, "\n".join(bad)


def main():
    reason = why_not_checkable()
    if reason:
        print("skipped:", reason)
        return 0
    rows = check(sass_functions())
    print(f"{'kernel':<96} {'LDG.128':>7} {'LDG<16B':>7} {'STG.128':>7} {'STG<16B':>7} {'LDL/STL':>7} "
          f"{'cold':>5}  verdict")
    for label, name, c, problems in rows:
        if c is None:
            print(f"{label + ': ' + name:<96} {'-':>7} {'-':>7} {'-':>7} {'-':>7} {'-':>7} {'-':>5}  {problems[0]}")
            continue
        print(f"{short(name):<96} {c['LDG.128']:>7} {c['LDG other']:>7} {c['STG.128']:>7} {c['STG other']:>7} "
              f"{c['LDL/STL']:>7} {c['cold LDL/STL']:>5}  {'ok' if not problems else '; '.join(problems)}")
    return 1 if any(p for *_, p in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
