"""Guards that keep a failed training run from looking like a finished one.

A run that diverged, or stopped before its budget because its data ran
out, must not exit 0 with a `model.keras`, nor leave a backup that a
restart resumes into the same failure. The pieces:

- `TrainingFailed`: the error of a run that trained but failed; its
  `exit_code` is what `keras-moe` exits with: 3 for `TrainingDiverged`
  (a non-finite loss, weight or validation value), 4 for
  `TrainingIncomplete` (fewer steps than `train.steps`, and no callback
  says a budget stopped it). Other bad input exits 2, as before.
- `DivergenceGuard`: the callback that checks the training loss after
  every batch, and the weights and the `val_*` values at every
  evaluation, before the backup and the checkpoints of that step are
  written (`runs.run_callbacks` puts it after the validation and before
  them); it raises `TrainingDiverged` naming the step and what diverged.
  It also notes an evaluation round the data ran out in.
- `check_finished`: after `fit`, `TrainingIncomplete` unless the run made
  `train.steps` steps or a callback stopped it on purpose.
- `check_model_arguments`: construct a preset's model without creating
  its weights, so that every argument its constructors refuse fails
  before the run directory is touched.

A callback that ends training on purpose before `train.steps` (a time
limit: `runs.TrainingClock`; a token budget) says so by setting its
public attribute `budget_reached = True` when it sets
`model.stop_training`; `budget.StepLimit` sets it too. Keras's
`EarlyStopping` is recognised by its `stopped_epoch`.
"""

import math

import keras

from keras_moe.pipelines.training import backup, distribution

EXIT_DIVERGED = 3
EXIT_INCOMPLETE = 4
BUDGET_ATTRIBUTE = "budget_reached"


class TrainingFailed(RuntimeError):
    """A run that trained but failed; `keras-moe` exits with `exit_code`."""

    exit_code = 1


class TrainingDiverged(TrainingFailed):
    """A non-finite loss, weight or validation value; nothing was saved from it."""

    exit_code = EXIT_DIVERGED


class TrainingIncomplete(TrainingFailed):
    """Training stopped before `train.steps` without a budget that stopped it."""

    exit_code = EXIT_INCOMPLETE


def _finite(value):
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number (a string): nothing to check


def non_finite_weight(model):
    """The path of `model`'s first floating-point weight holding a NaN or inf, or None.

    Reduced on the device (one boolean per variable comes back), so the
    check costs no copy of the weights. An expert-parallel model is
    checked through its one-device copy (`distribution.evaluation_model`).
    """
    for variable in distribution.evaluation_model(model).weights:
        if "float" not in str(variable.dtype):
            continue
        if not bool(keras.ops.all(keras.ops.isfinite(variable.value))):
            return variable.path
    return None


def check_weights(model, step):
    """`TrainingDiverged` naming the weight when `model` holds a non-finite one."""
    path = non_finite_weight(model)
    if path is not None:
        raise TrainingDiverged(
            f"training diverged at step {step}: the weight {path} is not finite (NaN or inf); "
            "nothing was saved from this step"
        )


