"""Multi-worker training: a custom loop around `strategy.run`, checkpointed and resumable.

Keras 3's `fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras issue 20585: a `PerReplica` value reaches a tensor
conversion). What does work there is TensorFlow's own machinery:
`strategy.run`, distributed datasets and the optimizer's all-reduce of
gradients. `train` is built from those parts only, for any Keras model (MoE
layers included) under any strategy (tested: the default strategy and two
worker processes).

`multi_worker_strategy` builds the strategy (the pipelines' one
`make_strategy`, in `keras_moe.pipelines.training.distribution`, calls it for
`train.strategy: multi_worker`). It reads and checks `TF_CONFIG` first and waits (with a deadline) until every peer
accepts a TCP connection: TensorFlow itself waits for absent peers without a
time limit (`ensure_initialized` blocks; the coordination service's
`cluster_register_timeout_in_ms` did not end the wait on TensorFlow 2.21).
A peer that dies later is caught by TensorFlow: the coordination service
misses its heartbeats and aborts the survivors' collectives (9-18 s here).
"""

import copy
import dataclasses
import json
import os
import socket
import time

import keras
import tensorflow as tf

from keras_moe.validation import check_int


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """A checked `TF_CONFIG`: the cluster's addresses and this process's task."""

    cluster: dict
    task_type: str
    task_index: int
    rpc_layer: str = "grpc"

    @property
    def address(self):
        return self.cluster[self.task_type][self.task_index]

    @property
    def peers(self):
        """Every address of the cluster except this task's own."""
        everyone = [a for job in sorted(self.cluster) for a in self.cluster[job]]
        return [a for a in everyone if a != self.address]


def _split_address(address, where):
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"TF_CONFIG: {where} must be 'host:port'. Received: {address!r}")
    return host.strip("[]"), int(port)


def parse_tf_config(tf_config=None):
    """Check a `TF_CONFIG` (JSON text, a dict, or None for `$TF_CONFIG`).

    Only the jobs `MultiWorkerMirroredStrategy` trains with are accepted:
    `worker` (required, one `"host:port"` per worker) and an optional single
    `chief`. Every problem raises a `ValueError` that names it.

    Returns:
        A `ClusterConfig`.

    Example:

    >>> config = parse_tf_config(
    ...     '{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},'
    ...     ' "task": {"type": "worker", "index": 1}}')
    >>> config.address, config.peers
    ('10.0.0.2:2222', ['10.0.0.1:2222'])
    >>> parse_tf_config('{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 1}}')
    Traceback (most recent call last):
    ...
    ValueError: TF_CONFIG: task index 1 is out of range: the cluster has 1 'worker' address(es) (indices 0..0).
    """
    if tf_config is None:
        tf_config = os.environ.get("TF_CONFIG")
        if not tf_config:
            raise ValueError("TF_CONFIG is not set: multi-worker training needs the cluster.")
    if isinstance(tf_config, str):
        try:
            tf_config = json.loads(tf_config)
        except json.JSONDecodeError as error:
            raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from None
    if not isinstance(tf_config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object. Received: {tf_config!r}")
    cluster = tf_config.get("cluster")
    if not isinstance(cluster, dict) or not cluster.get("worker"):
        raise ValueError(
            "TF_CONFIG has no `cluster.worker`: give a non-empty list of 'host:port' "
            f"addresses. Received: cluster={cluster!r}"
        )
    unknown = sorted(set(cluster) - {"worker", "chief"})
    if unknown:
        raise ValueError(
            f"TF_CONFIG: jobs {unknown} are not supported; multi-worker training "
            "uses `worker` and an optional single `chief`."
        )
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG: at most one chief. Received: {cluster['chief']}")
    addresses = []
    for job, job_addresses in cluster.items():
        if not isinstance(job_addresses, list):
            raise ValueError(f"TF_CONFIG: `cluster.{job}` must be a list of 'host:port'.")
        for i, address in enumerate(job_addresses):
            _split_address(str(address), f"cluster.{job}[{i}]")
            addresses.append(address)
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"TF_CONFIG: an address is listed twice. Received: {addresses}")
    task = tf_config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(
            "TF_CONFIG has no `task` with a `type` and an `index` (which of the "
            f"cluster's processes this one is). Received: task={task!r}"
        )
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG: task type {task_type!r} is not a job of the cluster {sorted(cluster)}."
        )
    size = len(cluster[task_type])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise ValueError(
            f"TF_CONFIG: task index {index!r} is out of range: the cluster has {size} "
            f"{task_type!r} address(es) (indices 0..{size - 1})."
        )
    rpc_layer = tf_config.get("rpc_layer") or "grpc"
    return ClusterConfig({j: list(a) for j, a in cluster.items()}, task_type, index, rpc_layer)


