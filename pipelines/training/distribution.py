"""How the training pipelines run under `tf.distribute`: `train.strategy` and `--expert-parallel`.

Shared by `lm_train` and `translate_train`:

- `split_cpu`: `--cpu-devices N`, the CPU as N logical devices, so that
  `mirrored` has N replicas on a machine without GPUs;
- `make_strategy`: the one place a strategy is made by name (the names are
  `lm_config.STRATEGIES`, the values of `train.strategy`); `multi_worker`
  checks `TF_CONFIG` and waits for its peers
  (`keras_moe.pipelines.training.multi_worker.multi_worker_strategy`), `tpu`
  fails fast when no TPU answers;
- `expert_parallel_optimizer`: the pipelines' optimizer, wrapped in
  `keras_moe.ExpertParallelOptimizer` when `train.expert_parallel` is set;
- `check_model`: what a strategy needs of the built model (`tpu`: a static
  `capacity_factor` in every MoE layer; expert-parallel layers: a wrapped
  optimizer);
- `evaluation_model`: the model the validation callbacks and the final
  evaluation call. An expert-parallel layer runs only inside the strategy's
  replicas, and the evaluations call the model directly (decoding loops,
  compiled forward passes), so an expert-parallel model is evaluated
  through a one-device copy: the same model built outside the strategy,
  its weights refreshed from the replicas (all experts gathered) before
  every evaluation. Copying weights in memory is cheaper than saving and
  reloading a `.keras` file, and gives the model that file reloads to;
- `multi_worker_dataset`, `barrier`, `LossLogger`: the pieces of the
  `multi_worker` path, which trains with `keras_moe.pipelines.training.multi_worker.train`
  (Keras `fit` fails under `MultiWorkerMirroredStrategy`, keras-team/keras
  issue 20585).
"""

import dataclasses
import os
import time

import keras
import tensorflow as tf

from keras_moe import expert_parallel as ep
from keras_moe.expert_optimizer import ExpertParallelOptimizer
from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines.training import multi_worker
from keras_moe.pipelines.training.config import check_train_keys
from keras_moe.pipelines.training.rundir import RunDir


