"""MoE under tf.distribute.MirroredStrategy equals one device on the global batch.

`tests/keras_moe/mirrored_script.py` runs in a new process, which splits the
CPU into 4 logical devices (possible only before TensorFlow starts), and
compares one device with:

- 4 data-parallel replicas (every replica holds every expert). With noise
  off (`top_k` gating), one `strategy.run` step gives the outputs,
  balancing loss and (summed) gradients of one device on the same 32-token
  batch, to 1e-5, and 3 SGD steps of `fit` end with the same weights. With
  the default `balancing_scope="global"` the balancing losses see importance
  and load summed across replicas, as on one device; with `"replica"` each
  replica balances its own 8 tokens and the weights differ, which shows the
  comparison can fail.
- 4 expert-parallel replicas (`expert_parallel=True`: each replica holds 2
  of the 8 experts, tokens travel by all-gather and come back by
  all-reduce). The same step equality (an expert's gradient is its replica's
  shard, not a sum), `fit` with SGD and Adam, the capacity-limited dispatch,
  a quarter of the expert memory per device, and `.keras` files that hold
  all experts and reload on one device. Training goes through the explicit
  opt-in `keras_moe.ExpertParallelOptimizer`; no Keras class is patched.
"""

import json
import os
import sys

import pytest

from tests.conftest import REPO_ROOT, run_to_completion

SCRIPT = REPO_ROOT / "tests" / "keras_moe" / "mirrored_script.py"

# Slow: the script's new process with 4 logical devices takes 80-90 s of a
# 2-core `make test` (its longest setup); `make test-slow` and CI run it, and
# tests/pipelines/training/distribution_test.py keeps real strategies in
# `make test`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mirrored")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "EP_SCRIPT_TMP": str(tmp)}
    # A hang guard only: 120 s beside a loaded suite, 315 s at load average 6.
    done = run_to_completion(
        [sys.executable, str(SCRIPT)], typical_s=150, capture_output=True, text=True, env=env,
        cwd=str(REPO_ROOT),
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_fit_on_four_replicas_matches_one_device(report):
    for kind in ("flat", "hier"):
        # One custom `strategy.run` step: outputs, balancing loss and summed
        # gradients equal one device's on the global batch (to 1e-5).
        step = report[f"{kind}_global_step"]
        assert step["aux_value"] > 0.01 and step["grad_scale"] > 0.01
        assert step["output"] < 1e-5 and step["aux"] < 1e-5 and step["grad"] < 1e-5, step
        per_replica = report[f"{kind}_replica_step"]
        assert per_replica["aux"] > 1e-2 and per_replica["grad"] > 1e-3, per_replica
        assert report[f"{kind}_replicas"] == 4
        # Training moved the weights by far more than the tolerance...
        assert report[f"{kind}_moved"] > 0.1
        # ...and 4 replicas with global balancing end where one device does.
        assert report[f"{kind}_global"] < 5e-5, report
        # Per-replica balancing is a different objective: the check can fail.
        assert report[f"{kind}_replica"] > 100 * max(report[f"{kind}_global"], 1e-6), report


def test_expert_parallel_step_matches_one_device(report):
    # Dropless flat, capacity-limited flat (pairs are dropped: capacity 1.0
    # over the global batch, as one device computes it) and hierarchical.
    for kind in ("flat", "cap", "hier"):
        step = report[f"ep_{kind}_step"]
        assert step["grad_scale"] > 0.01
        assert step["output"] < 1e-5 and step["aux"] < 1e-5 and step["grad"] < 1e-5, step


def test_expert_parallel_fit_matches_one_device(report):
    # 3 steps of `fit`: SGD(0.5) moves weights by up to 16, Adam(0.05) by
    # 0.15; each replica's optimizer slots follow its own experts.
    for name in ("flat_sgd", "flat_adam", "cap_sgd"):
        fit = report[f"ep_{name}_fit"]
        assert fit["moved"] > 0.1, (name, fit)
        assert fit["difference"] < 5e-5, (name, fit)


def test_expert_parallel_clipnorm_clips_the_whole_expert_gradient(report):
    # `clipnorm` on an expert shard uses the norm of all replicas' shards
    # together (one device's norm): one step of SGD(0.5, clipnorm=0.05)
    # leaves the experts where one device leaves them. Clipping each shard
    # by its own, smaller norm would scale them differently.
    step = report["ep_clipnorm_step"]
    assert step["moved"] > 1e-3, step
    assert step["difference"] < 1e-6, step


def test_expert_parallelism_patches_no_keras_class(report):
    # The opt-in is `keras_moe.ExpertParallelOptimizer`; building and
    # training expert-parallel layers leaves every member of Keras's
    # optimizer, layer and model classes as it was.
    assert report["patched_members"] == []


def test_expert_parallel_memory_falls_by_replica_count(report):
    memory = report["ep_memory_bytes"]
    # 8 experts of 6 -> 12 -> 6 with biases: 8 * (72 + 12 + 72 + 6) floats.
    assert memory["data_parallel"] == [8 * 162 * 4] * 4
    assert memory["expert_parallel"] == [2 * 162 * 4] * 4


def test_expert_parallel_model_saves_all_experts(report):
    reload = report["ep_reload"]
    assert reload["w_in_shape"] == [8, 6, 12]
    assert reload["weights"] == 0.0 and reload["into_replicas"] == 0.0
    assert reload["prediction"] < 1e-4
    # Adam's moments of every replica's experts are saved, equal to one
    # device's after the same 3 steps, and load back into the replicas.
    assert reload["optimizer_scale"] > 1e-3
    assert reload["optimizer_variables"] < 1e-5, reload
    assert reload["optimizer_into_replicas"] == 0.0


def test_expert_parallel_bad_configurations_are_named(report):
    errors = report["ep_errors"]
    assert "num_experts=6" in errors["not_divisible"]
    assert "replica count 4" in errors["not_divisible"]
    assert "expert parallel over 4 replicas" in errors["cross_replica_call"]
    assert "moe_x/experts" in errors["cross_replica_call"]


def test_expert_dropout_on_expert_parallel_replicas(report):
    # Each replica drops its own experts' hidden units in training only:
    # inference equals one device's, training draws differ, and their mean
    # over 300 draws is the inference output (inverted dropout is unbiased).
    check = report["ep_expert_dropout"]
    assert check["inference_vs_one_device"] < 1e-5, check
    assert check["spread"] > 0.1, check
    assert check["z"] < 5.0, check
