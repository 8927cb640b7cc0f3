"""Side-by-side comparison of finished or running training runs, read from their run directories.

The comparisons the results pages make (the MoE model against its dense
baseline at equal steps, best evaluation against best evaluation, the
spread over seeds) are read from what every run directory already holds:

- `history.csv`: one row per evaluation (`val_bleu`, `val_perplexity`, ...,
  written by `runs.HistoryLogger`);
- `elapsed.json`: the optimizer step and training seconds at each
  evaluation (`runs.TrainingClock`), which gives each row its step, also
  for a last evaluation cut short by the time limit;
- `results.json`: the final scores (`valid` and `test`), the steps and the
  training time;
- `config.yaml`: the resolved configuration, so that the keys in which the
  runs differ are named next to the numbers.

Runs given with the same label form a group (for example several seeds of
one configuration): a group's cell is the mean, with the sample standard
deviation and the number of runs when there are several.

`keras-moe compare [--metric NAME ...] [--json] [LABEL=]RUN_DIR ...` prints
the tables as Markdown (or the comparison as JSON).

Example:

>>> import json, os, tempfile
>>> run = tempfile.mkdtemp()
>>> with open(os.path.join(run, "history.csv"), "w") as f:
...     _ = f.write("epoch,val_perplexity\\n0,120.0\\n1,110.0\\n")
>>> with open(os.path.join(run, "config.yaml"), "w") as f:
...     _ = f.write("train: {steps_per_eval: 400}\\n")
>>> comparison = compare([f"moe={run}"])
>>> comparison["curves"]["val_perplexity"]
[{'step': 400, 'moe': {'mean': 120.0, 'std': None, 'n': 1}}, {'step': 800, 'moe': {'mean': 110.0, 'std': None, 'n': 1}}]
>>> comparison["best"]["val_perplexity"]["moe"]
{'mean': 110.0, 'std': None, 'n': 1, 'steps': [800]}
"""

import csv
import dataclasses
import json
import math
import os

import yaml

from keras_moe.pipelines.training.rundir import RunDir

# Final scores taken from results.json, per split.
FINAL_SCORES = ("bleu", "bleu_tokenized", "chrf", "perplexity")
# Metrics where a larger value is better; every other metric is a loss.
_HIGHER_IS_BETTER = ("bleu", "chrf", "accuracy")
_DEFAULT_METRICS = ("val_bleu", "val_perplexity")
_ABSENT = "(absent)"


@dataclasses.dataclass
class RunRecord:
    """What one run directory says about its run.

    Attributes:
        run_dir: the directory.
        label: the name the run is shown (and grouped) under.
        config: the resolved configuration, flattened to dotted keys.
        evaluations: one dict per `history.csv` row: `step`,
            `elapsed_minutes` (None when not recorded) and every logged value.
        results: `results.json` (empty while the run has not finished).
    """

    run_dir: str
    label: str
    config: dict
    evaluations: list
    results: dict


def higher_is_better(metric):
    """True for metrics that grow as the model improves (BLEU, chrF, accuracy)."""
    return any(word in metric for word in _HIGHER_IS_BETTER)


