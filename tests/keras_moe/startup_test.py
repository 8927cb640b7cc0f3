"""`KERAS_MOE_QUIET_START`: `import keras_moe` without TensorFlow's C++ start-up lines.

Each case is a new Python process, as a benchmark script is: what TensorFlow
prints while it loads can only be seen from outside.
"""

import os
import subprocess
import sys

import pytest

from keras_moe import _startup

# What TensorFlow's native start-up writes to stderr on a machine without a GPU.
MARKERS = ("absl::InitializeLog", "cuda drivers", "cuInit", "cpu_feature_guard", "I0000", "E0000")

# Imports the package, then writes to stderr at the file-descriptor level and
# from Python: both must still arrive after the quiet start.
PROGRAM = (
    "import os, sys\n"
    "import keras_moe\n"
    "import tensorflow as tf\n"
    "assert keras_moe.MoE is not None and tf.constant(2).numpy() == 2\n"
    "os.write(2, b'fd-level line\\n')\n"
    "print('python line', file=sys.stderr)\n"
    "print('ok')\n"
)


def _run(quiet):
    env = {k: v for k, v in os.environ.items()
           if k not in (_startup.QUIET_START_VARIABLE, "TF_CPP_MIN_LOG_LEVEL")}
    if quiet is not None:
        env[_startup.QUIET_START_VARIABLE] = quiet
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
    return done.stderr


def test_quiet_start_hides_the_native_start_up_lines_and_nothing_after():
    loud = _run(quiet=None)
    if not any(marker in loud for marker in MARKERS):
        pytest.skip("this TensorFlow build prints nothing at start-up, so there is nothing to hide")
    quiet = _run(quiet="1")
    for marker in MARKERS:
        assert marker not in quiet, quiet
    # Standard error is restored: later lines, native or Python, still arrive.
    assert "fd-level line" in quiet and "python line" in quiet, quiet
    # The plain import is unchanged: the same lines as without the variable.
    assert "fd-level line" in loud and "python line" in loud


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("yes", True), (" 1 ", True),
    ("", False), ("0", False), ("false", False), ("False", False), ("no", False),
])
def test_quiet_start_reads_the_variable(value, expected):
    assert _startup.quiet_start_requested({_startup.QUIET_START_VARIABLE: value}) is expected


def test_quiet_start_is_off_when_the_variable_is_absent():
    assert _startup.quiet_start_requested({}) is False
