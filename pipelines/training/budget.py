"""Training tokens seen, and the one-pass budget `train.max_tokens`.

A data-rich run is measured against the data it has seen, not its steps:
the paper's Figure 2 (left) and Table 8 plot quality against training
tokens. `TokenBudget` counts them and, with a budget, ends the run:

- **What counts.** A training token is one target position of a training
  batch, i.e. one vocabulary entry (a word, or a WordPiece piece, `<eos>`
  included) the model is trained to predict. In the language models'
  `stream` mode every batch holds `batch_size * seq_len` of them, so after
  optimizer step `s` the run has seen `s * tokens_per_step` tokens. (Only
  the very last batch of a pass that runs out of data can hold padding;
  it is counted whole.) The count comes from the optimizer's step, so a
  resumed or continued run goes on from the right number.
- **The budget.** With `max_tokens`, training stops after the step during
  which the count reaches it: `ceil(max_tokens / tokens_per_step)` steps.
  `budget_reached` is then True.
- **One pass.** A budgeted run reads its training data once (the dataset is
  built without `repeat`). When the data ends before the budget, the epoch
  comes up short of `steps_per_epoch` batches without any callback having
  stopped training; `TokenBudget` then stops the run (Keras would otherwise
  start the dataset again at the next epoch), prints so, and sets
  `data_exhausted` and, since the one pass is done, `budget_reached` too.

The contract other callbacks and checks read: after `fit`, a run that ended
before `train.steps` ended legitimately when a callback's `budget_reached`
is True; `data_exhausted` says that the end of the data, not the count,
ended it; `stopped_at_step` is the optimizer step at which it stopped.

At every evaluation (epoch end) it adds `tokens` to the logs (so
`history.csv` gets a `tokens` column) and, with `log_dir`, writes every
`val_*` value under the tag `tokens/val_*` with the token count as the
TensorBoard step, into `log_dir/by_tokens`: a TensorBoard run of its own,
because the step axis of `train/` and `validation/` is the optimizer's step
(`summaries.RunSummaries`), and a second writer in one directory would
hide curves from a live TensorBoard. In `runs.run_callbacks` it runs after the
validation callback (whose values it reads) and before the history logger.
"""

import math
import os

import keras
import tensorflow as tf


def budget_steps(max_tokens, tokens_per_step):
    """Optimizer steps a budget of `max_tokens` takes: `ceil(max_tokens / tokens_per_step)`.

    Example:

    >>> budget_steps(60_000_000, 5000)
    12000
    >>> budget_steps(10, 4)
    3
    """
    return math.ceil(max_tokens / tokens_per_step)


# The TensorBoard run (subdirectory of the log directory) whose step is tokens seen.
BY_TOKENS = "by_tokens"


class TokenBudget(keras.callbacks.Callback):
    """Counts training tokens, logs them, and stops at a one-pass budget or at the end of the data.

    Args:
        tokens_per_step: int, training tokens per optimizer step (stream
            mode: `batch_size * seq_len`).
        max_tokens: optional int, the budget; None counts without stopping.
        steps_per_epoch: optional int, the batches `fit` asks of each epoch
            (`train.steps_per_eval`); an epoch that nobody stopped and that
            got fewer means the data ran out. None: not checked.
        log_dir: optional TensorBoard directory; `tokens/val_*` summaries go
            into its `by_tokens` subdirectory.

    Attributes:
        tokens: training tokens seen so far (resumed steps included).
        budget_reached: True once the budget (or, for a one-pass budget,
            the data) is used up.
        data_exhausted: True when the training data ended first.
        stopped_at_step: the optimizer step at which this callback stopped
            training, or None.

    Example:

    >>> budget = TokenBudget(tokens_per_step=2000, max_tokens=5000)
    >>> budget.budget_steps
    3
    """

    def __init__(self, tokens_per_step, max_tokens=None, steps_per_epoch=None, log_dir=None):
        super().__init__()
        for name, value in (("tokens_per_step", tokens_per_step), ("max_tokens", max_tokens),
                            ("steps_per_epoch", steps_per_epoch)):
            if value is None and name != "tokens_per_step":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"`{name}` must be an integer >= 1. Received: {name}={value!r}"
                )
        self.tokens_per_step = tokens_per_step
        self.max_tokens = max_tokens
        self.steps_per_epoch = steps_per_epoch
        self.log_dir = log_dir
        self.budget_steps = None if max_tokens is None else budget_steps(
            max_tokens, tokens_per_step
        )
        self.step = None
        self.budget_reached = False
        self.data_exhausted = False
        self.stopped_at_step = None
        self._epoch_batches = 0
        self._writer = None

    @property
    def tokens(self):
        """Training tokens seen so far."""
        return (self.step or 0) * self.tokens_per_step

    def _read_step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        # The step is read at the first batch, not here: a resumed run's
        # backup may be restored by a callback that runs after this one.
        self.step = None
        self.budget_reached = self.data_exhausted = False
        self.stopped_at_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.step is None:
            # Read once, then counted, so that no batch waits on the variable.
            self.step = self._read_step()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self._epoch_batches += 1
        if self.budget_steps is not None and self.step >= self.budget_steps:
            self._stop(budget=True)

    def on_epoch_end(self, epoch, logs=None):
        if self.step is None:  # an epoch without a batch
            self.step = self._read_step()
        short = self.steps_per_epoch is not None and self._epoch_batches < self.steps_per_epoch
        if short and not self.model.stop_training:
            # No callback stopped it: the dataset ran out of batches.
            self.data_exhausted = True
            # The step that found no batch still advanced the optimizer's
            # step counter (Keras 3 on TensorFlow: its failed `train_function`
            # leaves weights and moments alone, but the `iterations` increment
            # lands); put it back to the steps trained.
            if self._read_step() != self.step:
                self.model.optimizer.iterations.assign(self.step)
            self._stop(budget=self.max_tokens is not None)
            budget = f", before train.max_tokens={self.max_tokens:,}" if self.max_tokens else ""
            print(f"The training data ended after {self.tokens:,} training tokens "
                  f"(step {self.step}){budget}: one pass done, training stops.")
        if logs is not None:
            logs["tokens"] = self.tokens
            self._summaries(logs)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _stop(self, budget):
        if not self.model.stop_training:
            self.stopped_at_step = self.step
        self.model.stop_training = True
        self.budget_reached = self.budget_reached or budget

    def _summaries(self, logs):
        values = {k: v for k, v in logs.items() if k.startswith("val_")}
        if self.log_dir is None or not values:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, BY_TOKENS))
        with self._writer.as_default():
            for key, value in sorted(values.items()):
                tf.summary.scalar(f"tokens/{key}", float(value), step=self.tokens)
        self._writer.flush()


class StepLimit(keras.callbacks.Callback):
    """Stops training once the optimizer has made `steps` steps.

    `fit` runs whole evaluation rounds, so without it a run continued from
    a step inside a round (one its time limit stopped) would overrun
    `train.steps` by the part of a round it had already done. Its stop is
    a budget reached (`budget_reached`, see `guards.check_finished`).
    """

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.step = None
        self.budget_reached = False

    def on_train_begin(self, logs=None):
        self.step = None
        self.budget_reached = False

    def on_train_batch_begin(self, batch, logs=None):
        if self.step is None:
            # Read once, after the backup is restored; then counted here, so
            # that no batch waits on a read of the optimizer's variable.
            self.step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step >= self.steps:
            self.model.stop_training = True
            self.budget_reached = True
