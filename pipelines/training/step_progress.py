"""Training progress in steps, not Keras epochs: `StepProgress`.

The pipelines train for a budget of optimizer steps, one Keras "epoch"
being `train.steps_per_eval` steps; Keras's own progress output then reads
"Epoch 1/4000" for a 4-minute run. `StepProgress` prints instead, on
stderr through `keras_moe.pipelines.progress`:

```
[train] step 1/4000: first step (tracing and compiling) took 21.4 s
[train] step 200/4000 (5%) loss 5.1234, 12.3 steps/s, 25,190 tokens/s
[train] step 250/4000 evaluation: val_loss 4.9871, val_perplexity 146.5, val_bleu 3.21
```

with `fit(..., verbose=0)`. `train.verbose` keeps its meaning: 0 prints
nothing, 1 a line at most every `every` seconds and one per evaluation,
2 a line per evaluation only.
"""

import time

import keras

from keras_moe.pipelines import progress


def _value(value):
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


class StepProgress(keras.callbacks.Callback):
    """Prints the optimizer's step, loss and rates while `fit` runs, and each evaluation.

    Args:
        total_steps: the run's step budget (`train.steps`).
        verbose: 0 nothing, 1 throttled step lines and evaluations,
            2 evaluations only.
        every: the fewest seconds between two step lines.
        tokens_per_step: tokens in one step's batch, when fixed (adds
            tokens/s); or None.
        time_limit_minutes: the run's wall-time budget, when it has one
            (`train.time_limit_minutes`): lines then show the minutes spent
            of it, since the time, not `total_steps`, ends such a run.
        clock: the time source (tests pass their own).
        elapsed: optional; a function giving the run's training time in
            seconds, earlier sittings included (`TrainingClock.elapsed_seconds`),
            which is what the limit counts. Without it the minutes shown are
            this `fit`'s own.
    """

    def __init__(self, total_steps, verbose=1, every=10.0, tokens_per_step=None,
                 time_limit_minutes=None, clock=time.monotonic, elapsed=None):
        super().__init__()
        self.time_limit_minutes = time_limit_minutes
        self.elapsed = elapsed
        self.total_steps = total_steps
        self.verbose = verbose
        self.every = every
        self.tokens_per_step = tokens_per_step
        self.clock = clock
        self.lines = []

    def _emit(self, text):
        if self.time_limit_minutes:
            # A resumed run's limit counts its earlier sittings too.
            seconds = self.elapsed() if self.elapsed else self.clock() - self.start
            minutes = seconds / 60.0
            text += f" [{minutes:.1f} of {self.time_limit_minutes:g} min]"
        self.lines.append(text)
        progress.emit(f"[train] {text}")

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        self.start = self.last = self.clock()
        self.start_step = self._step()
        self.first = True

    def on_train_batch_end(self, batch, logs=None):
        if not self.verbose:
            return
        now = self.clock()
        step = self._step()
        if self.first:
            self.first = False
            self.first_done, self.first_step = now, step
            self._emit(f"step {step}/{self.total_steps}: first step (tracing and compiling) "
                       f"took {now - self.start:.1f} s")
            self.last = now
            return
        if self.verbose != 1 or now - self.last < self.every:
            return
        self.last = now
        rate = (step - self.first_step) / max(now - self.first_done, 1e-9)
        text = f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.0f}%)"
        if logs and "loss" in logs:
            text += f" loss {_value(logs['loss'])}"
        text += f", {rate:.2f} steps/s"
        if self.tokens_per_step:
            text += f", {rate * self.tokens_per_step:,.0f} tokens/s"
        self._emit(text)

    def on_epoch_end(self, epoch, logs=None):
        if not self.verbose:
            return
        values = ", ".join(f"{k} {_value(v)}" for k, v in sorted((logs or {}).items())
                           if k.startswith("val_") or k == "loss")
        self._emit(f"step {self._step()}/{self.total_steps} evaluation: {values} "
                   f"({self.clock() - self.start:.0f} s)")
