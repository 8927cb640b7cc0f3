"""Clean-routing monitoring: the collapse alarm on inference routing of validation data.

In training the gates add noise (Eq. 4 of Shazeer et al. 2017), and the
noise spreads the load: a run whose training routing shows max/mean load
about 1.2 can route 20% of the validation tokens to one expert at
inference (`training=False`), with other experts left empty. The training
curves (`<layer>_cv_load`, ...) and `RoutingMonitor`, which watch training
routing, then look fine. So at every evaluation the pipelines' validation
callbacks also take the routing of the validation pass they already make
(clean, inference mode), and `validation_logs` turns it into

- epoch-log values `val_<layer>_<statistic>` for every MoE layer (encoder
  and decoder), `<statistic>` one of `LOGGED`: the statistics of
  `keras_moe.statistics.summary` of the validation set's summed routing,
  and `collapsed` (1 when the alarm's criteria hold). `history.csv` gets a
  column for each and TensorBoard a `validation/epoch_<layer>_<statistic>`
  curve over the training run's `train/epoch_<layer>_<statistic>`;
- one warning per collapsed layer (logger `keras_moe.pipelines.training.
  routing_checks`, printed on stderr), naming the layer, the numbers and
  the thresholds: the test is `keras_moe.alarms.collapse_reasons` with the
  thresholds `RoutingMonitor` uses by default.

`evaluation_check` does the same for `keras-moe lm evaluate` and
`translate evaluate`, next to the run's last training values.
"""

import csv
import dataclasses
import logging
import os

from keras_moe import alarms
from keras_moe.pipelines.training.rundir import RunDir

logger = logging.getLogger(__name__)

# The statistics logged per layer, as `val_<layer>_<name>`.
LOGGED = ("cv_importance", "cv_load", "max_mean_load", "zero_expert_fraction", "top_share")
# The training routing values (Keras metrics `<layer>_<name>`) shown beside them.
TRAINING = ("cv_importance", "cv_load", "max_mean_load", "zero_expert_fraction")


def validation_logs(routing, step=None, thresholds=alarms.DEFAULT_THRESHOLDS):
    """Epoch-log values of the clean routing of a validation pass; warns per collapsed layer.

    Args:
        routing: `{layer: RoutingStatistics.result() entry}` of the pass
            (inference mode), e.g. `evaluate_lines(..., routing=True)["routing"]`.
        step: the training step, named in the warnings (None: not named).
        thresholds: a `keras_moe.alarms.CollapseThresholds`.

    Returns:
        dict `val_<layer>_<statistic>` -> float, for `LOGGED` and `collapsed`.
    """
    checked = alarms.check_routing(routing, thresholds)
    logs = {}
    for name, entry in checked.items():
        for key in LOGGED:
            logs[f"val_{name}_{key}"] = float(entry["statistics"][key])
        logs[f"val_{name}_collapsed"] = float(bool(entry["reasons"]))
    where = "clean (inference) routing on the validation data"
    if step is not None:
        where += f" at step {step}"
    for line in alarms.warning_lines(checked, where):
        logger.warning(line)
    return logs


def last_training_values(run_dir, layers):
    """`{layer: {statistic: value}}` of the run's last `history.csv` row (training routing)."""
    path = RunDir.wrap(run_dir).history_file
    if not os.path.exists(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    last, out = rows[-1], {}
    for layer in layers:
        values = {}
        for key in TRAINING:
            try:
                values[key] = float(last.get(f"{layer}_{key}", ""))
            except ValueError:
                continue
        if values:
            out[layer] = {"step": _int(last.get("step")), **values}
    return out


def _int(value):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def evaluation_check(routing, run_dir=None, data=None, thresholds=alarms.DEFAULT_THRESHOLDS):
    """The `routing_check` entry of an evaluation: the alarm on its clean routing.

    Warns (one line per collapsed layer, naming `data`) like
    `validation_logs`.

    Returns:
        dict with `thresholds` (the alarm's) and `layers`: per MoE layer,
        `collapsed`, `reasons`, the `LOGGED` statistics of the evaluated
        data's clean routing, and `training` (the run's last training
        values of the same statistics, from `history.csv`, when there are).
    """
    checked = alarms.check_routing(routing, thresholds)
    training = last_training_values(run_dir, checked) if run_dir is not None else {}
    layers = {}
    for name, entry in checked.items():
        layers[name] = {
            "collapsed": bool(entry["reasons"]),
            "reasons": entry["reasons"],
            **{key: entry["statistics"][key] for key in LOGGED},
        }
        if name in training:
            layers[name]["training"] = training[name]
    where = "clean (inference) routing" + (f" on {data}" if data is not None else "")
    for line in alarms.warning_lines(checked, where):
        logger.warning(line)
    return {"thresholds": dataclasses.asdict(thresholds), "layers": layers}


def training_step(model):
    """The optimizer's step of a model being trained, or None (no model, no optimizer yet)."""
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    return None if iterations is None else int(iterations.numpy())
