"""`ExpertParallelOptimizer`: the explicit opt-in that trains expert-parallel layers.

An expert-parallel layer (`expert_parallel=True` under a `MirroredStrategy`
of `R` replicas, see `keras_moe.expert_parallel`) keeps `E / R` experts per
replica, and each replica's gradient of its shard already sums every
replica's tokens. A plain Keras optimizer would all-reduce that gradient
with the others, adding different experts' gradients together, and would
save only the first replica's share of the shard's moments.

The wrapper fixes both through public seams only:

- `apply` gives the wrapped optimizer every gradient that is not an expert
  shard's: its `apply` all-reduces them over the replicas and updates them
  as usual. The shards' gradients are applied, before that, in a
  `ReplicaContext.merge_call` through `StrategyExtended.update`, which runs
  the wrapped optimizer's `update_step` once per component with that
  replica's own gradient (the way Keras's TensorFlow optimizer updates a
  mirrored variable, minus the all-reduce).
- `save_own_variables` / `load_own_variables` write every slot variable of
  a shard whole (`[E, ...]`, the components in replica order) and give
  each replica its share back, so a file saved from `R` replicas reloads
  on one device, and the other way round. The file lists the wrapped
  optimizer's variables in its own order, as that optimizer would.
"""

import warnings

import keras
import tensorflow as tf

from keras_moe import _compat
from keras_moe import expert_parallel as ep


