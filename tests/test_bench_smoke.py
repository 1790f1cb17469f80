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