def _flatten(data, prefix=""):
    flat = {}
    for key, value in (data or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _number(text, path, line, column):
    try:
        return float(text) if text != "" else None
    except ValueError:
        raise ValueError(
            f"{path}:{line}: column `{column}` holds {text!r}, not a number"
        ) from None


def _steps(history_rows, steps_per_eval, elapsed, final_steps):
    """The optimizer step of each history row.

    A row's own `step` (written by `runs.HistoryLogger` since it has had
    one) is the step. Older rows: row `i` is the evaluation at the end of
    epoch `i`, i.e. after `(i + 1) * steps_per_eval` steps, unless the run
    stopped inside that epoch: then `elapsed.json` (or the final step
    count) gives the step.
    """
    noted = sorted(int(step) for step in elapsed)
    steps = []
    for row in history_rows:
        if row.get("step") is not None:
            steps.append(int(row["step"]))
            continue
        epoch = int(row["epoch"])
        low, high = epoch * steps_per_eval, (epoch + 1) * steps_per_eval
        inside = [s for s in noted if low < s <= high]
        if inside:
            steps.append(inside[-1])
        elif final_steps is not None and low < final_steps < high:
            steps.append(final_steps)
        else:
            steps.append(high)
    return steps


def read_run(spec):
    """Read one run directory.

    Args:
        spec: `RUN_DIR` or `LABEL=RUN_DIR`; the label defaults to the
            directory's name.

    Returns:
        A `RunRecord`.

    Raises:
        FileNotFoundError: the directory or its `history.csv` is missing.
        ValueError: an empty label, or a file that cannot be read (named
            with its line).
    """
    label, sep, run_dir = spec.partition("=")
    if not sep:
        label, run_dir = os.path.basename(os.path.normpath(spec)), spec
    elif not label:
        raise ValueError(f"Empty label before '=' in {spec!r}; write LABEL=RUN_DIR or RUN_DIR.")
    run = RunDir(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"Run directory {run_dir!r} does not exist.")
    history_path = run.history_file
    if not os.path.exists(history_path):
        raise FileNotFoundError(
            f"{history_path} does not exist: {run_dir!r} is not a keras-moe run directory, "
            "or its run has not finished an evaluation yet."
        )
    config_path = run.config_file
    config = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            try:
                config = _flatten(yaml.safe_load(f))
            except yaml.YAMLError as error:
                raise ValueError(f"{config_path}: not valid YAML ({error})") from None
    steps_per_eval = config.get("train.steps_per_eval")
    if not isinstance(steps_per_eval, int) or steps_per_eval <= 0:
        raise ValueError(f"{config_path}: `train.steps_per_eval` is missing or not a positive "
                         f"integer (found {steps_per_eval!r}).")
    results = run.read_json(run.results_file) or {}
    elapsed = run.read_json(run.elapsed_file) or {}

    with open(history_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "epoch" not in reader.fieldnames:
            raise ValueError(f"{history_path}:1: no `epoch` column in the header.")
        rows = []
        for line, row in enumerate(reader, start=2):
            values = {k: _number(v, history_path, line, k) for k, v in row.items()
                      if k is not None and v is not None}
            if values["epoch"] is None or values["epoch"] != int(values["epoch"]):
                raise ValueError(f"{history_path}:{line}: `epoch` is {row['epoch']!r}.")
            rows.append(values)
    steps = _steps(rows, steps_per_eval, elapsed, results.get("steps"))
    evaluations = []
    for row, step in zip(rows, steps, strict=True):
        row = {k: v for k, v in row.items() if k not in ("epoch", "step")}
        minutes = row.pop("elapsed_minutes", None)
        if minutes is None and str(step) in elapsed:
            minutes = elapsed[str(step)] / 60.0
        evaluations.append({"step": step, "elapsed_minutes": minutes, **row})
    return RunRecord(run_dir, label, config, evaluations, results)


def _summary(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = None
    if len(values) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return {"mean": mean, "std": std, "n": len(values)}


def _final_values(run):
    results = run.results
    final = {}
    if results.get("steps") is not None:
        final["steps"] = float(results["steps"])
    minutes = results.get("elapsed_minutes")
    if minutes is None and results.get("train_seconds") is not None and not results.get("resumed"):
        minutes = results["train_seconds"] / 60.0  # one sitting: its time is the run's
    if minutes is not None:
        final["training_minutes"] = float(minutes)
    for split in ("valid", "test"):
        scores = results.get(split)
        if isinstance(scores, dict):
            for key in FINAL_SCORES:
                if isinstance(scores.get(key), (int, float)):
                    final[f"{split}_{key}"] = float(scores[key])
    return final


def run_kind(run):
    """`"translation"`, `"lm"` or None (not known) for a `RunRecord`.

    A translation run's configuration has a `decode` section, a language
    model's `data.seq_len`; failing both, `results.json`'s perplexity
    convention says which.
    """
    if any(key.startswith("decode.") for key in run.config):
        return "translation"
    if "data.seq_len" in run.config:
        return "lm"
    convention = str((run.results.get("valid") or {}).get("convention", ""))
    if "per word" in convention:
        return "lm"
    if "per target" in convention:
        return "translation"
    return None


def check_same_kind(runs):
    """ValueError when `runs` mix language-model and translation runs.

    Their perplexities do not compare: a language model's is per word, a
    translation model's per target WordPiece token.
    """
    kinds = {}
    for run in runs:
        kind = run_kind(run)
        if kind is not None:
            kinds.setdefault(kind, []).append(run.label)
    if len(kinds) > 1:
        raise ValueError(
            "cannot compare language-model runs (" + ", ".join(dict.fromkeys(kinds["lm"]))
            + ": perplexity per word) with translation runs ("
            + ", ".join(dict.fromkeys(kinds["translation"]))
            + ": perplexity per target WordPiece token) in one table; compare them separately"
        )


def compare(specs, metrics=None):
    """Compare runs: their curves, best evaluations, final scores and configuration differences.

    Args:
        specs: run directories, each `RUN_DIR` or `LABEL=RUN_DIR`; runs with
            the same label form a group (shown as mean, sample standard
            deviation and count).
        metrics: `history.csv` columns to compare, `elapsed_minutes` (the
            training time at each evaluation) included (default: those of
            `val_bleu` and `val_perplexity` that some run logged).

    Returns:
        A JSON-serialisable dict: `labels` (in order of first appearance),
        `runs` (label and directory of each run), `metrics`, `differences`
        (each configuration key whose value is not the same in every run,
        with each run's value, "(absent)" where a run's configuration lacks
        the key), `curves` (per metric, one entry per step at
        which some run evaluated, with each group's summary there and, for
        runs that log them, the training `tokens` seen by then), `best`
        (per metric, each group's summary of its runs' best values and the
        steps they were reached at) and `final` (per `results.json` score,
        each group's summary).

    Raises:
        ValueError: no run given, a metric that no run logged (the
            logged ones are named), or language-model runs mixed with
            translation runs (`check_same_kind`).
    """
    if not specs:
        raise ValueError("Give at least one run directory to compare.")
    runs = [read_run(spec) for spec in specs]
    check_same_kind(runs)
    labels = list(dict.fromkeys(run.label for run in runs))
    logged = sorted({key for run in runs for e in run.evaluations for key in e
                     if key != "step" and e[key] is not None})
    if metrics:
        for metric in metrics:
            if metric not in logged:
                raise ValueError(f"No run logged metric {metric!r}. Logged: {', '.join(logged)}.")
        metrics = list(metrics)
    else:
        metrics = [m for m in _DEFAULT_METRICS if m in logged]

    keys = sorted({key for run in runs for key in run.config})
    differences = {}
    for key in keys:
        # A key older runs' configurations lack is shown as absent, not as null.
        values = [run.config.get(key, _ABSENT) for run in runs]
        if any(json.dumps(v, sort_keys=True) != json.dumps(values[0], sort_keys=True) for v in values):
            differences[key] = [{"label": run.label, "run_dir": run.run_dir, "value": value}
                                for run, value in zip(runs, values, strict=True)]

    # Each group's runs, and each run's evaluations by step, looked up once.
    groups = {label: [run for run in runs if run.label == label] for label in labels}
    by_step = {id(run): {e["step"]: e for e in run.evaluations} for run in runs}
    curves = {}
    best = {}
    for metric in metrics:
        steps = sorted({e["step"] for run in runs for e in run.evaluations
                        if e.get(metric) is not None})
        curves[metric] = [
            {"step": step, **_tokens_at(step, runs, by_step),
             **{label: _summary([by_step[id(run)].get(step, {}).get(metric) for run in group])
                for label, group in groups.items()}}
            for step in steps
        ]
        if metric == "elapsed_minutes":  # a clock, not a score: no best
            continue
        choose = max if higher_is_better(metric) else min
        best[metric] = {}
        for label, group in groups.items():
            bests = [choose(scored, key=lambda e: e[metric]) for scored in
                     ([e for e in run.evaluations if e.get(metric) is not None] for run in group)
                     if scored]
            summary = _summary([e[metric] for e in bests])
            if summary is not None:
                summary["steps"] = [e["step"] for e in bests]
            best[metric][label] = summary

    finals = {id(run): _final_values(run) for run in runs}
    final_keys = list(dict.fromkeys(key for values in finals.values() for key in values))
    final = {key: {label: _summary([finals[id(run)].get(key) for run in group])
                   for label, group in groups.items()} for key in final_keys}
    return {
        "labels": labels,
        "runs": [{"label": run.label, "run_dir": run.run_dir} for run in runs],
        "metrics": metrics,
        "differences": differences,
        "curves": curves,
        "best": best,
        "final": final,
    }


def _tokens_at(step, runs, by_step):
    """`{"tokens": n}`: the training tokens the runs had seen at `step` (the `tokens`
    column of `history.csv`, `training/budget.py`); a list where runs differ; {} without."""
    seen = list(dict.fromkeys(
        int(e["tokens"]) for run in runs
        if (e := by_step[id(run)].get(step)) is not None and e.get("tokens") is not None
    ))
    if not seen:
        return {}
    return {"tokens": seen[0] if len(seen) == 1 else seen}


def _cell(summary, group_size, digits=2):
    if summary is None:
        return ""
    text = f"{summary['mean']:.{digits}f}"
    if summary["n"] > 1:
        text += f" ± {summary['std']:.{digits}f}"
    if group_size > 1:  # also when only some of the group's runs have the value
        text += f" (n={summary['n']})"
    return text


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(comparison):
    """The comparison as Markdown tables: differences, curves, best evaluations, final scores."""
    labels = comparison["labels"]
    size = {label: sum(r["label"] == label for r in comparison["runs"]) for label in labels}
    out = ["Runs: " + ", ".join(f"{r['label']} = `{r['run_dir']}`" for r in comparison["runs"])]
    def row(name, cell):
        return [name] + [cell(label) for label in labels]

    if comparison["differences"]:
        out += ["", "## Configuration differences", ""]
        out += _table(["key"] + labels, [
            row(f"`{key}`", lambda label, values=values: " / ".join(dict.fromkeys(
                v["value"] if v["value"] == _ABSENT else json.dumps(v["value"])
                for v in values if v["label"] == label)))
            for key, values in comparison["differences"].items()
        ])
    for metric, rows in comparison["curves"].items():
        out += ["", f"## {metric} by step", ""]
        if any("tokens" in r for r in rows):
            # Training tokens seen, the x-axis of data-rich runs, next to the step.
            def tokens(r):
                seen = r.get("tokens")
                return " / ".join(f"{t:,}" for t in seen) if isinstance(seen, list) else (
                    "" if seen is None else f"{seen:,}")

            out += _table(["step", "tokens"] + labels, [
                [f"{r['step']:,}", tokens(r)] + [_cell(r[label], size[label]) for label in labels]
                for r in rows
            ])
            continue
        out += _table(["step"] + labels, [
            row(f"{r['step']:,}", lambda label, r=r: _cell(r[label], size[label])) for r in rows
        ])
    if comparison["best"]:
        out += ["", "## Best evaluation (step)", ""]

        def best_cell(summary, label):
            if summary is None:
                return ""
            return f"{_cell(summary, size[label])} ({', '.join(f'{s:,}' for s in summary['steps'])})"

        out += _table([""] + labels, [
            row(metric, lambda label, by=by_label: best_cell(by[label], label))
            for metric, by_label in comparison["best"].items()
        ])
    if comparison["final"]:
        out += ["", "## Final (results.json)", ""]
        out += _table([""] + labels, [
            row(key, lambda label, by=by_label, d=0 if key == "steps" else 2:
                _cell(by[label], size[label], d))
            for key, by_label in comparison["final"].items()
        ])
    return "\n".join(out) + "\n"