class _Held:
    """Holds the wrapped optimizer out of sight of Keras's saving and tracking.

    Keras's saver visits every optimizer attribute that is itself saveable
    and would call the wrapped optimizer's own `save_own_variables`, which
    writes each shard's first component only (and on loading would
    overwrite what the wrapper loaded). The wrapper saves those variables
    itself, so it keeps the optimizer (and the variable lists) in this plain
    object, which Keras neither saves nor tracks.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.variables = None  # what `build` was given


def _unsupported(optimizer):
    # What the wrapper cannot yet apply to expert shards the way the
    # wrapped optimizer applies it to the other variables.
    checks = {
        "global_clipnorm": optimizer.global_clipnorm,
        "weight_decay": optimizer.weight_decay,
        "use_ema": optimizer.use_ema,
        "gradient_accumulation_steps": optimizer.gradient_accumulation_steps,
    }
    return [(name, value) for name, value in checks.items() if value]


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertParallelOptimizer(keras.optimizers.Optimizer):
    """Wraps an optimizer so that it trains expert-parallel layers correctly.

    Use it for every model with `expert_parallel=True` MoE layers (the
    pipelines do when `train.expert_parallel` is set). Variables that are
    not expert shards (everything on one device, or without expert
    parallelism) are applied by the wrapped optimizer unchanged, so wrapping
    is harmless there.

    For an expert shard the wrapper:
    - skips the all-reduce over the replicas (its gradient already holds
      every replica's tokens) and updates each replica's component with its
      own gradient and its own slot variables;
    - unscales (`loss_scale_factor`), clips by value (`clipvalue`) or by
      norm (`clipnorm`) as the wrapped optimizer does; the norm is the
      whole variable's (all replicas' shards, one all-reduce), as on one
      device;
    - saves and loads the slot variables whole (`[E, ...]`).

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap. Its
            `global_clipnorm`, `weight_decay`, `use_ema` and
            `gradient_accumulation_steps` must be unset.
        name: optional name.

    Example:

    >>> optimizer = ExpertParallelOptimizer(keras.optimizers.Adam(1e-3, clipnorm=1.0))
    >>> round(float(optimizer.learning_rate), 6)
    0.001
    """

    def __init__(self, optimizer, name=None, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
            optimizer, ExpertParallelOptimizer
        ):
            raise ValueError(
                "`optimizer` must be a `keras.optimizers.Optimizer` (not already an "
                f"`ExpertParallelOptimizer`). Received: optimizer={optimizer!r}"
            )
        for argument, value in _unsupported(optimizer):
            raise ValueError(
                f"`ExpertParallelOptimizer` does not support the wrapped optimizer's "
                f"`{argument}` (not applied to expert shards). Received: {argument}={value!r}"
            )
        if kwargs:
            raise ValueError(
                "`ExpertParallelOptimizer` takes only `optimizer` and `name`; set the other "
                f"arguments on the wrapped optimizer. Received: {sorted(kwargs)}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self._held = _Held(optimizer)

    # --- what the wrapped optimizer answers -----------------------------

    @property
    def variables(self):
        return self._held.optimizer.variables

    @property
    def iterations(self):
        return self._held.optimizer.iterations

    @property
    def learning_rate(self):
        return self._held.optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self._held.optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self._held.optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self._held.optimizer.finalize_variable_values(var_list)

    # --- building and applying ------------------------------------------

    def build(self, var_list):
        """Builds the wrapped optimizer and marks the slot variables of expert shards."""
        held = self._held
        held.variables = list(var_list)
        if not held.optimizer.built:
            held.optimizer.build(held.variables)
        shards = [v for v in held.variables if ep.is_sharded(v)]
        if shards:
            self._mark_slots(shards)
        super().build(held.variables)

    def _mark_slots(self, shards):
        # Each optimizer variable belongs to the model variable whose
        # name prefix it carries; the longest prefix wins (`a_b` before `a`).
        prefixes = sorted(
            ((_compat.optimizer_variable_prefix(v), v) for v in self._held.variables),
            key=lambda pair: -len(pair[0]),
        )
        shard_ids = {id(v) for v in shards}
        for slot in self.variables:
            owner = next((v for p, v in prefixes if slot.name.startswith(p)), None)
            if owner is None or id(owner) not in shard_ids:
                continue
            if not slot.shape or slot.shape[0] != owner.shape[0]:
                raise ValueError(
                    f"Optimizer variable '{slot.path}' of expert shard '{owner.path}' is not "
                    f"split along the experts (shape {tuple(slot.shape)} for "
                    f"{tuple(owner.shape)}); `ExpertParallelOptimizer` cannot save it whole"
                )
            ep.mark_sharded(slot)

    def apply_gradients(self, grads_and_vars):
        pairs = list(grads_and_vars)
        self.apply([g for g, _ in pairs], [v for _, v in pairs])
        return self.iterations

    def apply(self, grads, trainable_variables=None):
        """Applies `grads`: expert shards per replica, the rest by the wrapped optimizer.

        Args:
            grads: list of gradients (None for a variable without one).
            trainable_variables: the matching `keras.Variable`s; None for
                the variables `build` was given.
        """
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "`trainable_variables` is needed before the optimizer is built. "
                    "Received: trainable_variables=None"
                )
            trainable_variables = self._held.variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
        grads = list(grads)
        inner = self._held.optimizer
        sharded = [ep.is_sharded(v) for v in trainable_variables]
        if not any(sharded):
            inner.apply(grads, trainable_variables)
            return
        pairs = [
            (g, v) for g, v, own in zip(grads, trainable_variables, sharded, strict=True)
            if own and g is not None
        ]
        rest = [
            (g, v) for g, v, own in zip(grads, trainable_variables, sharded, strict=True)
            if not own
        ]
        # Shards first: the update reads `iterations` (Adam's bias
        # correction, a schedule's step), which the wrapped `apply` advances.
        if pairs:
            self._apply_to_shards(pairs)
        if rest:
            inner.apply([g for g, _ in rest], [v for _, v in rest])
        else:
            inner.iterations.assign_add(1)

    def _apply_to_shards(self, pairs):
        context = tf.distribute.get_replica_context()
        if context is None:
            raise ValueError(
                "`ExpertParallelOptimizer.apply` must run inside the strategy's replicas "
                "(`model.fit`, or `strategy.run`) when the model has expert shards"
            )
        inner = self._held.optimizer
        grads = [tf.convert_to_tensor(g) for g, _ in pairs]
        if inner.loss_scale_factor is not None:
            grads = [g / inner.loss_scale_factor for g in grads]
        grads = self._clip(grads, context)
        learning_rate = inner.learning_rate

        def update(distribution, grads, variables, learning_rate):
            for grad, variable in zip(grads, variables, strict=True):
                distribution.extended.update(
                    variable,
                    lambda var, grad, lr: inner.update_step(grad, var, lr),
                    args=(grad, learning_rate),
                    group=False,
                )

        # `merge_call` turns each replica's gradient into one per-replica
        # value; `extended.update` gives component r replica r's gradient.
        context.merge_call(
            update, args=(grads, [v.value for _, v in pairs], learning_rate)
        )

    def _clip(self, grads, context):
        inner = self._held.optimizer
        if inner.clipnorm and inner.clipnorm > 0:
            # A shard's squared norm is its part of the whole variable's.
            squares = tf.stack([tf.reduce_sum(tf.square(g)) for g in grads])
            norms = tf.sqrt(context.all_reduce(tf.distribute.ReduceOp.SUM, squares))
            clip = tf.cast(inner.clipnorm, norms.dtype)
            return [
                g * tf.cast(clip / tf.maximum(norms[i], clip), g.dtype)
                for i, g in enumerate(grads)
            ]
        if inner.clipvalue and inner.clipvalue > 0:
            return [tf.clip_by_value(g, -inner.clipvalue, inner.clipvalue) for g in grads]
        return grads

    # --- saving -----------------------------------------------------------

    def save_own_variables(self, store):
        """Saves the wrapped optimizer's variables, expert shards' slots whole."""
        for i, variable in enumerate(self.variables):
            store[str(i)] = (
                ep.full_value(variable) if ep.is_sharded(variable)
                else keras.ops.convert_to_numpy(variable)
            )

    def load_own_variables(self, store):
        """Loads what `save_own_variables` wrote, each replica taking its share."""
        variables = self.variables
        if len(store.keys()) != len(variables):
            # As Keras's optimizers do: an optimizer not built yet (e.g. a
            # model whose weights are restored before training) skips loading.
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}': it has "
                f"{len(variables)} variables, the file lists {len(store.keys())}",
                stacklevel=2,
            )
            return
        for i, variable in enumerate(variables):
            if ep.is_sharded(variable):
                ep.assign_shards(variable, store[str(i)])
            else:
                variable.assign(store[str(i)])

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self._held.optimizer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(optimizer, **config)
