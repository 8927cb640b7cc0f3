"""`keras_moe.pipelines.training.multi_worker`: two worker processes train like one process on the global batch.

Workers are real processes (`multi_worker_script.py`) joined by `TF_CONFIG`
on 127.0.0.1 with ports picked at run time; each test kills its processes
(SIGKILL) in `finally`. The reference runs the same loop in this process
with the default strategy on the same global batches. The model routes with
`top_k` gating (no noise), so the runs compute the same function and differ
only by float summation order (2 half-batch sums and an all-reduce instead
of one sum).
"""

import functools
import json
import os
import re
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.pipelines.training import distribution, multi_worker
from tests.conftest import REPO_ROOT, patient
from tests.pipelines.training import multi_worker_script as script

SCRIPT = REPO_ROOT / "tests" / "pipelines" / "training" / "multi_worker_script.py"
WORKER_TIMEOUT = patient(60)  # a worker pair starts, trains and writes in 15-40 s


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index):
    return json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })


def launch(directory, tag, *args):
    """Start two workers; their logs go to `<directory>/<tag>-<i>.log`."""
    ports = free_ports(2)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = []
    for i in range(2):
        log = open(directory / f"{tag}-{i}.log", "w")
        processes.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), "--out", str(directory / f"{tag}-{i}.npz"), *args],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
            env={**env, "TF_CONFIG": tf_config(ports, i)},
        ))
        log.close()
    return processes