def wait_for_peers(config, timeout):
    """Listen on this task's port and connect to every peer's, for `timeout` seconds.

    Each process listens before it probes, so two processes started in any
    order both see each other; the listener closes before TensorFlow binds
    the port, and a peer that already moved on answers from its TensorFlow
    server. Raises `RuntimeError` naming the peers not reached in time, or
    the port this task cannot listen on (an old run still holding it).
    """
    _, port = _split_address(config.address, "this task's address")
    try:
        listener = socket.create_server(("", port), backlog=64)
    except OSError as error:
        raise RuntimeError(
            f"Cannot listen on port {port} of this task's address {config.address}: "
            f"{error}. Is an old worker still running?"
        ) from None
    pending = list(config.peers)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            for peer in list(pending):
                try:
                    with socket.create_connection(_split_address(peer, "a peer"), timeout=1.0):
                        pending.remove(peer)
                except OSError:
                    pass
            if pending and time.monotonic() > deadline:
                raise RuntimeError(
                    f"Peers {pending} of task {config.task_type}:{config.task_index} were not "
                    f"reachable within {timeout:g} s. Start every process of the TF_CONFIG "
                    "cluster, and check the addresses and firewalls."
                )
            if pending:
                time.sleep(0.2)
    finally:
        listener.close()


def multi_worker_strategy(tf_config=None, *, connect_timeout=60.0, collective_timeout=None):
    """`MultiWorkerMirroredStrategy` with RING collectives, after checking the cluster.

    Reads `tf_config` (JSON text or dict; `$TF_CONFIG` when None), checks it
    (`parse_tf_config`) and waits for the peers (`wait_for_peers`). Create it
    first thing in the program: TensorFlow refuses to configure collectives
    once it has run any operation. The pipelines reach it through
    `distribution.make_strategy("multi_worker")`.

    Args:
        tf_config: the cluster.
        connect_timeout: seconds to wait for the peers before `RuntimeError`.
        collective_timeout: seconds after which a collective (all-reduce)
            fails with `DeadlineExceededError` instead of waiting for a dead
            peer; None waits forever. TensorFlow spawns a thread per
            collective to enforce it, so keep it for debugging.
    """
    config = parse_tf_config(tf_config)
    wait_for_peers(config, connect_timeout)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(config.cluster), task_type=config.task_type,
        task_id=config.task_index, rpc_layer=config.rpc_layer,
    )
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=collective_timeout,
    )
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )


