"""Static check of the built CUDA kernels, no GPU needed: the sm_90 SASS of the bf16 fast paths moves 16 bytes per
global access (LDG.E.128 / STG.E.128; apply_rope's 8-byte-lane variants 8 bytes, for head dims such as 72) and never
touches local memory (no LDL / STL: no spills, no stack arrays) in its own code; only the cos/sin gather calls a
device function that does (its cold exact-rows path).

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

# (label, required substrings of the demangled name, every global load wide?, every store wide?, lane bytes)
# The weight-gradient backward writes one scalar partial per column per block (a few hundred bytes per block); the
# gather reads the token's positions (8 bytes each) and, for mRoPE vision tokens, single table values. apply_rope's
# kernels come with 16-byte lanes and with 8-byte lanes (rows whose halves 16 bytes do not divide: the vision
# towers' head dim 72); "wide" is then 8 bytes or more.
KERNELS = [
    ("qk_norm_rope fwd", ["qk_norm_rope_vec_kernel<", "NormRopeTypes<c10::BFloat16"], True, True, 16),
    ("qk_norm_rope bwd", ["qk_norm_rope_backward_vec_kernel<", "NormRopeTypes<c10::BFloat16"], True, False, 16),
    ("apply_rope fwd", ["apply_rope_vec_kernel<", "RopeTypes<c10::BFloat16", ", false, ", ", 16>"], True, True, 16),
    ("apply_rope bwd", ["apply_rope_vec_kernel<", "RopeTypes<float, float, c10::BFloat16>", ", true, ", ", 16>"],
     True, True, 16),
    ("apply_rope bwd", ["apply_rope_vec_kernel<", "RopeTypes<c10::BFloat16, c10::BFloat16, c10::BFloat16>",
                        ", true, ", ", 16>"], True, True, 16),
    ("apply_rope_vision fwd+bwd", ["apply_rope_vec_kernel<", "RopeTypes<c10::BFloat16, float, c10::BFloat16>",
                                   ", 16>"], True, True, 16),
    ("apply_rope 8-byte lanes", ["apply_rope_vec_kernel<", "RopeTypes<c10::BFloat16", ", 8>"], True, True, 8),
    ("apply_rope 8-byte lanes", ["apply_rope_vec_kernel<", "RopeTypes<float, float, c10::BFloat16>", ", 8>"], True,
     True, 8),
    ("cos/sin gather", ["gather_cos_sin_vec_kernel<c10::BFloat16"], False, True, 16),
]



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


# the kernels KERNELS selects from, by a part of their mangled names (the others are not kept or demangled)
_MANGLED_KEEP = ("vec_kernel",)


def sass_functions(arch="sm_90"):
    """{demangled kernel name: SASS text} for the extension's `arch` code (the kernels KERNELS can select)."""
    import ropekit._C as ext

    out = subprocess.run([find_cuobjdump(), "-sass", "-arch", arch, ext.__file__], capture_output=True, text=True,
                         check=True).stdout
    mangled, bodies, current = [], [], None
    for line in out.splitlines():  # one pass: "Function : <name>" starts a kernel's section
        stripped = line.strip()
        if stripped.startswith("Function : "):
            name = stripped[len("Function : "):].strip()
            current = [] if any(k in name for k in _MANGLED_KEEP) else None
            if current is not None:
                mangled.append(name)
                bodies.append(current)
        elif current is not None:
            current.append(line)
    names = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return {name: "\n".join(body) for name, body in zip(names, bodies)}


_RET = re.compile(r"\bRET\b")
_EXIT = re.compile(r"\bEXIT\b[^\n]*\n?")


def split_subroutines(body):
    """(the kernel's own code, its subroutines): cuobjdump lists non-inlined device functions (the gather's cold
    exact_cos_sin with libdevice's cosf / sinf slow path, 64-bit division helpers) after the kernel's last EXIT,
    each ended by RET. The kernel's own code is everything up to the last EXIT before the first RET."""
    first_ret = _RET.search(body)
    if first_ret is None:
        return body, ""
    exits = list(_EXIT.finditer(body, 0, first_ret.start()))
    if not exits:
        return body, ""
    end = exits[-1].end()
    return body[:end], body[end:]


_MEMORY_OPS = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9_]+)*)[\s;]")


def counts(body):
    """Global accesses by width and local-memory accesses (in the kernel's own code and in what it calls), from one
    scan of each part's memory instructions."""
    own, subroutines = split_subroutines(body)
    c = {"LDG.128": 0, "LDG other": 0, "STG.128": 0, "STG other": 0, "LDG.64": 0, "STG.64": 0, "LDL/STL": 0,
         "cold LDL/STL": 0}
    for part, local_key in ((own, "LDL/STL"), (subroutines, "cold LDL/STL")):
        for op, suffixes in _MEMORY_OPS.findall(part):
            if op in ("LDL", "STL"):
                c[local_key] += 1
                continue
            widths = suffixes.split(".")
            c[f"{op}.128" if "128" in widths else f"{op} other"] += 1
            if "64" in widths:
                c[f"{op}.64"] += 1
    return c


def allows_cold_local(label):
    """Only the gather calls a function with local memory: exact_cos_sin, for rows the table cannot serve (cosf's
    slow-path argument reduction keeps a stack array), never on the fast path."""
    return label == "cos/sin gather"


def check(functions):
    """Rows (label, kernel, counts, problems) for every selected kernel; raises nothing."""
    rows = []
    for label, needles, all_loads_wide, all_stores_wide, lane_bytes in KERNELS:
        selected = {n: b for n, b in functions.items() if all(s in n for s in needles)}
        if not selected:
            rows.append((label, " & ".join(needles), None, ["no such kernel in the sm_90 SASS"]))
            continue
        for name, body in sorted(selected.items()):
            c = counts(body)
            problems = []
            # 16-byte lanes: 16-byte accesses; 8-byte lanes: 8-byte ones (their fp32 cos/sin lanes are 16 bytes)
            wide_loads = c["LDG.128"] + (c["LDG.64"] if lane_bytes == 8 else 0)
            wide_stores = c["STG.128"] + (c["STG.64"] if lane_bytes == 8 else 0)
            if wide_loads == 0:
                problems.append(f"no {lane_bytes}-byte global load")
            if all_loads_wide and c["LDG.128"] + c["LDG other"] > wide_loads:
                problems.append(f"{c['LDG.128'] + c['LDG other'] - wide_loads} narrower global loads")
            if wide_stores == 0:
                problems.append(f"no {lane_bytes}-byte global store")
            if all_stores_wide and c["STG.128"] + c["STG other"] > wide_stores:
                problems.append(f"{c['STG.128'] + c['STG other'] - wide_stores} narrower global stores")
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
