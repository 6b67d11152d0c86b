"""The benchmark script runs end to end (tiny settings) and writes its JSON and the README table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_writes_json_and_table(tmp_path):
    out = tmp_path / "results" / "cpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--profile", "smoke",
                           "--runs", "2", "--warmup", "1", "--batch", "2", "--train-steps", "1", "--out", str(out),
                           "--readme", str(tmp_path / "README.md")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["parameters"]["total"] < 8_000_000
    assert result["latency_512"][0]["size"] == 512 and result["latency_512"][0]["median_ms"] > 0
    assert set(result["training"]) == {"seg", "det", "cls"}
    assert all(r["images_per_s"] > 0 for r in result["input_pipeline"])
    table = (tmp_path / "README.md").read_text()
    assert result["device"] in table and f"{result['parameters']['total']:,}" in table
