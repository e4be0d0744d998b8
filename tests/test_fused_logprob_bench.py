"""benchmarks/fused_logprob.py and benchmarks/gpu_fused_logprob.py: small CPU runs print the table with positive
times and memory ratios against naive (1.00 for naive itself); the GPU script refuses to start without CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def _run(script, *args, hide_cuda=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _table(stdout):
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines() if line.startswith("|")]
    assert rows and set(rows[1]) == {"---"}, stdout
    return rows[0], rows[2:]


def test_cpu_benchmark_small_run(tmp_path):
    out = tmp_path / "fused.json"
    proc = _run("fused_logprob.py", "--vocab", "2048", "--tokens", "512", "--hidden", "32", "--threads", "1",
                "--methods", "naive", "trl", "liger", "drl", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, rows = _table(proc.stdout)
    assert header == ["V", "N", "method", "peak MB", "peak less head grad MB", "time s", "peak / naive",
                      "temporaries / naive", "time / naive"]
    by_method = {r[2]: r for r in rows}
    assert set(by_method) == {"naive", "trl", "liger", "drl"}
    assert by_method["naive"][6] == by_method["naive"][7] == by_method["naive"][8] == "1.00"
    data = json.loads(out.read_text())
    assert all(r["time_s"] > 0 and r["peak_above_baseline_mb"] >= 0 for r in data["rows"])  # (the table rounds)
    losses = [r["loss"] for r in data["rows"]]  # the same GRPO loss on the same inputs, four ways
    assert max(losses) - min(losses) < 1e-5, losses


def test_gpu_benchmark_refuses_without_cuda_and_its_harness_runs_on_cpu():
    proc = _run("gpu_fused_logprob.py", hide_cuda=True)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    proc = _run("gpu_fused_logprob.py", "--device", "cpu", "--tokens", "512", "--vocab", "1000", "--hidden", "32",
                "--methods", "naive", "drl_torch", "--iters", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, rows = _table(proc.stdout)
    assert [r[1] for r in rows] == ["naive", "drl_torch"] and all(float(r[3]) >= 0 for r in rows)