def kill(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def wait(processes, directory, tag):
    deadline = time.monotonic() + WORKER_TIMEOUT
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    logs = [(directory / f"{tag}-{i}.log").read_text()[-3000:] for i in range(2)]
    assert [p.returncode for p in processes] == [0, 0], logs


def results(directory, tag):
    """Each worker's final weights (a list) and history (a dict)."""
    out = []
    for i in range(2):
        with np.load(directory / f"{tag}-{i}.npz") as saved:
            weights = [saved[f"w{j}"] for j in range(len(saved.files) - 1)]
            out.append((weights, json.loads(str(saved["history"]))))
    return out


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def one_process(steps, optimizer):
    """The same `train` in this process, default strategy, same global batches."""
    strategy = distribution.make_strategy("default")
    model, opt = script.build(strategy, optimizer)
    history = multi_worker.train(
        model, opt, "mse", functools.partial(script.dataset_fn, steps), strategy=strategy,
        steps=steps, log_every=1,
    )
    return [v.numpy() for v in model.trainable_weights], history


def test_two_workers_match_one_process(tmp_path):
    steps = 6
    processes = launch(tmp_path, "run", "--steps", str(steps))
    try:
        # While the workers start: the loop in this process, and Keras's own
        # `fit` on the same batches, sample weights and balancing losses.
        reference, reference_history = one_process(steps, "sgd")
        model, optimizer = script.build(distribution.make_strategy("default"), "sgd")
        initial = [v.numpy() for v in model.trainable_weights]
        model.compile(optimizer, "mse")
        x, y, weight = script.data(steps)
        model.fit(x, y, sample_weight=weight, batch_size=script.GLOBAL_BATCH, shuffle=False,
                  verbose=0)
        wait(processes, tmp_path, "run")
    finally:
        kill(processes)
    (weights0, history0), (weights1, history1) = results(tmp_path, "run")
    assert history0["replicas"] == history1["replicas"] == 2
    assert history0["step"] == list(range(1, steps + 1))
    # The loop's objective is `fit`'s (measured 0.0), training moved the
    # weights (by 0.99), both workers hold the same weights (0.0), and these
    # are one process's on the global batches (2.4e-7).
    assert max_diff(reference, [v.numpy() for v in model.trainable_weights]) < 1e-6
    assert max_diff(reference, initial) > 0.1
    print(f"loop vs fit {max_diff(reference, [v.numpy() for v in model.trainable_weights]):.2g}, "
          f"moved {max_diff(reference, initial):.2g}, workers {max_diff(weights0, weights1):.2g}, "
          f"workers vs one process {max_diff(weights0, reference):.2g}")
    assert max_diff(weights0, weights1) < 1e-7
    assert max_diff(weights0, reference) < 1e-5
    np.testing.assert_allclose(history0["loss"], reference_history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history0["aux_loss"], reference_history["aux_loss"], rtol=1e-5)
    assert min(history0["aux_loss"]) > 0.01  # the balancing losses were in the objective


def latest_step(directory):
    path = tf.train.latest_checkpoint(str(directory))
    return int(path.rsplit("-", 1)[1]) if path else 0


@pytest.mark.slow  # 93 s: two worker pairs, step delays and a missed-heartbeat abort
def test_killed_worker_resumes_from_checkpoint(tmp_path):
    steps, every = 24, 4
    checkpoints = tmp_path / "checkpoints"
    args = ["--steps", str(steps), "--optimizer", "adam", "--checkpoint-dir", str(checkpoints),
            "--checkpoint-every", str(every)]
    processes = launch(tmp_path, "first", *args, "--step-delay", "0.3")
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT
        while latest_step(checkpoints) < 2 * every:
            assert time.monotonic() < deadline, "no checkpoint in time"
            assert all(p.poll() is None for p in processes), (tmp_path / "first-0.log").read_text()
            time.sleep(0.2)
        processes[1].kill()
        # The survivor does not hang: TensorFlow's coordination service
        # misses the dead peer's heartbeats and aborts its all-reduce
        # (measured: exits 9-18 s later).
        killed = time.monotonic()
        processes[0].wait(timeout=patient(18))
        survivor_seconds = time.monotonic() - killed
        assert processes[0].returncode != 0
        assert "unhealthy" in (tmp_path / "first-0.log").read_text()
    finally:
        kill(processes)
    killed_at = latest_step(checkpoints)
    assert 2 * every <= killed_at < steps
    print(f"survivor exited {survivor_seconds:.1f} s after its peer was killed")

    processes = launch(tmp_path, "second", *args)
    try:
        reference, _ = one_process(steps, "adam")
        wait(processes, tmp_path, "second")
    finally:
        kill(processes)
    (weights0, history0), (weights1, history1) = results(tmp_path, "second")
    for history in (history0, history1):
        # Resumed from the step counter in the checkpoint, ran to the end.
        assert history["start_step"] == killed_at
        assert history["step"] == list(range(killed_at + 1, steps + 1))
    assert latest_step(checkpoints) == steps
    assert not list(checkpoints.glob("workertemp_*"))
    # Restored weights, Adam moments and data position: the interrupted run
    # ends where an uninterrupted one does (measured 1.2e-7).
    print(f"resumed at {killed_at}: workers {max_diff(weights0, weights1):.2g}, "
          f"vs uninterrupted one process {max_diff(weights0, reference):.2g}")
    assert max_diff(weights0, weights1) < 1e-7
    assert max_diff(weights0, reference) < 1e-5


BAD_CONFIGS = {
    "malformed JSON": ('{"cluster": {"worker": ["127.0.0.1:1"]', "not valid JSON"),
    "no cluster.worker": ('{"cluster": {}, "task": {"type": "worker", "index": 0}}',
                          "no `cluster.worker`"),
    "no task": ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "no `task`"),
    "index out of range": (
        '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},'
        ' "task": {"type": "worker", "index": 2}}',
        "task index 2 is out of range: the cluster has 2 'worker'",
    ),
    "bad address": ('{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker",'
                    ' "index": 0}}', "must be 'host:port'"),
    "parameter servers": ('{"cluster": {"worker": ["h:1"], "ps": ["h:2"]}, "task": '
                          '{"type": "worker", "index": 0}}', "not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_tf_config_is_named(case, monkeypatch):
    text, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        distribution.make_strategy("multi_worker", tf_config=text)
    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribution.make_strategy("multi_worker")


def test_missing_tf_config_and_unknown_name(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG is not set"):
        distribution.make_strategy("multi_worker")
    # One list of strategy names (`train.strategy`): "tpu" is one of them
    # (made by `make_strategy`, failing fast without a TPU); others are named.
    with pytest.raises(ValueError, match="strategy='gpu'"):
        distribution.make_strategy("gpu")


def test_unreachable_peer_fails_in_bounded_time():
    # Nobody listens on the peer's port: the preflight gives up after
    # `connect_timeout`, before TensorFlow (which would wait forever) starts.
    ports = free_ports(2)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"127.0.0.1:{ports[1]}'\] .* not reachable within 2 s"):
        distribution.make_strategy("multi_worker", tf_config=tf_config(ports, 0), connect_timeout=2)
    assert time.monotonic() - started < 30
    # This task's own port held by another process: named too.
    with socket.create_server(("", ports[0])):
        with pytest.raises(RuntimeError, match=f"Cannot listen on port {ports[0]}"):
            distribution.make_strategy("multi_worker", tf_config=tf_config(ports, 0))


def test_train_checks_scope_and_data():
    model, optimizer = script.build(distribution.make_strategy("default"))
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0"])
    with pytest.raises(ValueError, match="created under `strategy.scope"):
        multi_worker.train(model, optimizer, "mse", None, strategy=mirrored, steps=1)
    with pytest.raises(ValueError, match="no weights yet"):
        multi_worker.train(keras.Sequential([keras.layers.Dense(1)]), optimizer, "mse", None,
                           strategy=tf.distribute.get_strategy(), steps=1)

    def two_batches(context):
        return script.dataset_fn(2, context).take(2)

    with pytest.raises(ValueError, match="ran out at step 3 of 5"):
        multi_worker.train(model, optimizer, "mse", two_batches,
                           strategy=tf.distribute.get_strategy(), steps=5)
