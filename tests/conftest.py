"""Shared test setup: quiet TensorFlow, deterministic seeds, data locations."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# A wall-clock limit in a test only guards against a hang; it never checks
# speed. Each one is PATIENCE times what the guarded work typically takes on
# the project's idle 2-core machine, so a machine busy with other work (CI,
# or `make test` beside a build) still passes: a 2-core machine running 4
# other processes gives each about a third of its usual CPU.
# KERAS_MOE_TEST_PATIENCE raises the factor on a slower machine.
PATIENCE = max(5.0, float(os.environ.get("KERAS_MOE_TEST_PATIENCE", "5")))


def patient(typical_s):
    """Seconds to wait for work that takes `typical_s` on the idle 2-core machine."""
    return PATIENCE * typical_s


def run_to_completion(command, *, typical_s, **kwargs):
    """`subprocess.run(command, **kwargs)` that waits `patient(typical_s)` seconds.

    A process still running then is killed and the test fails with the
    command, the limit and the end of what the process wrote (when captured).
    """
    limit = patient(typical_s)
    started = time.monotonic()
    try:
        return subprocess.run(command, timeout=limit, **kwargs)
    except subprocess.TimeoutExpired as expired:
        tails = []
        for name, data in (("stdout", expired.stdout), ("stderr", expired.stderr)):
            if data:
                text = data.decode(errors="replace") if isinstance(data, bytes) else data
                tails.append(f"--- {name} (last 3000 characters) ---\n{text[-3000:]}")
        message = (
            f"{' '.join(map(str, command))[:500]}\nwas still running after "
            f"{time.monotonic() - started:.0f} s (limit {limit:.0f} s, {PATIENCE:g} x its "
            f"typical {typical_s:g} s on an idle 2-core machine) and was killed: a hang, or a "
            "machine far slower than that (set KERAS_MOE_TEST_PATIENCE).\n" + "\n".join(tails)
        )
    # Outside the `except`: the report is this message, not subprocess's traceback.
    pytest.fail(message)


def require_shared_data(*parts):
    """Path under ../shared/data; skip with a reason when absent, fail under CI."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared corpus {path} is missing")
        pytest.skip(f"shared corpus {path} is not present (a user's clone has no ../shared)")
    return path


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture
def opened_files(monkeypatch):
    """Records `(path, file)` for every file the corpus readers open, in order."""
    from keras_moe.pipelines.data import corpora

    opened = []
    real_open = corpora.open_binary

    def recording_open(path):
        f = real_open(path)
        opened.append((path, f))
        return f

    monkeypatch.setattr(corpora, "open_binary", recording_open)
    return opened
