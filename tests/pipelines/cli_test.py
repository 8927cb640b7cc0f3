"""The `keras-moe` command line itself: help on every option, no TensorFlow for `--help`, quiet.

Issue 28, points 11 and 12: `keras-moe --help` took 40-55 s because
TensorFlow was imported first; every TensorFlow command printed "Could not
find cuda drivers" and "failed call to cuInit"; options had no help text.
"""

import json
import os
import subprocess
import sys

import pytest

from keras_moe.pipelines.cli import build_parser

HEAVY = ("tensorflow", "keras", "tensorflow_text")


def _imported_modules(args, program=None):
    """Run the command under `-X importtime`; the modules it imported (and the result)."""
    # Both settings present: the command does not re-execute itself (which
    # would drop -X importtime).
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-X", "importtime"]
    command += [program] if program else ["-m", "keras_moe.pipelines.cli"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, env=env,
                          timeout=120)
    modules = [line.split("|")[-1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:")]
    return modules, done


@pytest.mark.parametrize("args", [["--help"], ["translate", "evaluate", "--help"],
                                  ["lm", "train", "--help"], ["translate", "train"]])
def test_help_and_argument_errors_do_not_import_tensorflow(args):
    modules, done = _imported_modules(args)
    assert "keras_moe.pipelines.progress" in modules  # the measurement works
    assert not [m for m in modules if m.split(".")[0] in HEAVY]
    if "--help" in args:
        assert done.returncode == 0 and "usage: keras-moe" in done.stdout
    else:
        assert done.returncode == 2 and "--run-dir" in done.stderr


def test_the_installed_script_answers_help_without_tensorflow():
    script = os.path.join(os.path.dirname(sys.executable), "keras-moe")
    if not os.path.exists(script):
        pytest.skip(f"no keras-moe script beside {sys.executable}")
    modules, done = _imported_modules(["--help"], program=script)
    assert done.returncode == 0 and "demo" in done.stdout
    assert "keras_moe.pipelines.cli" in modules
    assert not [m for m in modules if m.split(".")[0] in HEAVY]


def test_a_tensorflow_command_prints_no_cuda_or_startup_chatter(tmp_path):
    hyp, ref = tmp_path / "hyp.de", tmp_path / "ref.de"
    hyp.write_text("die Katze sieht eine Maus .\n", encoding="utf-8")
    ref.write_text("die Katze sieht eine Maus .\n", encoding="utf-8")
    # As a user's shell: none of the command's own settings in the environment.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_MOE_NO_REEXEC", "TF_CPU_ALLOCATOR_USE_BFC")}
    command = [sys.executable, "-m", "keras_moe.pipelines.cli", "translate", "score",
               "--hyp", str(hyp), "--ref", str(ref)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bleu"] == pytest.approx(100.0)
    for marker in ("cuda", "cuInit", "absl::InitializeLog", "oneDNN", "E0000", "I0000"):
        assert marker not in done.stderr, done.stderr
    # --verbose shows TensorFlow's own start-up lines again (so the command
    # above did load TensorFlow, and its silence is the CLI's doing).
    verbose = subprocess.run([*command, "--verbose"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert verbose.returncode == 0
    assert "I0000" in verbose.stderr or "E0000" in verbose.stderr, verbose.stderr


def _walk(parser, path=()):
    yield path, parser
    for name, child in parser.subcommands.items():
        yield from _walk(child, (*path, name))


def test_every_option_of_every_command_has_help_text():
    missing, count = [], 0
    for path, parser in _walk(build_parser()):
        for action in parser.options:
            count += 1
            if not action.help or not action.help.strip():
                missing.append(f"keras-moe {' '.join(path)} {'/'.join(action.option_strings)}"
                               f"{action.dest if not action.option_strings else ''}")
    assert count > 80  # the walk reaches every subcommand
    assert not missing, missing


def test_verbose_and_quiet_are_accepted_before_and_after_the_command():
    parser = build_parser()
    before = parser.parse_args(["--quiet", "translate", "score", "--hyp", "h", "--ref", "r"])
    after = parser.parse_args(["translate", "score", "--hyp", "h", "--ref", "r", "--quiet"])
    neither = parser.parse_args(["translate", "score", "--hyp", "h", "--ref", "r"])
    assert before.quiet and after.quiet and not neither.quiet
    assert not before.verbose and parser.parse_args(["--verbose", "compare", "r"]).verbose


FILTERED_WRITER = r"""
import os, signal, sys, time
from keras_moe.pipelines import command
os.write(2, b"before the filter\n")
command.filter_native_log()
notice = b"oneDNN supports DT_BOOL only on platforms with AVX-512. Falling back\n"
os.write(2, b"E0000 00:00:1.5 42 util.cc:131] " + notice)
os.write(2, b"W0000 00:00:1.6 42 other.cc:7] a real warning\nE00")
time.sleep(0.2)  # a native line split across two writes
os.write(2, b"00 00:00:1.7 42 util.cc:131] " + notice + b"step 5/10\r")
print("a Python line", file=sys.stderr)
os.write(2, b"last words, no newline")
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_native_noise_is_filtered_from_stderr_and_nothing_else_is_lost(ending):
    done = subprocess.run([sys.executable, "-c", FILTERED_WRITER, ending], capture_output=True,
                          timeout=120)
    assert done.returncode == (0 if ending == "exit" else -9)
    # Byte for byte: both notices gone (one arrived in two pieces), the
    # rest in order, the carriage return and the unterminated line kept,
    # even when the process is killed right after writing them.
    # (Importing keras_moe starts TensorFlow, whose start-up lines come first.)
    assert done.stderr.decode().split("before the filter\n")[-1] == (
        "W0000 00:00:1.6 42 other.cc:7] a real warning\n"
        "step 5/10\ra Python line\n"
        "last words, no newline"
    )
