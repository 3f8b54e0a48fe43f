"""`make demo` is the main job: its quick mode must run to the end under each transformers line, report parity and
write its plot (the demo exits non-zero on any parity failure)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.transformers
def test_demo_quick_runs_and_reports_parity(tmp_path):
    pytest.importorskip("matplotlib", reason="the demo's plot needs matplotlib (requirements/dev.txt has it)")
    plot = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "demo.py"), "--quick", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ), cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "MISMATCH" not in out and "DIFFERENT" not in out and "fell back" not in out
    assert "same tokens" in out and "bit-identical to transformers': True" in out
    for path in ("cos/sin", "apply_rotary_pos_emb", "attention prologue", "get_rope_index"):
        assert path in out, f"the timing table lacks {path}"
    assert plot.stat().st_size > 10_000
