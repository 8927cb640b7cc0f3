"""`benchmarks/device_check.sh`: its CPU dry run writes what the GPU run would.

The dry run (`--cpu --quick`) takes the same code paths as the accelerator
run (venv check, the skipped install step, each stage under its time limit,
the summary), at tiny sizes. `make test` runs the layer stage; the full dry
run with the language-model and translation stages is `slow` (their
`--quick` runs are also tested in tests/benchmarks_test.py and
tests/benchmarks_translate_test.py).
"""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT, run_to_completion


def _dry_run(tmp_path, *extra, typical_s):
    env = {**os.environ, "OUT": str(tmp_path)}
    result = run_to_completion(
        ["bash", "benchmarks/device_check.sh", "--cpu", "--quick", *extra],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, typical_s=typical_s,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "install step: skipped (--cpu)" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "CPU" and summary["quick"] is True
    assert "device check on CPU" in result.stdout
    return summary, result.stdout


def _check_layers(path):
    layers = json.loads(path.read_text())
    assert layers["device"] == "CPU"
    cases = {(r["dispatch"], r["precision"]) for r in layers["rows"]}
    assert cases == {(dispatch, precision) for dispatch in ("dropless", "capacity 1.25")
                     for precision in ("float32", "bfloat16")}
    for row in layers["rows"]:
        assert row["forward_backward_s"] > 0 and row["ideal_forward_backward_s"] > 0
        assert row["ratio"] == pytest.approx(
            row["forward_backward_s"] / row["ideal_forward_backward_s"])


def test_dry_run_of_the_layer_stage_writes_json(tmp_path):
    summary, stdout = _dry_run(tmp_path, "--only", "layers", typical_s=30)
    assert list(summary["stages"]) == ["layers"]
    assert summary["stages"]["layers"]["rc"] == 0
    _check_layers(tmp_path / "layers.json")
    assert "bfloat16" in stdout


@pytest.mark.slow  # about 2 minutes: three TensorFlow processes, two trained model pairs
def test_full_dry_run_writes_every_stage(tmp_path):
    summary, stdout = _dry_run(tmp_path, typical_s=120)
    assert set(summary["stages"]) == {"layers", "lm", "translate"}
    _check_layers(tmp_path / "layers.json")
    for name in ("lm", "translate"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        key = "tokens_per_second" if name == "lm" else "train_tokens_per_second"
        assert rows and rows[0]["moe"][key] > 0
    assert "tokens/s" in stdout


def test_bad_arguments_exit_2():
    for args in (["--gpu"], ["--only", "bleu"]):
        result = subprocess.run(["bash", "benchmarks/device_check.sh", *args], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
