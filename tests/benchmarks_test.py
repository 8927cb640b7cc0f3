"""The benchmark scripts run (smoke run on a tiny grid; no timing is asserted)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, patient


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 45 s
def test_moe_layer_benchmark_quick_grid_writes_json(tmp_path, capsys):
    bench = _load("moe_layer")
    out = tmp_path / "moe_layer.json"
    bench.main(["--quick", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["kind"], r["num_experts"], r["k"]) for r in rows} == {
        ("flat", 4, 1), ("flat", 4, 2), ("flat", 64, 1), ("flat", 64, 2), ("hier", 64, 4),
    }
    for r in rows:
        assert r["forward_s"] > 0 and r["ideal_forward_s"] > 0
        # Parameters: E experts of d*h + h + h*d + d, plus the gates.
        d, h, e = r["d"], r["h"], r["num_experts"]
        experts = e * (2 * d * h + h + d)
        gates = 2 * d * e if r["kind"] == "flat" else 2 * d * r["groups"] + 2 * d * e
        assert r["params"] == experts + gates
    table = bench.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "ideal" in capsys.readouterr().out


@pytest.mark.slow  # 61 s
def test_lm_throughput_benchmark_quick_writes_json(tmp_path, capsys):
    bench = _load("lm_throughput")
    out = tmp_path / "lm_throughput.json"
    bench.main(["--quick", "--repeats", "1", "--pairs", "cpu-moe-32:cpu-dense",
                "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["moe"]["preset"], row["dense"]["preset"]) == ("cpu-moe-32", "cpu-dense")
    for side in ("moe", "dense"):
        assert row[side]["tokens_per_second"] > 0
    assert row["ratio"] == row["dense"]["tokens_per_second"] / row["moe"]["tokens_per_second"]
    # Same per-token compute up to the gating matrices: 2*d*E = 2*16*32 ops.
    assert row["moe"]["ops_per_timestep"] - row["dense"]["ops_per_timestep"] == 2 * 16 * 32
    assert "dense/MoE" in capsys.readouterr().out


@pytest.mark.slow  # 67 s: a new process with 2 logical devices
def test_distributed_benchmark_counts_what_each_replica_sends(tmp_path):
    out = tmp_path / "distributed.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "distributed.py"), "--quick",
         "--replicas", "2", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=patient(90),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "expert B/replica" in done.stdout
    result = json.loads(out.read_text())
    rows = {row["mode"]: row for row in result["rows"]}
    assert set(rows) == {"data", "expert"} and rows["data"]["replicas"] == 2
    # --quick: 8 experts of 16 -> 32 -> 16 with biases, gate and noise 16 x 8,
    # 64 tokens, k = 2, so 32 tokens and 64 pairs per replica.
    experts, gate = 8 * (16 * 32 + 32 + 32 * 16 + 16), 2 * 16 * 8
    assert rows["data"]["elements"]["gradient_all_reduce"] == experts + gate
    assert rows["expert"]["elements"]["gradient_all_reduce"] == gate
    # Measured by the layer: tokens, 5 values per pair, 2 sizes, and the
    # partial outputs of the whole batch.
    assert rows["expert"]["elements"]["dispatch_forward_measured"] == 32 * 16 + 5 * 64 + 2 + 64 * 16
    assert rows["data"]["elements"]["dispatch_forward_measured"] == 0
    assert rows["expert"]["expert_weight_bytes_per_replica"] * 2 == (
        rows["data"]["expert_weight_bytes_per_replica"]
    ) == 4 * experts


def test_trace_time_growth_is_trace_time_at_the_largest_over_the_smallest_e():
    bench = _load("trace_time")
    rows = [
        dict(layer="hier", strategy="loop", num_experts=e, finished=True, first_step_s=f,
             next_step_s=n)
        for e, f, n in ((4096, 7.0, 1.0), (256, 5.0, 1.0), (1024, 6.0, 0.5))
    ] + [dict(layer="flat", strategy="unrolled", num_experts=256, finished=False)]
    growth = bench.growth(rows)
    assert growth == {
        "hier/loop": dict(experts=[256, 4096], trace_s=[4.0, 6.0], ratio=1.5)
    }
