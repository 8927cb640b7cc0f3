"""Routing observability: per-expert load in TensorBoard and a collapse alarm.

A router can collapse onto a few experts while the training loss looks fine
(Shazeer et al. 2017, Section 4 and Table 6). `RoutingMonitor` sums each MoE
layer's routing over a window of training batches and writes what it saw to
TensorBoard: per-expert load and importance (histograms and sorted bar
charts) and the scalars that reveal a collapse. When a collapse persists it
raises an alarm (log warning, TensorBoard text, `RoutingMonitor.alarms`)
and can stop training.

The sums are taken inside the traced train step, from the `keras_moe.Routing`
of each training call: the callback registers a routing observer with every
MoE layer (`add_routing_observer`) that adds the batch's importance, counts,
routed and dropped pairs to `tf.Variable`s it owns; it reads them every
`every_n_steps` steps, resets them at the start of each window and removes
its observers when training ends. The statistics are those of
`keras_moe.statistics`, under the same names.
"""

import logging
import os
import warnings

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata

from keras_moe.alarms import CollapseThresholds, collapse_reasons
from keras_moe.hierarchical import HierarchicalMoE
from keras_moe.moe import SparseMoEBase
from keras_moe.statistics import summary, top_count  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

BAR_COLOR = (31, 119, 180)
MEAN_COLOR = (214, 39, 40)


def find_moe_layers(model):
    """Every `SparseMoEBase` layer of `model`, nested models and layers included.

    Walks, depth first in the order they were set: a model's `layers`, and
    for any other layer its public attributes holding layers (directly, or
    in lists, tuples and dicts), which is how custom layers keep their
    sublayers. A sublayer kept only under an `_`-prefixed attribute of a
    custom layer is not found.
    """
    found, seen = [], set()

    def visit(item):
        if isinstance(item, keras.layers.Layer):
            if id(item) in seen:
                return
            seen.add(id(item))
            if isinstance(item, SparseMoEBase):
                found.append(item)
            children = list(item.layers) if isinstance(item, keras.Model) else [
                value for name, value in vars(item).items() if not name.startswith("_")
            ]
        elif isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            return
        for child in children:
            visit(child)

    visit(model)
    return found


# A window's statistics are `keras_moe.statistics.summary` of its summed
# importance and counts (the name is kept for existing callers); `top_count`
# is imported from there for the same reason.
window_statistics = summary


def sorted_bar_chart(values, height=64, max_columns=256):
    """Experts' values sorted in decreasing order, drawn as bars: uint8 `[H, W, 3]`.

    Each of the `E` experts gets a bar of `max(1, max_columns // E)` pixels;
    with more than `max_columns` experts, consecutive ranks are averaged into
    `max_columns` bars. Bar heights are relative to the largest value; a red
    line marks the mean (every expert's fair share).

    Example:

    >>> sorted_bar_chart([1.0, 3.0, 2.0]).shape  # 3 bars of 256 // 3 pixels
    (64, 255, 3)
    """
    return bar_chart(np.sort(np.asarray(values, np.float64))[::-1], height, max_columns)


def bar_chart(values, height=64, max_columns=256):
    """Values drawn as bars in their given order (expert 0 leftmost): uint8 `[H, W, 3]`.

    As `sorted_bar_chart` without the sorting: bars of `max(1, max_columns
    // E)` pixels (consecutive values averaged when `E > max_columns`),
    heights `round(value / max * height)`, a red line at the mean.

    Example:

    >>> bar_chart([1.0, 0.0, 2.0], height=32, max_columns=30).shape  # 3 bars of 10 pixels
    (32, 30, 3)
    """
    values = np.asarray(values, np.float64)
    mean = values.mean() if values.size else 0.0
    if values.size > max_columns:
        values = np.array([chunk.mean() for chunk in np.array_split(values, max_columns)])
    bar_width = max(1, max_columns // max(1, values.size))
    image = np.full((height, values.size * bar_width, 3), 255, np.uint8)
    top = values.max() if values.size else 0.0
    if top <= 0:
        return image
    bar_heights = np.round(values / top * height).astype(int)
    rows = np.arange(height)[:, None]
    filled = rows >= height - np.repeat(bar_heights, bar_width)[None, :]
    image[filled] = BAR_COLOR
    mean_row = min(height - 1, max(0, height - int(round(mean / top * height))))
    image[mean_row, :] = MEAN_COLOR
    return image


def _per_expert_histogram(values):
    """Histogram-plugin tensor with one bucket `[i, i + 1)` per expert."""
    values = np.asarray(values, np.float64)
    edges = np.arange(values.shape[0], dtype=np.float64)
    return np.stack([edges, edges + 1.0, values], axis=1)


_UNSET = object()


def _summing_observer(acc):
    """A routing observer adding each training call's routing to the variables `acc`."""

    def observe(inputs, routing, training):
        if not training:
            return
        pairs = tf.reduce_sum(routing.counts)
        acc["importance"].assign_add(routing.importance)
        acc["counts"].assign_add(routing.counts)
        acc["pairs"].assign_add(pairs)
        acc["dropped_pairs"].assign_add(tf.cast(routing.dropped_fraction, tf.float32) * pairs)
        if "primary_counts" in acc:
            acc["primary_importance"].assign_add(routing.primary_importance)
            acc["primary_counts"].assign_add(routing.primary_counts)

    return observe


def _validate_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}. Received: {name}={value!r}")
    return value