class _PerElementLoss(keras.losses.Loss):
    """A loss function as an unreduced `keras.losses.Loss` (sample weights, masks)."""

    def __init__(self, fn):
        super().__init__(reduction="none", name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _unreduced_loss(loss):
    """A `keras.losses.Loss` returning per-element, sample-weighted values."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        loss = copy.copy(loss)
        loss.reduction = "none"
        return loss
    if callable(loss):
        return _PerElementLoss(loss)
    raise ValueError(
        "`loss_fn` must be a loss name, a `keras.losses.Loss` or a function "
        f"(y_true, y_pred) -> per-example losses. Received: loss_fn={loss!r}"
    )


def _check_created_in(strategy, model, optimizer):
    if not model.weights:
        raise ValueError(
            "The model has no weights yet: build it (an `Input`, or one call) inside "
            "`strategy.scope()` before `train`."
        )
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(f"`optimizer` must be a Keras optimizer. Received: {optimizer!r}")
    named = [(v.path, v) for v in model.weights] + [("the optimizer", optimizer.iterations)]
    for what, variable in named:
        # A Keras variable's `.value` is the `tf.Variable` the strategy made.
        if not strategy.extended.variable_created_in_scope(variable.value):
            raise ValueError(
                f"The model and the optimizer must be created under `strategy.scope()` of "
                f"the strategy given to `train`; {what} was not (create both inside "
                "`with strategy.scope():`)."
            )


def train(
    model, optimizer, loss_fn, dataset_fn, *, strategy, steps, checkpoint_dir=None,
    checkpoint_every=100, log_every=10, on_log=None,
):
    """Train `model` for `steps` steps under `strategy`, resuming from `checkpoint_dir`.

    Each replica computes `sum(weighted per-element losses) / N` with `N`
    the number of loss elements in the *global* batch (an all-reduced
    count), plus `sum(model.losses) / replicas`; the optimizer sums the
    replicas' gradients (one all-reduce), which gives the gradient one
    process computes on the global batch, with Keras's default
    `"sum_over_batch_size"` reduction. The MoE balancing losses with
    `balancing_scope="global"` are all-reduced inside the layers, so they are
    the global batch's losses too.

    With `checkpoint_dir`, `model`, `optimizer` and the step counter are
    saved every `checkpoint_every` steps and at the end by the chief (other
    workers write to `<dir>/workertemp_<id>` and delete it, as TensorFlow's
    multi-worker guide prescribes; every worker must read `checkpoint_dir`).
    A (re)started run restores the latest checkpoint and skips the batches
    already used, so a deterministic `dataset_fn` makes a resumed run end
    where an uninterrupted one does.

    Args:
        model: a built Keras model, created under `strategy.scope()`.
        optimizer: a Keras optimizer created under `strategy.scope()`;
            None takes `model.optimizer` (a compiled model).
        loss_fn: a loss name, `keras.losses.Loss` or function
            `(y_true, y_pred) -> per-example losses`; None takes `model.loss`.
        dataset_fn: `fn(tf.distribute.InputContext) -> tf.data.Dataset` of
            `(x, y)` or `(x, y, sample_weight)` batches of
            `context.get_per_replica_batch_size(global_batch)` rows, for this
            worker (`shard` by `context.input_pipeline_id`). It must yield at
            least `steps` batches per replica (use `repeat()`): a worker that
            runs dry stops, and the others then fail too.
        strategy: a `tf.distribute.Strategy` (see `distribution.make_strategy`).
        steps: int, the step to stop at (counted from the first run).
        checkpoint_dir: optional directory, shared by all workers.
        checkpoint_every: int, steps between checkpoints.
        log_every: int, steps between entries of the history.
        on_log: optional `fn(step, logs)` called with each history entry.

    Returns:
        A dict: `step`, `loss` (the global batch's data loss), `aux_loss`
        (`model.losses` summed: balancing losses, regularizers) as lists,
        one entry per `log_every` steps and the last step, and
        `start_step`, the step restored from the checkpoint (0 if none).
    """
    check_int("steps", steps)
    check_int("checkpoint_every", checkpoint_every)
    check_int("log_every", log_every)
    optimizer = model.optimizer if optimizer is None else optimizer
    loss_fn = getattr(model, "loss", None) if loss_fn is None else loss_fn
    if optimizer is None:
        raise ValueError("No optimizer: pass one or compile the model with one.")
    _check_created_in(strategy, model, optimizer)
    loss_object = _unreduced_loss(loss_fn)
    variables = model.trainable_variables
    with strategy.scope():
        if not optimizer.built:
            optimizer.build(variables)
        step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_counter)
    manager = None
    if checkpoint_dir:
        latest = tf.train.latest_checkpoint(checkpoint_dir)
        if latest:
            checkpoint.restore(latest).assert_existing_objects_matched()
        write_dir = checkpoint_dir
        if not strategy.extended.should_checkpoint:
            write_dir = os.path.join(checkpoint_dir, f"workertemp_{strategy.cluster_resolver.task_id}")
            if tf.io.gfile.exists(write_dir):
                tf.io.gfile.rmtree(write_dir)
        manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=2)
    start_step = int(step_counter.numpy())

    def worker_dataset(context):
        dataset = dataset_fn(context)
        # Each step takes one batch per replica of this worker.
        per_step = context.num_replicas_in_sync // context.num_input_pipelines
        return dataset.skip(start_step * per_step) if start_step else dataset

    iterator = iter(strategy.distribute_datasets_from_function(worker_dataset))
    replicas = strategy.num_replicas_in_sync

    def replica_step(batch):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        context = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            values = tf.cast(loss_object(y, y_pred, sample_weight), tf.float32)
            with tape.stop_recording():
                count = context.all_reduce("SUM", tf.cast(tf.size(values), tf.float32))
            data_loss = tf.math.divide_no_nan(tf.reduce_sum(values), count)
            added = [tf.cast(a, tf.float32) for a in model.losses]
            aux_loss = tf.add_n(added) / replicas if added else tf.zeros([])
            scaled = optimizer.scale_loss(data_loss + aux_loss)
        grads = tape.gradient(scaled, variables)
        # Keras's optimizer all-reduces (sums) the gradients in replica context.
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return data_loss, aux_loss

    @tf.function
    def train_step(iterator):
        data_loss, aux_loss = strategy.run(replica_step, args=(next(iterator),))
        return strategy.reduce("SUM", data_loss, None), strategy.reduce("SUM", aux_loss, None)

    history = {"step": [], "loss": [], "aux_loss": [], "start_step": start_step}
    for step in range(start_step + 1, steps + 1):
        try:
            data_loss, aux_loss = train_step(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            raise ValueError(
                f"The dataset ran out at step {step} of {steps}: make `dataset_fn`'s "
                "dataset `repeat()`."
            ) from None
        step_counter.assign(step)
        if step % log_every == 0 or step == steps:
            logs = {"step": step, "loss": float(data_loss), "aux_loss": float(aux_loss)}
            for key in ("step", "loss", "aux_loss"):
                history[key].append(logs[key])
            if on_log is not None:
                on_log(step, logs)
        if manager is not None and (step % checkpoint_every == 0 or step == steps):
            # Every worker saves (the save may need all of them); only the
            # chief's copy is kept.
            manager.save(checkpoint_number=step)
            if not strategy.extended.should_checkpoint:
                tf.io.gfile.rmtree(manager.directory)
    return history