def split_cpu(count):
    """Make the CPU `count` logical devices (`--cpu-devices`); before any TensorFlow op.

    Raises:
        ValueError: `count` < 1, or TensorFlow already started (the split
            must come first in the process).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`cpu_devices` must be an integer >= 1. Received: cpu_devices={count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as error:
        raise ValueError(
            f"--cpu-devices {count}: TensorFlow has already started in this process ({error}); "
            "split the CPU before anything else runs"
        ) from None


def _tpu_strategy():
    # `TPU_NAME` names the TPU; "local" on a TPU VM, whose TPU the resolver
    # only finds when given that name as its argument (an environment
    # variable of "local" would be looked up as a Cloud TPU called "local").
    name = os.environ.get("TPU_NAME") or None
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise ValueError(f"no TPU found: {error}") from None
    return tf.distribute.TPUStrategy(resolver)


def make_strategy(
    name="default", *, cpu_devices=None, tf_config=None, connect_timeout=60.0,
    collective_timeout=None,
):
    """The strategy `train.strategy` names; create it first thing in the process.

    Args:
        name: one of `lm_config.STRATEGIES`. `"default"` is the current
            (default) strategy; `"mirrored"` is `MirroredStrategy` over every
            local GPU, or without GPUs over every logical CPU device (see
            `cpu_devices`); `"multi_worker"` checks `tf_config` and waits up
            to `connect_timeout` seconds for the peers
            (`keras_moe.pipelines.training.multi_worker.multi_worker_strategy`);
            `"tpu"` resolves, connects to and initializes the TPU system.
        cpu_devices: optional int, split the CPU first (`split_cpu`).
        tf_config: `"multi_worker"` only: the cluster (JSON text or dict;
            `$TF_CONFIG` when None).
        connect_timeout: seconds, for `"multi_worker"`.
        collective_timeout: `"multi_worker"` only: seconds after which a
            collective fails instead of waiting for a dead peer (None: wait).

    Raises:
        ValueError: an unknown name (`Received: strategy=...`), a bad
            `TF_CONFIG`, or `"tpu"` with no TPU reachable (`no TPU found: ...`).
        RuntimeError: `"multi_worker"` peers not reachable in time.
    """
    check_train_keys(name, False)
    if cpu_devices is not None:
        split_cpu(cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "tpu":
        return _tpu_strategy()
    return multi_worker.multi_worker_strategy(
        tf_config, connect_timeout=connect_timeout, collective_timeout=collective_timeout
    )


def expert_parallel_optimizer(optimizer, expert_parallel):
    """`optimizer` as the pipelines train with it: wrapped when `expert_parallel`.

    An expert-parallel model needs `keras_moe.ExpertParallelOptimizer` (its
    expert shards' gradients must not be all-reduced); any other model
    keeps the optimizer as it is, and its saved files with it.

    Args:
        optimizer: a `keras.optimizers.Optimizer`.
        expert_parallel: bool, `train.expert_parallel`.
    """
    return ExpertParallelOptimizer(optimizer) if expert_parallel else optimizer


def is_chief(strategy):
    """Whether this process writes the run (always, except non-chief multi-worker tasks)."""
    return bool(strategy.extended.should_checkpoint)


def task_id(strategy):
    """This process's task index in the cluster (0 outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", None) or 0)


def check_model(model, strategy_name):
    """ValueError when the built model cannot run under `strategy_name`.

    A compiled model with expert-parallel layers needs its optimizer wrapped
    in `keras_moe.ExpertParallelOptimizer` (a plain one would sum different
    experts' gradients). TPUs compile with XLA, which needs static shapes:
    the dropless dispatch's per-expert sizes are data dependent, the
    capacity dispatch's are not.
    """
    optimizer = getattr(model, "optimizer", None)
    if (
        optimizer is not None and is_expert_parallel(model)
        and not isinstance(optimizer, ExpertParallelOptimizer)
    ):
        raise ValueError(
            "The model has expert-parallel layers: its optimizer must be wrapped in "
            "`keras_moe.ExpertParallelOptimizer` (see `expert_parallel_optimizer`). "
            f"Received: optimizer={type(optimizer).__name__}"
        )
    if strategy_name != "tpu":
        return
    for layer in find_moe_layers(model):
        if layer.capacity_factor is None:
            raise ValueError(
                f"strategy 'tpu' needs static shapes, but MoE layer '{layer.name}' has "
                "capacity_factor=None (dropless dispatch): set `model.capacity_factor`, "
                "e.g. --set model.capacity_factor=1.25"
            )


def is_expert_parallel(model):
    """Whether any weight of `model` is split over replicas (`keras_moe.expert_parallel`)."""
    return any(ep.is_sharded(variable) for variable in model.weights)


def copy_weights(source, target):
    """Assign `source`'s weights to `target`, all experts of every expert-parallel weight."""
    for mine, theirs in zip(source.weights, target.weights, strict=True):
        value = ep.full_value(mine) if ep.is_sharded(mine) else keras.ops.convert_to_numpy(mine)
        if tuple(value.shape) != tuple(theirs.shape):
            raise ValueError(
                f"Cannot copy {mine.path} {tuple(value.shape)} into {theirs.path} "
                f"{tuple(theirs.shape)}"
            )
        theirs.assign(value)


def one_device_copy(model):
    """`model` rebuilt from its config outside any strategy (all experts on one device).

    Call it outside `strategy.scope()`; the weights are copied by
    `evaluation_model`.
    """
    return model.__class__.from_config(model.get_config())


def evaluation_model(model):
    """The model to evaluate: `model` itself, or its refreshed one-device copy.

    For an expert-parallel model (and one trained under `multi_worker`) the
    copy made by `attach_evaluation_copy` gets `model`'s current weights
    and is returned; any other model is returned as it is.
    """
    copy = model.__dict__.get("_keras_moe_evaluation_copy")
    if copy is None:
        return model
    copy_weights(model, copy)
    return copy


def attach_evaluation_copy(model, strategy_name):
    """Keep a one-device copy on `model` when its evaluations need one.

    Needed for an expert-parallel model (its layers run only inside the
    replicas) and under `multi_worker` (the chief evaluates alone, without
    the other workers' collectives). Call outside `strategy.scope()`.
    """
    if is_expert_parallel(model) or strategy_name == "multi_worker":
        # Kept outside Keras's attribute tracking: not a sublayer of `model`.
        model.__dict__["_keras_moe_evaluation_copy"] = one_device_copy(model)


def multi_worker_dataset(make_dataset, data_config, context, batch_keys):
    """One worker's training batches for `keras_moe.pipelines.training.multi_worker.train`.

    `make_dataset(data_config)` is the pipeline's own training dataset
    (seeded: the same batches on every run, so a restart skips to where it
    stopped). It is built with the per-replica batch (`batch_keys`: the
    `data_config` fields that size a batch, divided by the replica count),
    and worker `i` of `n` keeps batches `i, i + n, ...` (`Dataset.shard`).

    Args:
        make_dataset: `fn(data_config) -> tf.data.Dataset` of batches, repeated.
        data_config: the run's `data` section.
        context: the `tf.distribute.InputContext` of this worker.
        batch_keys: names of `data_config`'s batch-size fields.
    """
    sizes = {key: context.get_per_replica_batch_size(getattr(data_config, key))
             for key in batch_keys}
    dataset = make_dataset(dataclasses.replace(data_config, **sizes))
    return dataset.shard(context.num_input_pipelines, context.input_pipeline_id)


def barrier(strategy):
    """Wait until every worker gets here (one all-reduce of a scalar).

    The chief evaluates and saves after training while the others wait
    here: a worker that exits early would leave the chief's cluster
    (coordination service) without a peer.
    """

    @tf.function
    def all_reduce():
        value = strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("SUM", 1.0))
        return strategy.reduce("SUM", value, axis=None)

    return float(all_reduce())


