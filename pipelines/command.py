"""The command line's plumbing: a parser that knows its options, and a quiet TensorFlow start.

`keras_moe.pipelines.cli` builds the `keras-moe` command with
`CommandParser` (every (sub)command takes `--verbose` and `--quiet`; the
tests walk `options` and `subcommands` to check that every option has help
text) and calls `load_tensorflow` once the arguments are parsed, so that
`--help` and argument errors never wait for TensorFlow. Before anything,
`ensure_environment` puts the process-wide TensorFlow settings in place
(re-executing the command once if it must). `load_tensorflow`
also starts `filter_native_log`, which drops the few native log lines
TensorFlow prints *after* start-up that are known to be harmless.
"""

import argparse
import os
import subprocess
import sys

# Process-wide TensorFlow settings the command line wants (see
# docs/performance.md). They must be in the environment before TensorFlow
# starts, so when they are missing the command re-executes itself once.
ENV_DEFAULTS = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}


def ensure_environment(argv):
    """Re-execute this command once when `ENV_DEFAULTS` are missing from the environment."""
    defaults = dict(ENV_DEFAULTS)
    if "--verbose" in argv:  # TensorFlow's own log level then
        defaults.pop("TF_CPP_MIN_LOG_LEVEL")
    missing = {k: v for k, v in defaults.items() if k not in os.environ}
    if not missing or os.environ.get("KERAS_MOE_NO_REEXEC"):
        return
    env = {**os.environ, **missing, "KERAS_MOE_NO_REEXEC": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "keras_moe.pipelines.cli", *argv], env)


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` that keeps its options and subcommands, and takes the output flags.

    Every (sub)command accepts `--verbose` and `--quiet`, before or after the
    subcommand's name. `options` lists the actions `add_argument` made and
    `subcommands` the child parsers by name (the tests walk them: every
    option has help text).
    """

    def __init__(self, *args, top=False, **kwargs):
        self.options = []
        self.subcommands = {}
        super().__init__(*args, **kwargs)
        # SUPPRESS below the top: a flag given before the subcommand is not
        # reset by the subcommand's default.
        default = False if top else argparse.SUPPRESS
        self.add_argument(
            "--verbose", action="store_true", default=default,
            help="show TensorFlow's C++ and CUDA start-up messages (hidden by default)",
        )
        self.add_argument(
            "--quiet", action="store_true", default=default,
            help="no progress lines on stderr (results and errors still print)",
        )

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        return action

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        add_parser = action.add_parser

        def add(name, **parser_kwargs):
            child = add_parser(name, **parser_kwargs)
            self.subcommands[name] = child
            return child

        action.add_parser = add
        return action


def load_tensorflow(verbose=False):
    """Import TensorFlow and find its devices, its C++ start-up messages silenced.

    TensorFlow's native libraries log before `TF_CPP_MIN_LOG_LEVEL` is read
    ("All log messages before absl::InitializeLog() ...", "Could not find
    cuda drivers", oneDNN notices), and the CUDA probe of the first device
    query logs "failed call to cuInit" as an error on a machine without a
    GPU. Standard error is pointed at /dev/null at the file-descriptor level
    for just those two steps (`keras_moe._startup.import_tensorflow_quietly`);
    Python errors raised by them still show (they are printed after it is
    restored). Past them, `filter_native_log` takes
    out the harmless native lines of `NATIVE_NOISE`. `verbose` keeps
    everything.
    """
    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
    else:
        from keras_moe import _startup

        _startup.import_tensorflow_quietly()
        filter_native_log()
    # Every layer, optimizer and model class registered with Keras, as a
    # library import registers them (the command line imports `keras_moe`
    # lazily): runs reload whatever they hold.
    import keras_moe
    import keras_moe.models  # noqa: F401

    for name in keras_moe.__all__:
        getattr(keras_moe, name)


# Native log lines TensorFlow prints after start-up that say nothing a user
# can act on (regular expressions, searched in each line of standard error):
# - oneDNN's notice, at ERROR level, the first time a graph transposes a
#   bool tensor (seen on this project's CPU, which reports AVX512F: the
#   check wants more than that). Keras's RNN does that with the
#   `[batch, time]` mask of every LSTM fed by `Embedding(mask_zero=True)`,
#   and TensorFlow falls back to its Eigen kernel, as it says. Only
#   `TF_CPP_MIN_LOG_LEVEL=3` would hide it, and that hides real C++ errors.
NATIVE_NOISE = (r"oneDNN supports DT_BOOL only on platforms with AVX-512",)

# The filter process: standard error in on its stdin, out on its stdout,
# without the lines matching a pattern (argv). It reads raw chunks, so
# progress written without a newline passes at once; only a trailing piece
# that could begin a native log line ("E0000 ...") waits for its newline.
_FILTER_PROGRAM = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
noise = [re.compile(p.encode()) for p in sys.argv[1:]]
native_start = re.compile(rb"[IWEF][0-9]{0,4}( |$)")
tail = b""
def write(data):
    while data:
        data = data[os.write(1, data):]
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    *lines, tail = (tail + chunk).split(b"\n")
    kept = [line + b"\n" for line in lines if not any(p.search(line) for p in noise)]
    if tail and not native_start.match(tail[:6]):
        kept.append(tail)
        tail = b""
    write(b"".join(kept))
if tail and not any(p.search(tail) for p in noise):
    write(tail)
"""


_filter_process = None


def filter_native_log(patterns=NATIVE_NOISE):
    """From now on, this process's standard error passes through a filter of `patterns`.

    Lines matching one of the regular expressions are dropped, everything
    else reaches the original standard error unchanged and in order. The
    filter works at the file-descriptor level, so it sees what TensorFlow's
    C++ code writes. It is a separate process in its own session: a crash or
    a `kill` of this process (even of its process group, or Ctrl-C) cannot
    lose what was already written, and the filter ends when the last writer
    closes the pipe. The command line calls it once TensorFlow is loaded,
    unless `--verbose`.

    Args:
        patterns: regular expressions (str), searched in each line.
    """
    if not patterns:
        return
    sys.stderr.flush()
    read, write = os.pipe()
    global _filter_process
    try:
        # Kept referenced: the filter outlives everything in this process.
        _filter_process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER_PROGRAM, *patterns],
            stdin=read, stdout=2, stderr=2, start_new_session=True,
        )
        os.dup2(write, 2)
    finally:
        os.close(read)
        os.close(write)