class RoutingMonitor(keras.callbacks.Callback):
    """Write MoE routing statistics to TensorBoard and raise a collapse alarm.

    For every MoE layer of the model (`MoE`, `HierarchicalMoE`, found
    recursively through nested models and layers), the callback sums the
    routing of the last `window` training batches and, every `every_n_steps`
    steps, writes to `<log_dir>/routing` (a TensorBoard run of its own next
    to Keras' `train` and `validation`), under the layer's name:

    - `<layer>/load_per_expert`, `<layer>/importance_per_expert`: histograms
      with one bucket `[i, i + 1)` per expert `i`, whose height is the
      expert's token count (load) or summed gate values (importance, Eq. 6):
      the histogram is the distribution of the window's routing across
      experts.
    - `<layer>/load_sorted`, `<layer>/importance_sorted`: bar-chart images
      of the same vectors sorted in decreasing order; the red line is the
      mean.
    - scalars `<layer>/cv_importance`, `cv_load`, `max_mean_load` (Table 6),
      `zero_experts` (experts without a token in the window), `top_share`
      (share of routed pairs taken by the busiest `top_fraction` of the
      experts, at least one), `router_entropy` (entropy of the load
      distribution divided by `log E`: 1 is an even spread, 0 a single
      expert), `collapsed` (1 when a collapse criterion holds in this
      window), and `dropped_fraction` (pairs dropped by the capacity limit)
      for layers with a `capacity_factor`.
    - for `HierarchicalMoE`, the same for the first level (groups), from
      the primary gate: `<layer>/primary_<statistic>`.
    - `<layer>/collapse_alarm` (text) when an alarm is raised.

    A window is collapsed when any enabled criterion holds: the fraction of
    experts without a token (`zero_expert_fraction`) is above
    `zero_expert_fraction_threshold`, the max/mean load is
    above `max_mean_threshold`, or the top share is above
    `top_share_threshold` (checked at both levels of a hierarchical layer;
    the test is `keras_moe.alarms.collapse_reasons`, which the training
    pipelines also apply to clean routing on validation data). After `patience` collapsed windows in a row the callback raises one
    alarm for the layer: a warning on the `keras_moe.monitoring` logger, the
    text summary, an entry in `self.alarms` (a dict with `step`, `layer`,
    `reasons` and `statistics`), and, with `stop_on_collapse=True`,
    `model.stop_training = True` (the log directory is left as it is). The
    alarm is raised again only after a healthy window. `patience > 1` lets
    a run that starts unbalanced (e.g. a biased gate the balancing losses
    are correcting) recover before the alarm.

    Steps count training batches from `optimizer.iterations` at the start
    of `fit`, so a second `fit` continues the axis (and, on a first `fit`,
    the steps match the batch steps of Keras' `TensorBoard` callback).
    Batches after the last multiple of `every_n_steps` are not written.
    With `steps_per_execution > 1` windows start and end on execution
    boundaries. Only training calls are summed; validation batches are not
    counted. The sums come from each call's `keras_moe.Routing`, through a
    routing observer the callback adds to every MoE layer at the start of
    `fit` and removes at its end (see `SparseMoEBase.add_routing_observer`).

    Args:
        log_dir: directory of the run; summaries go to `<log_dir>/routing`.
        every_n_steps: int >= 1, write (and check for collapse) every this
            many training steps.
        window: int in `[1, every_n_steps]`, the number of most recent
            training batches summed for each write; None means
            `every_n_steps` (every batch is counted).
        zero_expert_fraction_threshold: float in [0, 1) or None (off).
        max_mean_threshold: float >= 1 or None (off). A load spread over
            `E` experts with `k` per token has max/mean at most `E / k`.
        top_share_threshold: float in [0, 1) or None (off).
        patience: int >= 1, consecutive collapsed windows before the alarm.
        stop_on_collapse: bool, stop training when an alarm is raised.
        top_fraction: float in (0, 1], the "busiest experts" of `top_share`.
        image_height: int >= 8, height in pixels of the bar-chart images.
        dead_fraction_threshold: deprecated name of
            `zero_expert_fraction_threshold`.

    Example:

    ```python
    inputs = keras.Input((16,))
    outputs = keras_moe.MoE(num_experts=8, expert_hidden_dim=32, k=2)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    monitor = keras_moe.RoutingMonitor("logs/run1", every_n_steps=100)
    model.fit(x, y, callbacks=[monitor, keras.callbacks.TensorBoard("logs/run1")])
    monitor.alarms  # [] unless a layer collapsed
    ```
    """

    def __init__(
        self,
        log_dir,
        every_n_steps=100,
        window=None,
        zero_expert_fraction_threshold=0.25,
        max_mean_threshold=3.0,
        top_share_threshold=0.5,
        patience=1,
        stop_on_collapse=False,
        top_fraction=0.1,
        image_height=64,
        dead_fraction_threshold=_UNSET,
    ):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
            raise ValueError(f"`log_dir` must be a non-empty path. Received: log_dir={log_dir!r}")
        self.log_dir = os.fspath(log_dir)
        self.every_n_steps = _validate_int("every_n_steps", every_n_steps, 1)
        if window is None:
            window = every_n_steps
        if _validate_int("window", window, 1) > every_n_steps:
            raise ValueError(
                f"`window` must be <= every_n_steps={every_n_steps}. Received: window={window}"
            )
        self.window = window
        threshold_name = "zero_expert_fraction_threshold"
        if dead_fraction_threshold is not _UNSET:
            warnings.warn(
                "RoutingMonitor(dead_fraction_threshold=...) is deprecated; use "
                "zero_expert_fraction_threshold=...", DeprecationWarning, stacklevel=2,
            )
            threshold_name = "dead_fraction_threshold"
            zero_expert_fraction_threshold = dead_fraction_threshold
        try:
            self.thresholds = CollapseThresholds(
                zero_expert_fraction_threshold, max_mean_threshold, top_share_threshold,
                top_fraction,
            )
        except ValueError as error:
            # The deprecated name is named in its errors.
            raise ValueError(str(error).replace("zero_expert_fraction_threshold",
                                                threshold_name)) from None
        self.zero_expert_fraction_threshold = self.thresholds.zero_expert_fraction_threshold
        self.max_mean_threshold = self.thresholds.max_mean_threshold
        self.top_share_threshold = self.thresholds.top_share_threshold
        self.patience = _validate_int("patience", patience, 1)
        self.stop_on_collapse = bool(stop_on_collapse)
        self.top_fraction = self.thresholds.top_fraction
        self.image_height = _validate_int("image_height", image_height, 8)
        self.alarms = []
        self._layers = {}  # tag prefix -> layer
        self._accumulators = {}  # tag prefix -> dict of tf.Variable
        self._observers = {}  # tag prefix -> (layer, the observer added to it)
        self._streaks = {}
        self._writer = None
        self._step = 0

    # --- Keras callback hooks ----------------------------------------------

    def on_train_begin(self, logs=None):
        layers = find_moe_layers(self.model)
        if not layers:
            raise ValueError(
                "RoutingMonitor found no MoE layer (keras_moe.MoE or HierarchicalMoE) "
                f"in the model {self.model.name!r}."
            )
        self._layers = {}
        for layer in layers:
            name, n = layer.name, 1
            while name in self._layers:
                n += 1
                name = f"{layer.name}_{n}"
            self._layers[name] = layer
        strategy = getattr(self.model, "distribute_strategy", None) or tf.distribute.get_strategy()
        with strategy.scope():
            self._accumulators = {
                name: self._make_accumulators(layer) for name, layer in self._layers.items()
            }
        self._detach()
        for name, layer in self._layers.items():
            observer = _summing_observer(self._accumulators[name])
            layer.add_routing_observer(observer)
            self._observers[name] = (layer, observer)
        # A train function traced before the observers were added would not
        # call them: build a fresh one (it is traced on its first call).
        self.model.make_train_function(force=True)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "routing"))
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        self._step = int(iterations.numpy()) if iterations is not None else self._step
        self._epoch_base = self._step
        self._next_write = self._step + self.every_n_steps
        self._window_open = False
        self._streaks = {name: 0 for name in self._layers}
        self._silent = set()  # layers already warned about for an empty window

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_base = self._step

    def on_train_batch_begin(self, batch, logs=None):
        first_step = self._epoch_base + batch + 1
        if not self._window_open and first_step > self._next_write - self.window:
            self._reset()
            self._window_open = True

    def on_train_batch_end(self, batch, logs=None):
        self._step = self._epoch_base + batch + 1
        if self._step < self._next_write:
            return
        while self._next_write <= self._step:
            self._next_write += self.every_n_steps
        self._window_open = False
        self._write_window(self._step)

    def on_train_end(self, logs=None):
        self._detach()
        # Later fits without this callback should not keep adding to the sums.
        self.model.make_train_function(force=True)
        if self._writer is not None:
            self._writer.flush()

    # --- internals -----------------------------------------------------------

    def _detach(self):
        for layer, observer in self._observers.values():
            if observer in layer.routing_observers:
                layer.remove_routing_observer(observer)
        self._observers = {}

    def _make_accumulators(self, layer):
        def variable(size, name):
            shape = [] if size is None else [size]
            return tf.Variable(
                tf.zeros(shape, tf.float32),
                trainable=False,
                name=f"{layer.name}_routing_{name}",
                # Each replica sums its own batches; reading adds them up.
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )

        acc = {
            "importance": variable(layer.num_experts, "importance"),
            "counts": variable(layer.num_experts, "counts"),
            "pairs": variable(None, "pairs"),
            "dropped_pairs": variable(None, "dropped_pairs"),
        }
        if isinstance(layer, HierarchicalMoE):
            acc["primary_importance"] = variable(layer.num_groups, "primary_importance")
            acc["primary_counts"] = variable(layer.num_groups, "primary_counts")
        return acc

    def _reset(self):
        for acc in self._accumulators.values():
            for v in acc.values():
                v.assign(tf.zeros_like(v))

    def _write_window(self, step):
        with self._writer.as_default(step=step):
            for name, layer in self._layers.items():
                acc = {key: v.read_value().numpy() for key, v in self._accumulators[name].items()}
                if acc["pairs"] <= 0:
                    if name in self._silent:
                        continue
                    self._silent.add(name)
                    logger.warning(
                        "RoutingMonitor: no routing was recorded for layer %r in the window "
                        "ending at step %d (every position masked).", name, step,
                    )
                    continue
                reasons, statistics = self._write_level(name, "", acc["importance"], acc["counts"])
                if layer.capacity_factor is not None:
                    dropped = float(acc["dropped_pairs"] / acc["pairs"])
                    tf.summary.scalar(f"{name}/dropped_fraction", dropped)
                    statistics["dropped_fraction"] = dropped
                if "primary_counts" in acc:
                    primary_reasons, primary_stats = self._write_level(
                        name, "primary_", acc["primary_importance"], acc["primary_counts"]
                    )
                    reasons += [f"primary level: {r}" for r in primary_reasons]
                    statistics.update({f"primary_{k}": v for k, v in primary_stats.items()})
                tf.summary.scalar(f"{name}/collapsed", float(bool(reasons)))
                self._update_alarm(name, step, reasons, statistics)
        self._writer.flush()

    def _write_level(self, name, prefix, importance, counts):
        stats = window_statistics(importance, counts, self.top_fraction)
        tag = f"{name}/{prefix}"
        for key in (
            "cv_importance", "cv_load", "max_mean_load", "zero_experts", "top_share",
            "router_entropy",
        ):
            tf.summary.scalar(tag + key, stats[key])
        for key, values in (("load", counts), ("importance", importance)):
            tf.summary.write(
                tag + f"{key}_per_expert",
                tf.constant(_per_expert_histogram(values)),
                metadata=histogram_metadata.create_summary_metadata(
                    display_name=tag + f"{key}_per_expert",
                    description=f"{key} of each expert i, as the bucket [i, i + 1)",
                ),
            )
            image = sorted_bar_chart(values, height=self.image_height)
            tf.summary.image(tag + f"{key}_sorted", image[None])
        return self._collapse_reasons(stats), stats

    def _collapse_reasons(self, stats):
        return collapse_reasons(stats, self.thresholds)

    def _update_alarm(self, name, step, reasons, statistics):
        if not reasons:
            self._streaks[name] = 0
            return
        self._streaks[name] += 1
        if self._streaks[name] != self.patience:
            return
        windows = f"{self.patience} windows" if self.patience > 1 else "the window"
        message = (
            f"Routing collapse in MoE layer {name!r} at step {step} "
            f"(over {windows} of {self.window} steps): " + "; ".join(reasons)
        )
        logger.warning(message)
        tf.summary.text(f"{name}/collapse_alarm", message)
        self.alarms.append(
            {"step": step, "layer": name, "reasons": list(reasons), "statistics": statistics}
        )
        if self.stop_on_collapse:
            self.model.stop_training = True
