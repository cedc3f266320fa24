"""scripts/bench.py --quick runs end to end and writes complete, well-formed results.

No assertion on speed: only that every layer and size of the quick set was measured, with
positive timings and finite ratios, and that the kernels matched their peers numerically.
"""
import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUICK = {
    "cross_entropy": [{"n": 32, "k": 27}, {"n": 4096, "k": 1024}],
    "batchnorm": [{"n": 32, "d": 64}, {"n": 4096, "d": 1024}],
    "batchnorm_biased": [{"n": 32, "d": 64}, {"n": 4096, "d": 1024}],
    "attention": [{"n": 128, "d": 64}, {"n": 512, "d": 64}],
}
NO_NATIVE_OP = {"batchnorm"}  # Bessel's correction: torch has no native op, the peer is the spec


def test_quick_benchmark_writes_complete_json(tmp_path):
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--repeat", "3",
         "--min-sample-ms", "5", "--no-compile", "--json", str(out), "--markdown", str(table)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch.set_num_threads(" in proc.stdout

    report = json.loads(out.read_text())
    assert report["settings"]["quick"] is True and report["settings"]["repeat"] == 3
    assert report["settings"]["keep_pages"] is False
    got = {(r["layer"], tuple(sorted(r["size"].items()))) for r in report["results"]}
    wanted = {(layer, tuple(sorted(size.items()))) for layer, sizes in QUICK.items() for size in sizes}
    assert got == wanted
    for r in report["results"]:  # the rest of the machine's CPU, metered over the timed samples
        assert r["other_cpu"]["other_cores"] >= 0 and r["contended"] == (r["other_cpu"]["other_cores"] > 0.25)

    for r in report["results"]:
        where = f"{r['layer']} {r['shape']}"
        assert r["status"] == "ok", where
        assert r["check"]["ok"], (where, r["check"])
        for name, col in r["columns"].items():
            if name == "native" and r["layer"] in NO_NATIVE_OP or name == "compiled":
                assert col is None, where  # no native op; --no-compile
                continue
            assert col is not None, (where, name)
            assert len(col["samples_ms"]) == 3, (where, name)
            assert all(t > 0 and math.isfinite(t) for t in col["samples_ms"]), (where, name)
            assert col["median_ms"] > 0, (where, name)
            assert col["peak_bytes"] >= 0 and col["held_bytes"] >= 0, (where, name)
        for name, ratio in r["ratios"].items():
            if name.endswith("_over_native") and r["layer"] in NO_NATIVE_OP or name.startswith("compiled"):
                assert ratio is None, where
                continue
            assert ratio is not None and math.isfinite(ratio) and ratio > 0, (where, name, ratio)

    text = table.read_text()
    for layer, sizes in QUICK.items():
        for size in sizes:
            # one row per layer and size; a row run while the machine was busy is marked with a warning
            cell = re.escape("x".join(str(v) for v in size.values()))
            assert re.search(rf"^\| {layer} \| {cell}( ⚠)? \|", text, re.M), (layer, size)


def test_keep_pages_is_recorded_and_said_in_the_table(tmp_path):
    """``--keep-pages`` (freed memory stays mapped, no call pays for fresh pages) runs, and says so."""
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--layers", "cross_entropy", "--repeat", "1",
         "--min-sample-ms", "1", "--no-compile", "--keep-pages", "--json", str(out), "--markdown", str(table)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "freed memory kept mapped" in proc.stdout.splitlines()[0]
    report = json.loads(out.read_text())
    assert report["settings"]["keep_pages"] is True
    assert all(r["status"] == "ok" and r["check"]["ok"] for r in report["results"])
    assert "freed memory kept mapped (`--keep-pages`" in table.read_text().splitlines()[0]


SPEC_TIMING_LAYER = '''import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "d"), W=Tensor("d", "h"))
def projection(x, W):
    return torch.tanh(x @ W)
'''


def test_spec_timing_times_each_layer_of_a_spec_file(tmp_path):
    """``scripts/spec_timing.py`` on a user's spec file: one line per layer, kernel / autograd through
    the spec, which kernel, and autograd's time (tiny sizes: this checks the script, it times nothing)."""
    spec = tmp_path / "mine.py"
    spec.write_text(SPEC_TIMING_LAYER)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "spec_timing.py"), str(spec), "--rows", "8",
                          "--size", "4", "--repeat", "2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    line = re.search(r"^\s*(\d+\.\d\d)\s+fused\s+autograd\s+(\d+\.\d+) ms\s+projection$", run.stdout, re.M)
    assert line and float(line.group(1)) > 0 and float(line.group(2)) > 0, run.stdout
