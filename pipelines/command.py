"""The command line's plumbing: a parser that knows its options, and a quiet TensorFlow start.

`keras_moe.pipelines.cli` builds the `keras-moe` command with
`CommandParser` (every (sub)command takes `--verbose` and `--quiet`; the
tests walk `options` and `subcommands` to check that every option has help
text) and calls `load_tensorflow` once the arguments are parsed, so that
`--help` and argument errors never wait for TensorFlow.
"""

import argparse
import os
import sys


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
    for just those two steps; Python errors raised by them still show (they
    are printed after it is restored). `verbose` keeps everything.
    """
    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
    else:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)
    # Every layer, optimizer and model class registered with Keras, as a
    # library import registers them (the command line imports `keras_moe`
    # lazily): runs reload whatever they hold.
    import keras_moe
    import keras_moe.models  # noqa: F401

    for name in keras_moe.__all__:
        getattr(keras_moe, name)