class DivergenceGuard(keras.callbacks.Callback):
    """Stops a diverged run before anything is saved from it.

    After every batch the training `loss` is checked, at every evaluation
    (an epoch's end) the `loss` and every `val_*` value in the logs and
    every weight of the model: one that is NaN or infinite raises
    `TrainingDiverged`, naming the step and the value or weight. Put it
    after the validation callback (whose values it reads) and before the
    backup and the checkpoints (which are then never written from a
    diverged step: the last good ones stay, and a restart resumes them).

    An evaluation round that ends with fewer steps than `fit`'s
    `steps_per_epoch` while nothing asked training to stop means the
    training data ran out (Keras warns "Your input ran out of data" and
    would start the data again at the next round): the guard stops
    training there and notes it in `ran_out`, which `check_finished`
    reports.

    Args:
        run_dir: optional run directory; its backup's step is named in the
            error (the state a restart resumes).
    """

    def __init__(self, run_dir=None):
        super().__init__()
        self.run_dir = run_dir
        self.ran_out = None  # (step, steps done in the round, steps asked)
        self.round_start = None

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def _diverged(self, step, what):
        kept = "nothing was saved from this step"
        if self.run_dir is not None:
            try:
                saved = backup.read_backup(self.run_dir)
            except ValueError:
                saved = None
            if saved is not None and saved["step"] is not None:
                kept += f"; the backup of step {saved['step']} is kept"
        raise TrainingDiverged(f"training diverged at step {step}: {what}; {kept}")

    def on_train_begin(self, logs=None):
        self.ran_out = None

    def on_epoch_begin(self, epoch, logs=None):
        self.round_start = self._step()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not _finite(loss):
            self._diverged(self._step(), f"the training loss is {float(loss)}")

    def on_epoch_end(self, epoch, logs=None):
        step = self._step()
        logs = logs or {}
        if not _finite(logs.get("loss", 0.0)):
            self._diverged(step, f"the training loss is {float(logs['loss'])}")
        # The weights before the validation values: they are the cause.
        path = non_finite_weight(self.model)
        if path is not None:
            self._diverged(step, f"the weight {path} is not finite (NaN or inf)")
        for name, value in sorted(logs.items()):
            if name.startswith("val_") and not _finite(value):
                self._diverged(step, f"{name} is {float(value)}")
        asked = (self.params or {}).get("steps")
        done = step - self.round_start
        if asked and done < asked:
            # A short round: the data ran out, unless a budget (the step
            # limit, the time limit, a token budget) stopped it, which
            # `check_finished` asks the callbacks. A token budget that saw
            # the data end has already stopped training and put back the
            # step Keras counts for the batch that found no data.
            self.ran_out = (step, done, asked)
            self.model.stop_training = True


def stopped_on_purpose(callbacks):
    """The first callback that reports a budget stopped training, or None."""
    for callback in callbacks:
        if getattr(callback, BUDGET_ATTRIBUTE, False):
            return callback
        if isinstance(callback, keras.callbacks.EarlyStopping) and callback.stopped_epoch:
            return callback
    return None


def check_finished(steps, asked, callbacks):
    """`TrainingIncomplete` unless `steps >= asked` or a callback stopped training on purpose.

    Args:
        steps: the optimizer's steps after `fit`.
        asked: `train.steps`.
        callbacks: the run's callbacks (see `stopped_on_purpose`; a
            `DivergenceGuard` among them tells when the data ran out).

    Example:

    >>> check_finished(10, 10, [])  # the budget done: nothing to say
    >>> class TimeLimit:  # any stopping callback that says it reached a budget
    ...     budget_reached = True
    >>> check_finished(3, 10, [TimeLimit()])
    >>> try:
    ...     check_finished(3, 10, [])
    ... except TrainingIncomplete as error:
    ...     print(error.exit_code, str(error)[:44])
    4 training stopped at step 3 of train.steps=10
    """
    if steps >= asked or stopped_on_purpose(callbacks) is not None:
        return
    guards = [c for c in callbacks if isinstance(c, DivergenceGuard) and c.ran_out]
    if guards:
        at, done, per_round = guards[0].ran_out
        why = (
            f"the training data ran out (the evaluation round ending at step {at} got "
            f"{done} of its {per_round} batches: Keras's 'Your input ran out of data'); give more "
            "training text, or smaller batches"
        )
    else:
        why = "training was stopped before its budget, and no callback reports a budget reached"
    raise TrainingIncomplete(
        f"training stopped at step {steps} of train.steps={asked}: {why}; the run is not "
        "finished, so no model.keras was written"
    )


def check_model_arguments(registry, preset, vocab_size, **overrides):
    """Construct the preset's model with `overrides`, its weights not created.

    Every argument the model's and its layers' constructors refuse (`k`
    above `num_experts`, `num_experts=0`, an unknown gating) raises here,
    cheaply: the weights of even the largest preset are never allocated
    (the model's `build` is skipped).

    Args:
        registry: a `models.registry.PresetRegistry` (`presets.REGISTRY`,
            `translation_presets.REGISTRY`).
        preset: the preset's name.
        vocab_size: the vocabulary size to construct with.
        **overrides: the model's keyword arguments that replace the preset's.

    Raises:
        ValueError: naming the argument and the value received.
    """
    kwargs = registry.get(preset)
    registry.check(overrides, "override")
    kwargs.update(overrides)
    model_class = registry.model_class
    # A subclass whose `build` does nothing: a model that builds its
    # weights in its constructor (`TranslationModel`) then allocates none.
    unbuilt = type(f"Unbuilt{model_class.__name__}", (model_class,),
                   {"build": lambda self, input_shape=None: None})
    unbuilt(vocab_size, **kwargs)
