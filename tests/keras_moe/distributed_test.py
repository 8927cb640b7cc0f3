"""MoE under tf.distribute.MirroredStrategy equals one device on the global batch.

With noise off (`top_k` gating), one `strategy.run` step on 4 replicas gives
the outputs, balancing loss and (summed) gradients of one device on the same
32-token batch, to 1e-5. The check runs `tests/keras_moe/mirrored_script.py` in a new process, which
splits the CPU into 4 logical devices (possible only before TensorFlow
starts) and trains the same model with `fit` for 3 SGD steps of a 32-token
global batch on one device and on 4 replicas. With the default
`balancing_scope="global"` the balancing losses see importance and load
summed across replicas, as on one device, so the weights agree to float
rounding; with `"replica"` each replica balances its own 8 tokens and the
weights differ, which shows the comparison can fail.
"""

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "tests" / "keras_moe" / "mirrored_script.py"


def test_fit_on_four_replicas_matches_one_device():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env,
        cwd=str(REPO_ROOT),
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("RESULT "):])
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