class LossLogger:
    """`on_log` of `multi_worker.train`: loss and balancing loss as TensorBoard scalars.

    Writes `loss`, `aux_loss` and `perplexity` (`exp(loss)`) per logged
    step into `log_dir` (the chief's `run_dir/tensorboard/train`).
    """

    def __init__(self, log_dir):
        self.writer = tf.summary.create_file_writer(log_dir)

    def __call__(self, step, logs):
        with self.writer.as_default(step=step):
            tf.summary.scalar("loss", logs["loss"])
            tf.summary.scalar("aux_loss", logs["aux_loss"])
            tf.summary.scalar("perplexity", min(float(tf.exp(logs["loss"])), 1e30))
        self.writer.flush()


def train_multi_worker(config, run_dir, strategy, build, make_dataset, batch_keys, resumed):
    """The training part of a pipeline's `multi_worker` run, shared by both pipelines.

    Seeds every worker alike (`train.seed`) and calls `build()` under the
    strategy's scope for the pipeline's model and optimizer; on the chief
    the model gets its one-device evaluation copy (`attach_evaluation_copy`).
    Then trains with `keras_moe.pipelines.training.multi_worker.train` on `multi_worker_dataset`
    batches, checkpointing every `train.steps_per_eval` steps into
    `checkpoint_dir(run_dir)` and logging to TensorBoard from the chief;
    then the chief saves `model.keras`.

    Returns:
        `(model, results)`: the trained model and, on the chief, the run's
        results so far (`preset`, `resumed`, `steps`, `start_step`,
        `train_seconds`, `strategy`, `replicas`, `history`); on the other
        workers `{"chief": False, "task", "steps"}`.
    """
    t = config.train
    chief = is_chief(strategy)
    keras.utils.set_random_seed(t.seed)
    with strategy.scope():
        model, optimizer = build()
    if chief:
        attach_evaluation_copy(model, t.strategy)

    def dataset_fn(context):
        return multi_worker_dataset(make_dataset, config.data, context, batch_keys)

    run = RunDir.wrap(run_dir)
    on_log = LossLogger(run.tensorboard_train_dir) if chief else None
    start = time.time()
    history = multi_worker.train(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        dataset_fn, strategy=strategy, steps=t.steps,
        checkpoint_dir=checkpoint_dir(run_dir), checkpoint_every=t.steps_per_eval,
        log_every=t.monitor_every_n_steps, on_log=on_log,
    )
    train_seconds = time.time() - start
    steps = int(optimizer.iterations.numpy())
    if not chief:
        # What a non-chief worker returns (it writes no results.json).
        return model, {"chief": False, "task": task_id(strategy), "steps": steps}
    model.save(run.model_file)
    start_step = history.pop("start_step")
    return model, {
        "preset": config.model.preset,
        "resumed": resumed or start_step > 0,
        "steps": steps,
        "start_step": start_step,
        "train_seconds": round(train_seconds, 1),
        "strategy": t.strategy,
        "replicas": int(strategy.num_replicas_in_sync),
        "history": history,
    }


def checkpoint_dir(run_dir):
    """Where `multi_worker.train` keeps its checkpoints (shared by every worker)."""
    return RunDir.wrap(run_dir).multi_worker_checkpoints_dir
