"""One run directory of the one-pass Gutenberg experiment, read for its tables.

`read_run(runs_root, name)` gathers what `benchmarks/gutenberg_results.py`
publishes about one run that `keras-moe lm train` wrote: the validation
curve against training tokens (`history.csv`), its value at each budget
(measured, or interpolated between the evaluations around it), the
whole-valid result (`results.json`, or the last `results-step-N.json` of a
run continued from a time limit), the training clock (`elapsed.json`),
the model's experts and cost (its preset, with the config's overrides),
the routing statistics of the last validation pass, and the Wikipedia
perplexity (`wikipedia.json`). The experiment's names and budgets are
defined here once; the results script compares the runs.
"""

import glob
import math
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_MOE_QUIET_START", "1")  # no C++ start-up lines (keras_moe/_startup.py)

from keras_moe.models import presets  # noqa: E402
from keras_moe.pipelines import compare  # noqa: E402
from keras_moe.pipelines.training import routing_checks  # noqa: E402
from keras_moe.pipelines.training.rundir import RunDir  # noqa: E402

NAMES = ("gutenberg-dense", "gutenberg-moe-16", "gutenberg-moe-64", "gutenberg-moe-256",
         "gutenberg-moe-1024-h", "gutenberg-2xlstm")
DENSE, FLOOR = "gutenberg-dense", "gutenberg-2xlstm"
BUDGETS = (5_000_000, 15_000_000, 30_000_000, 60_000_000)
# The ablation's run (pipelines/configs/lm/gutenberg-moe-256-no-balance.yaml) and its base.
ABLATION = ("gutenberg-moe-256-no-balance", "gutenberg-moe-256-nobalance")
ABLATION_BASE = "gutenberg-moe-256"
SEED_RUN = re.compile(r"^(?P<base>.+)-seed-?(?P<seed>\d+)$")
# Table 6's statistics, as routing_checks logs them (`val_<layer>_<statistic>`).
ROUTING = ("cv_importance", "cv_load", "max_mean_load")
assert set(ROUTING) <= set(routing_checks.LOGGED)
# A run's evaluation counts as "at" a budget within this relative distance.
TOLERANCE = 0.005
DASH = "—"


def label(name, preset):
    """The name a run is shown under: `MoE-256`, `dense, seed 2`, ..."""
    base = {DENSE: "dense", FLOOR: "floor (no middle block)"}.get(preset)
    if base is None:
        base = preset.removeprefix("gutenberg-").replace("moe", "MoE")
    match = SEED_RUN.match(name)
    if match:
        base += f", seed {match['seed']}"
    if name in ABLATION:
        base += ", no balancing losses"
    return base


def millions(tokens):
    return DASH if tokens is None else f"{tokens / 1e6:.1f}M"


def at_budget(curve, budget):
    """`(perplexity, how)` of a `[(tokens, perplexity), ...]` curve at `budget` tokens.

    `how` is `"measured"` (an evaluation within `TOLERANCE` of it),
    `"interpolated"` (log perplexity linear in log tokens between the two
    evaluations around it) or None (the curve does not reach it; the
    value is None then).
    """
    near = [(abs(t - budget), p) for t, p in curve if abs(t - budget) <= TOLERANCE * budget]
    if near:
        return min(near)[1], "measured"
    for (t0, p0), (t1, p1) in zip(curve, curve[1:], strict=False):
        if t0 < budget < t1:
            w = (math.log(budget) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1)), "interpolated"
    return None, None


def gap_percent(value, dense):
    """Signed % by which `value` exceeds dense's perplexity (negative: the model is better)."""
    if value is None or dense is None:
        return None
    return 100.0 * (value / dense - 1.0)


def _finished_results(run):
    """`(results, file)`: results.json, else the newest `results-step-N.json` (a continued run)."""
    results = run.read_json(run.results_file)
    if results:
        return results, os.path.basename(run.results_file)
    kept = glob.glob(run.join("results-step-*.json"))
    steps = {int(m[1]): p for p in kept if (m := re.search(r"results-step-(\d+)\.json$", p))}
    if not steps:
        return {}, None
    path = steps[max(steps)]
    return run.read_json(path) or {}, os.path.basename(path)


