"""benchmarks/gpu_check.sh, the one-shot GPU check, cannot rot between GPU runs: its dry run (every step's command
on the CPU, no build, no GPU) must pass here, its caps must fit its budget, and its benchmarks come before the long
suites."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _steps():
    """(name, cap) of every `step NAME CAP ...` line, in order (the dry-run and GPU variants of a step once)."""
    seen = {}
    for match in re.finditer(r"^\s*(?:if ! )?step (\S+) (\d+) ", SCRIPT.read_text(), flags=re.M):
        seen.setdefault(match.group(1), int(match.group(2)))
    return list(seen.items())


def test_caps_fit_the_budget_and_benchmarks_come_first():
    steps = _steps()
    names = [n for n, _ in steps]
    budget = int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", SCRIPT.read_text()).group(1))
    assert sum(cap for _, cap in steps) <= budget, (steps, budget)
    assert budget <= 480  # one device call of at most 8 minutes
    benches = [names.index(n) for n in names if n.startswith("bench-")]
    assert benches and max(benches) < names.index("cuda-tests") < names.index("memcheck")
    assert names[:3] == ["build", "sass", "smoke"]


def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + log[-4000:]
    rows = [line.split("\t") for line in (tmp_path / "summary.tsv").read_text().splitlines()[1:]]
    status = {r[0]: r[1] for r in rows}
    for name, _ in _steps():
        assert status.get(name) in ("ok", "skipped"), (name, status)
    assert status["build"] == "skipped" and status["preflight"] == "ok"
    final = (tmp_path / "final.txt").read_text()
    assert "=== gpu_check: targets" in final and "=== gpu_check: steps" in final
    for name in ("bench_qk_norm_rope", "bench_rope", "bench_rope_index", "bench_vision", "bench_host_overhead"):
        assert (tmp_path / f"{name}.json").stat().st_size > 0, name
    assert "DIFFERS" not in final and "MISMATCH" not in log
    assert "PASS" not in final and "MISS" not in final  # a dry run judges no target
