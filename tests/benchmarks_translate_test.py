"""The translation throughput benchmark runs as a script (smoke run; no timing is asserted)."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

PER_PRESET = {
    "preset", "train_tokens_per_second", "train_step_seconds", "train_target_tokens",
    "greedy_sentences_per_second", "greedy_tokens_per_second", "greedy_mean_output_tokens",
    "beam_sentences_per_second", "beam_tokens_per_second", "beam_mean_output_tokens",
    "ops_per_timestep", "params",
}


@pytest.mark.slow  # 46 s
def test_translate_throughput_quick_writes_json(tmp_path):
    out = tmp_path / "x.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "translate_throughput.py"), "--quick",
         "--repeats", "1", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "MoE/dense" in done.stdout

    result = json.loads(out.read_text())
    assert result["benchmark"] == "translate_throughput"
    assert result["quick"] is True
    assert (result["vocab_size"], result["batch_size"], result["beam_width"]) == (50, 4, 4)
    assert set(result["machine"]) == {"platform", "cpus", "tensorflow", "keras"}
    (row,) = result["rows"]
    assert (row["moe"]["preset"], row["dense"]["preset"]) == ("cpu-gnmt-moe-16", "cpu-gnmt-dense")
    for side in ("moe", "dense"):
        numbers = row[side]
        assert set(numbers) == PER_PRESET
        for key, value in numbers.items():
            if key != "preset":
                assert math.isfinite(value) and value > 0, (side, key, value)
        # Untrained models decode to the limit floor(1.2 * source length),
        # 3 to floor(1.2 * 6) = 7 tokens for the quick sources of 3 to 6,
        # unless they produce <eos> (id 2 of 50) first. A mean near 1 would
        # say that decoding stops at once, and measures nothing.
        for name in ("greedy", "beam"):
            assert 2 <= numbers[f"{name}_mean_output_tokens"] <= 7
    # Both see the same batches: the same real target tokens.
    assert row["moe"]["train_target_tokens"] == row["dense"]["train_target_tokens"]
    ratios = row["ratios_moe_over_dense"]
    assert set(ratios) == {
        "train_tokens_per_second", "greedy_sentences_per_second", "beam_sentences_per_second",
    }
    for key, value in ratios.items():
        assert value == row["moe"][key] / row["dense"][key]
    # The dense block matches the MoE's k * expert multiply-adds: the MoE adds
    # only its two gating matrices, 2 * d * E = 2 * 16 * 16 per source and per
    # target token (encoder and decoder MoE).
    assert row["moe"]["ops_per_timestep"] - row["dense"]["ops_per_timestep"] == 2 * (2 * 16 * 16)
