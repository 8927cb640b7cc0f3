"""The `keras-moe` command line: parses arguments and calls the library."""

import argparse
import dataclasses
import os
import sys

# Process-wide TensorFlow settings the command line wants (see
# docs/performance.md). They must be in the environment before TensorFlow
# starts, so when they are missing the command re-executes itself once.
ENV_DEFAULTS = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _ensure_environment(argv):
    missing = {k: v for k, v in ENV_DEFAULTS.items() if k not in os.environ}
    if not missing or os.environ.get("KERAS_MOE_NO_REEXEC"):
        return
    env = {**os.environ, **missing, "KERAS_MOE_NO_REEXEC": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "keras_moe.pipelines.cli", *argv], env)


def _add_dataclass_flags(parser, cls):
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=field.type if field.type in (int, float, str) else str,
                            default=None, help=f"(default: {field.default!r})")


def _dataclass_from_args(cls, args):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if v is not None})


def build_parser():
    from keras_moe.pipelines.demo import DemoConfig

    parser = argparse.ArgumentParser(
        prog="keras-moe",
        description="Sparsely-gated Mixture-of-Experts models for Keras (Shazeer et al. 2017).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small MoE-LSTM language model on real text on this machine and report "
        "perplexity and expert load",
    )
    _add_dataclass_flags(demo, DemoConfig)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _ensure_environment(argv)
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from keras_moe.pipelines.demo import DemoConfig, run_demo

        try:
            run_demo(_dataclass_from_args(DemoConfig, args))
        except (FileNotFoundError, ValueError) as error:
            print(f"keras-moe demo: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
