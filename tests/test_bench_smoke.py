"""Smoke test of the benchmark suite: `python -m bench --quick` runs every family end to end (timing,
fresh-process memory probes, one torch.compile contender per family, JSON, plots). It asserts what
the run produced, never a timing."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick(tmp_path):
    out = tmp_path / "bench"
    js = out / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(out),
                           "--json", str(js)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(js.read_text())
    assert doc["machine"]["torch"] and doc["machine"]["cpu_model"] and doc["machine"]["threads"] >= 1
    assert "kdfast_build_info" in doc["machine"]
    results = doc["results"]
    for family in ("kl", "divergence", "sparse", "relation", "feature", "fused_linear"):
        ran = [r for r in results if r["family"] == family and r["status"] == "ok"]
        assert any(r["is_kdfast"] for r in ran), family
        assert any(not r["is_kdfast"] for r in ran), family
        for r in ran:
            assert r["median_s"] > 0 and r["gelem_s"] > 0 and len(r["round_times_s"]) >= 3, r
            assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0, r
        assert any(r["speedup_of_kdfast"] for r in ran if not r["is_kdfast"]), family
    assert any(r["contender"] == "torch.compile" and r["status"] == "ok" for r in results)
    assert any(r["floor"] and r["loss"] is None for r in results if r["status"] == "ok")
    for png in ("kl_vocab_cpu.png", "divergence_cpu.png", "rkd_scaling_cpu.png", "fused_linear_tokens_cpu.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "| case" in proc.stdout  # the table was printed


def test_gpu_check_selftest_on_cpu(tmp_path):
    """bench/gpu_check.py (what a lent GPU runs first) on tiny CPU shapes: every stage runs without an
    error, writes its JSON and table, and counts the launch-bound cases' ATen calls per step, so that
    a GPU draw is never spent on a broken script."""
    table = tmp_path / "table.txt"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--selftest-cpu", "--budget", "120",
                           "--out", str(tmp_path), "--table-file", str(table)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu-selftest-cpu.json").read_text())
    assert doc["errors"] == [] and doc["complete"], doc["errors"]
    for family in ("softmax_kl", "divergences", "feature", "sparse", "fused_linear"):
        assert doc[family], family
    assert "ms" in doc["rkd"], doc["rkd"]
    for row in doc["softmax_kl"] + doc["divergences"]:
        for name, c in row["contenders"].items():
            assert c["launches"]["aten_ops"] > 0 and c["launches"]["device_ops"] is None, (row["case"], name, c)
    assert "launches per forward+backward step" in table.read_text()
