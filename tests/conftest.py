"""Shared test setup: quiet TensorFlow, deterministic seeds, data locations."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
