"""The CPU kernels' instruction sets (csrc/cpu_isa.h): qk_norm_rope compiled for the baseline and for AVX2 gives
the same bits, forward, backward and in place, for every dtype combination and layout the op takes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ropekit import ops

from test_qk_norm_rope import make

ISA = torch.ops.ropekit._cpu_isa


def _available(isa):
    previous = ISA()
    try:
        ISA(isa)
    except RuntimeError:
        return False
    finally:
        ISA(previous)
    return True


requires_avx2 = pytest.mark.skipif(not _available("avx2"), reason="no AVX2 kernels in this build or on this CPU")


@pytest.fixture
def restore_isa():
    previous = ISA()
    yield
    ISA(previous)


def _run(isa, case):
    """Forward, backward (dq, dk, dq_weight, dk_weight) and the in-place qkv result with `isa`."""
    ISA(isa)
    q, k, qw, kw, cos, sin = case["inputs"]
    flags = dict(zero_centered=case["zero_centered"], is_neox=case["is_neox"])
    with torch.no_grad():
        q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6, **flags)
    gen = torch.Generator().manual_seed(1)
    grad_q, grad_k = (torch.randn(t.shape, generator=gen).to(t.dtype) for t in (q_out, k_out))
    grads = torch.ops.ropekit.qk_norm_rope_backward(grad_q, grad_k, q, k, qw, kw, cos, sin, 1e-6,
                                                    case["zero_centered"], case["is_neox"])
    results = [q_out, k_out, *grads]
    if qw.dtype == q.dtype and cos.dtype == q.dtype:
        qkv = torch.cat([q, k, k * 0.5], dim=-1)
        torch.ops.ropekit.qk_norm_rope_qkv_(qkv, qw, kw, cos, sin, 1e-6, q.shape[-1] // qw.shape[0],
                                            k.shape[-1] // qw.shape[0], case["zero_centered"], case["is_neox"])
        results.append(qkv)
    return results


CASES = [  # dtype, weight dtype, cos dtype, head_dim, rot_dim, zero_centered, is_neox
    (torch.bfloat16, None, None, 128, 128, False, True),
    (torch.bfloat16, torch.float32, torch.float32, 128, 64, False, True),
    (torch.bfloat16, None, None, 256, 256, True, True),
    (torch.bfloat16, None, None, 128, 64, False, False),
    (torch.float16, None, None, 64, 64, False, True),
    (torch.float16, torch.float32, None, 72, 40, True, False),
    (torch.float32, None, None, 128, 128, False, True),
    (torch.float32, None, None, 96, 96, True, False),
    (torch.float64, None, None, 64, 32, False, True),
]


@requires_avx2
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,w_dtype,cos_dtype,head_dim,rot_dim,zero_centered,is_neox", CASES)
def test_avx2_kernels_give_the_baseline_bits(restore_isa, threads, dtype, w_dtype, cos_dtype, head_dim, rot_dim,
                                             zero_centered, is_neox):
    # 70 tokens: more than one 64-token weight-gradient chunk, and a ragged last one.
    inputs = make(batch=2, seq=35, heads=4, kv_heads=2, head_dim=head_dim, rot_dim=rot_dim, dtype=dtype,
                  w_dtype=w_dtype, cos_dtype=cos_dtype, zero_centered=zero_centered, is_neox=is_neox)
    case = dict(inputs=inputs, zero_centered=zero_centered, is_neox=is_neox)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        baseline = _run("baseline", case)
        avx2 = _run("avx2", case)
    finally:
        torch.set_num_threads(before)
    assert len(baseline) == len(avx2) >= 6
    for name, b, a in zip(["q_out", "k_out", "dq", "dk", "dq_weight", "dk_weight", "qkv_"], baseline, avx2):
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert torch.equal(b, a), f"{name}: AVX2 differs from baseline by {(b.double() - a.double()).abs().max()}"
        assert torch.isfinite(a).all() and a.abs().sum() > 0, name  # not a vacuous comparison


def test_the_default_is_the_best_available_and_names_are_checked(restore_isa):
    expected = "avx2" if _available("avx2") else "baseline"
    script = "import torch, ropekit; print(torch.ops.ropekit._cpu_isa())"
    env = {k: v for k, v in os.environ.items() if k != "ROPEKIT_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
    out = subprocess.run([sys.executable, "-c", script], env={**env, "ROPEKIT_CPU_ISA": "baseline"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "baseline"
    assert ISA("baseline") == expected  # returns the choice it replaces
    assert ISA() == "baseline"
    with pytest.raises(RuntimeError, match=r'isa: expected "baseline" or "avx2", got "sse9"'):
        ISA("sse9")
    assert ISA() == "baseline"  # a refused name changes nothing


def test_a_bad_environment_value_warns_and_takes_the_best():
    """The choice never changes a result, so a mistyped ROPEKIT_CPU_ISA must not break every call: it warns once,
    the kernels run with the best instruction set, and _cpu_isa can still set another."""
    script = ("import torch, ropekit\nfrom test_qk_norm_rope import make\nq, k, qw, kw, c, s = make()\n"
              "out = torch.ops.ropekit.qk_norm_rope(q, k, qw, kw, c, s, 1e-6)\n"
              "print(torch.ops.ropekit._cpu_isa('baseline'), torch.ops.ropekit._cpu_isa(), out[0].abs().sum() > 0)")
    env = {**os.environ, "ROPEKIT_CPU_ISA": "fast",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    best = "avx2" if _available("avx2") else "baseline"
    assert f'ROPEKIT_CPU_ISA: expected "baseline" or "avx2", got "fast"; using "{best}"' in out.stderr
    assert out.stdout.split() == [best, "baseline", "tensor(True)"]
