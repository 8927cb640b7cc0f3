"""`RoutingMonitor` scalars, read back through a real TensorBoard server.

`monitoring_test.py` reads the event files with TensorBoard's Python reader;
this test goes one step further and asks what a browser would see: it starts
the `tensorboard` server on the log directory (a subprocess bound to
127.0.0.1 on a free port) and reads the routing scalars through its HTTP
data API (`/data/runs`, `/data/plugin/scalars/tags`,
`/data/plugin/scalars/scalars`).

The expected values are recomputed independently with NumPy, as in
`monitoring_test.py`: the model is frozen (SGD with learning rate 0), the
gate is deterministic (`gating="top_k"`, no noise) and the batches are not
shuffled, so the routing seen during `fit` is the routing of
`layer(x_batch, training=False, return_routing=True)`.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

try:
    import tensorboard.main  # noqa: F401  (the module the server is started from)
except ImportError as err:  # pragma: no cover - tensorboard is a dependency
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        pytest.fail(f"CI is set but tensorboard cannot be imported: {err}", pytrace=False)
    pytest.skip(
        f"the tensorboard package cannot be imported ({err}); it is a dependency of "
        "keras-moe (pip install -e .)",
        allow_module_level=True,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_moe  # noqa: E402

# `top_k` gating has no noise, so `W_noise` gets no gradient; Keras says so.
pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")

INPUT_DIM = 6
E, K = 16, 2
BATCH = 8
NUM_BATCHES = 6  # one epoch: 6 steps
EVERY = 2  # writes at steps 2, 4, 6, each summing its 2 steps (window = every_n_steps)
WRITE_STEPS = [2, 4, 6]
HOST = "127.0.0.1"
# Hang guards only: the server starts in 5-15 s and loads new events within a
# few 1 s reload intervals; a busy machine may take several times as long.
START_TIMEOUT_S = 120.0
LOAD_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0

# Talk to 127.0.0.1 directly, even when the environment sets an HTTP proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _get_json(port, path, **params):
    url = f"http://{HOST}:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with _OPENER.open(url, timeout=REQUEST_TIMEOUT_S) as response:
        assert response.status == 200, (url, response.status)
        return json.loads(response.read().decode("utf-8"))


def _expected_scalars(windows):
    """Per write: CV (population std / mean) and max / mean of the load, zero experts."""
    expected = {"cv_load": [], "max_mean_load": [], "zero_experts": []}
    for indices in windows:
        counts = np.zeros(E)
        for idx in indices:
            counts += np.bincount(idx.ravel(), minlength=E)
        assert counts.sum() == EVERY * BATCH * K
        mean = counts.mean()
        expected["cv_load"].append(counts.std() / mean)
        expected["max_mean_load"].append(counts.max() / mean)
        expected["zero_experts"].append(float(np.sum(counts == 0)))
    return expected


def _train_and_expect(log_dir):
    inputs = keras.Input((INPUT_DIM,))
    moe = keras_moe.MoE(num_experts=E, expert_hidden_dim=4, k=K, gating="top_k", seed=1, name="moe")
    model = keras.Model(inputs, moe(inputs))
    # Gates start at zero (every logit ties); random gates spread the load unevenly.
    w_gate = np.random.default_rng(3).standard_normal(moe.gating.w_gate.shape)
    moe.gating.w_gate.assign(w_gate.astype("float32"))
    x = np.random.default_rng(4).standard_normal((BATCH * NUM_BATCHES, INPUT_DIM))
    x = x.astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    monitor = keras_moe.RoutingMonitor(log_dir, every_n_steps=EVERY)
    model.fit(
        x, np.zeros_like(x), batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
        callbacks=[monitor],
    )
    indices = []
    for b in range(NUM_BATCHES):
        _, routing = moe(x[b * BATCH : (b + 1) * BATCH], training=False, return_routing=True)
        indices.append(routing.expert_indices.numpy())
    # Step s (1-based) trained on batch s - 1; the write at step s sums steps s - 1 and s.
    return _expected_scalars([indices[s - EVERY : s] for s in WRITE_STEPS])


def _start_tensorboard(log_dir, port, log_file):
    command = [
        sys.executable, "-m", "tensorboard.main",
        "--logdir", log_dir,
        "--host", HOST,
        "--port", str(port),
        "--reload_interval", "1",
        "--load_fast=false",  # the Rust data server is not installed
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )


def _wait_until_serving(process, port, log_path):
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"tensorboard exited with code {process.returncode} before serving:\n"
                + log_path.read_text(errors="replace")[-4000:]
            )
        try:
            return _get_json(port, "/data/runs")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"tensorboard did not answer on {HOST}:{port} within {START_TIMEOUT_S:.0f} s:\n"
                + log_path.read_text(errors="replace")[-4000:]
            )
        time.sleep(0.25)


def _wait_for_scalars(port, tags):
    """`{tag: [[wall_time, step, value], ...]}` once every tag has every write step."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    rows = {}
    while True:
        for tag in tags:
            try:
                rows[tag] = _get_json(port, "/data/plugin/scalars/scalars", run="routing", tag=tag)
            except urllib.error.HTTPError:  # run or tag not loaded yet
                rows[tag] = []
        if all([row[1] for row in rows[tag]] == WRITE_STEPS for tag in tags):
            return rows
        if time.monotonic() > deadline:
            got = {tag: [row[1] for row in rows[tag]] for tag in tags}
            pytest.fail(f"scalars never reached steps {WRITE_STEPS}; the server has {got}")
        time.sleep(0.5)


def test_routing_scalars_through_the_tensorboard_http_api(tmp_path):
    log_dir = str(tmp_path / "logs")
    time_before = time.time()
    expected = _train_and_expect(log_dir)
    time_after = time.time()
    # The data is not trivial: unequal loads, experts without tokens, and windows that
    # differ (a value read at the wrong step would not match).
    assert min(expected["cv_load"]) > 0 and min(expected["zero_experts"]) > 0
    assert len(set(expected["cv_load"])) == len(WRITE_STEPS)
    assert len(set(expected["zero_experts"])) > 1

    tags = [f"moe/{name}" for name in expected]
    port = _free_port()
    log_path = tmp_path / "tensorboard.log"
    with open(log_path, "wb") as log_file:
        process = _start_tensorboard(log_dir, port, log_file)
        try:
            _wait_until_serving(process, port, log_path)
            rows = _wait_for_scalars(port, tags)
            # The runs and tags a browser lists. Asked after the scalars arrived,
            # since the server loads the log directory in the background.
            assert "routing" in _get_json(port, "/data/runs")
            listed = _get_json(port, "/data/plugin/scalars/tags")
            assert set(tags) <= set(listed["routing"]), sorted(listed["routing"])
            assert "moe/router_entropy" in listed["routing"]
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    for tag, name in zip(tags, expected, strict=True):
        wall_times, steps, values = zip(*rows[tag], strict=True)
        assert list(steps) == WRITE_STEPS, tag
        assert all(time_before <= t <= time_after for t in wall_times), (tag, wall_times)
        np.testing.assert_allclose(values, expected[name], rtol=1e-5, atol=1e-6, err_msg=tag)