def _model_arguments(config):
    """The run's model arguments: its preset's, with the config's overrides."""
    preset = config.get("model.preset")
    arguments = dict(presets.get_preset(preset)) if preset in presets.preset_names() else {}
    for key in ("num_experts", "num_groups", "k", "importance_weight", "load_weight"):
        if config.get(f"model.{key}") is not None:
            arguments[key] = config[f"model.{key}"]
    return presets.REGISTRY.resolve(arguments) if arguments else {}


def read_run(runs_root, name):
    """Everything the tables need from `runs_root/name`, or None when it has no evaluation yet."""
    path = os.path.join(runs_root, name)
    run = RunDir(path)
    if not os.path.exists(run.history_file):
        return None
    record = compare.read_run(f"{name}={path}")
    config, rows = record.config, record.evaluations
    per_step = (config.get("data.batch_size") or 0) * (config.get("data.seq_len") or 0)
    for row in rows:
        if row.get("tokens") is None and per_step:
            row["tokens"] = float(row["step"] * per_step)
    # By tokens; a row logged again after a resume replaces the earlier one.
    curve = sorted({row["tokens"]: row["val_perplexity"] for row in rows
                    if row.get("tokens") is not None
                    and row.get("val_perplexity") is not None}.items())
    last = rows[-1] if rows else {}
    tokens_seen = last.get("tokens")
    if per_step == 0 and tokens_seen and last.get("step"):
        per_step = tokens_seen / last["step"]
    target = config.get("train.max_tokens") or (config.get("train.steps") or 0) * per_step or None
    partial = target is not None and (tokens_seen or 0) < target * (1 - TOLERANCE)

    results, results_file = _finished_results(run)
    valid = results.get("valid") or {}
    whole = None
    if valid.get("perplexity") is not None:
        steps = results.get("steps")
        whole = {"perplexity": float(valid["perplexity"]), "steps": steps,
                 "tokens": steps * per_step if steps and per_step else None,
                 "file": results_file, "words": valid.get("words")}

    elapsed = {int(k): float(v) for k, v in (run.read_json(run.elapsed_file) or {}).items()}
    wall = None
    if elapsed:
        step = max(elapsed)
        seconds = elapsed[step]
        tokens = step * per_step if per_step else tokens_seen
        wall = {"steps": step, "seconds": seconds, "tokens": tokens,
                "seconds_per_step": seconds / step if step else None,
                "tokens_per_second": tokens / seconds if tokens and seconds else None}

    arguments = _model_arguments(config)
    moe = "moe" in arguments.get("blocks", ())
    costs = results.get("costs") or (presets.costs(arguments) if arguments else {})
    wikipedia = run.read_json(run.join("wikipedia.json"))
    return {
        "name": name, "run_dir": path, "preset": config.get("model.preset"),
        "label": label(name, config.get("model.preset") or name),
        "seed": config.get("train.seed"),
        "experts": arguments.get("num_experts") if moe else 0,
        "hierarchical": bool(moe and arguments.get("num_groups")),
        "importance_weight": arguments.get("importance_weight") if moe else None,
        "load_weight": arguments.get("load_weight") if moe else None,
        "ops_per_timestep": costs.get("ops_per_timestep"),
        "params": costs.get("params"),
        "tokens_seen": tokens_seen, "target_tokens": target, "partial": partial,
        "curve": [{"tokens": t, "val_perplexity": p} for t, p in curve],
        "budgets": {str(b): dict(zip(("perplexity", "how"), at_budget(curve, b),
                                     strict=True)) for b in BUDGETS},
        "whole_valid": whole,
        "wall": wall,
        "routing": _routing(rows),
        "wikipedia": None if not wikipedia else {
            "perplexity": wikipedia.get("perplexity"), "words": wikipedia.get("words"),
            "data": wikipedia.get("data"), "model": wikipedia.get("model")},
    }


def _routing(rows):
    """`{layer: {tokens, cv_importance, ...}}` from the last evaluation that logged each layer."""
    suffix = re.compile(r"^val_(?P<layer>.+)_(?P<stat>" + "|".join(ROUTING) + r")$")
    out = {}
    for row in rows:
        for column, value in row.items():
            match = suffix.match(column)
            if match and value is not None:
                entry = out.setdefault(match["layer"], {})
                if entry.get("_row") is not row:
                    entry.clear()
                    entry.update({"_row": row, "tokens": row.get("tokens")})
                entry[match["stat"]] = value
    for entry in out.values():
        entry.pop("_row")
    return out


