"""TensorFlow's start, without the C++ lines it prints before anyone can ask it not to.

TensorFlow's native libraries log while they load, before
`TF_CPP_MIN_LOG_LEVEL` is read: "All log messages before
absl::InitializeLog() is called are written to STDERR", "Could not find
cuda drivers on your machine", the oneDNN and CPU-feature notices. The
CUDA probe of the first device query then logs "failed call to cuInit" as
an error on a machine without a GPU. None of it is something a user of
this library can act on, and on a CPU machine it is printed by every
process, so `import_tensorflow_quietly` points the process's standard
error at /dev/null, at the file-descriptor level where the C++ code
writes, for just those two steps.

Who calls it:

- the `keras-moe` command line (`keras_moe.pipelines.command.load_tensorflow`),
  unless `--verbose`;
- `import keras_moe` itself when the environment has
  `KERAS_MOE_QUIET_START=1` and TensorFlow is not loaded yet: the scripts
  in `benchmarks/` set it, so their tables are not preceded by C++ lines.
  A plain `import keras_moe` never hides anything.

This module imports nothing from TensorFlow or the rest of the package at
import time, so it can run before both.
"""

import os
import sys

# The environment variable that asks `import keras_moe` for a quiet start.
QUIET_START_VARIABLE = "KERAS_MOE_QUIET_START"


def quiet_start_requested(environ=None):
    """True when `KERAS_MOE_QUIET_START` is set to anything but "", "0" or "false"."""
    value = (os.environ if environ is None else environ).get(QUIET_START_VARIABLE, "")
    return value.strip().lower() not in ("", "0", "false", "no")


def import_tensorflow_quietly():
    """Import TensorFlow and list its devices with standard error silenced; returns the module.

    Python exceptions raised by either step still reach the caller (and are
    printed after standard error is restored); only what the native code
    writes meanwhile is lost. When TensorFlow is already imported, nothing
    is silenced: the lines, if any, were printed already.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow as tf

        # The first device query probes CUDA, which logs its own error line.
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    return tf
