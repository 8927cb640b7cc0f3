"""The one-pass Gutenberg experiment's tables, figures and numbers, read from its run directories.

Issue 26 publishes validation perplexity by training tokens for the
compute-matched models (dense, MoE-16, MoE-64, MoE-256, MoE-1024-h) and
the floor (`gutenberg-2xlstm`, no middle block). This script reads what
every run directory `RUNS/<name>` already holds and prints the page's
tables as Markdown:

1. models by tokens: validation perplexity (the 200k-word slice,
   `history.csv`'s `val_perplexity` against its `tokens` column) at 5M,
   15M, 30M and 60M training tokens and on the whole valid file at the end
   (`results.json`), each with its signed gap to dense (`+2.0%`: 2% higher
   perplexity than dense, worse). A run that evaluated at the budget gives
   its value; one whose evaluations straddle it (a run continued from a
   time limit evaluates every `steps_per_eval` steps from where it stopped)
   gives the value interpolated between the two, marked `~` (log perplexity
   linear in log tokens); otherwise `—`. A run still short of its
   `train.max_tokens` is partial: its row says up to which tokens it got,
   and its whole-valid figure is the one its last sitting wrote
   (`results-step-N.json`), at the tokens it had then;
2. wall time (`elapsed.json`: the run's training clock, validation
   included), training tokens/s of the run and of the idle benchmark
   (`benchmarks/lm_throughput.py --gutenberg`), and step cost relative to
   dense in both;
3. Table 6's ablation: MoE-256 against `gutenberg-moe-256-no-balance`,
   with CV(importance), CV(load) and max/mean load of the clean
   (inference-mode) routing of the validation pass, the history columns
   `val_<layer>_<statistic>` of `pipelines/training/routing_checks.py`;
4. seeds: every `<name>-seed-N` run beside a run of `--names`, with the
   mean and the spread (max - min) over the seeds;
5. out of domain: `RUNS/<name>/wikipedia.json`, written by
   `keras-moe lm evaluate --run-dir RUNS/<name> --data <wikipedia valid> --out
   RUNS/<name>/wikipedia.json`.

It draws `gutenberg-ppl-vs-tokens.png` (one line per model, and below
them each model's gap to dense at the same tokens, `gap_curve`) and
`gutenberg-ppl-vs-experts.png` (perplexity at the largest budget every
present run reached, against the number of experts; dense and the floor
as horizontal lines) with matplotlib (the `plots` extra), and writes every
number as JSON. Runs not there yet are named, in the output and in the
figures' titles; the script draws what exists.

Usage:
    python benchmarks/gutenberg_results.py [--runs runs] [--names gutenberg-dense ...]
        [--throughput benchmarks/results/lm_throughput_gutenberg.json]
        [--images docs/images] [--json benchmarks/results/gutenberg_results.json]
"""

import argparse
import importlib.util
import json
import os
import pathlib
import sys


def _sibling(name):
    """The module `benchmarks/<name>.py` (benchmarks are scripts, not a package)."""
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runs_lib = _sibling("gutenberg_runs")
NAMES, DENSE, FLOOR, BUDGETS = runs_lib.NAMES, runs_lib.DENSE, runs_lib.FLOOR, runs_lib.BUDGETS
ABLATION, ABLATION_BASE, SEED_RUN = runs_lib.ABLATION, runs_lib.ABLATION_BASE, runs_lib.SEED_RUN
ROUTING, TOLERANCE, DASH = runs_lib.ROUTING, runs_lib.TOLERANCE, runs_lib.DASH
read_run, at_budget, gap_percent = runs_lib.read_run, runs_lib.at_budget, runs_lib.gap_percent
millions = runs_lib.millions


def collect(runs_root, names, throughput=None):
    """The experiment's numbers: runs, gaps, ablation, seeds, what is missing."""
    if not os.path.isdir(runs_root):
        raise FileNotFoundError(f"--runs {runs_root!r} is not a directory")
    runs, missing = {}, []
    for name in names:
        if not os.path.isdir(os.path.join(runs_root, name)) and os.path.isdir(
                os.path.join(runs_root, f"gutenberg-{name}")):
            name = f"gutenberg-{name}"  # --names dense moe-16 ...
        record = read_run(runs_root, name)
        if record is None:
            missing.append(name)
        else:
            runs[name] = record
    dense = runs.get(DENSE)
    for record in runs.values():
        record["gaps"] = {b: gap_percent(record["budgets"][b]["perplexity"],
                                         dense and dense["budgets"][b]["perplexity"])
                          for b in map(str, BUDGETS)}
        record["gaps"]["whole_valid"] = _whole_gap(record, dense)
        record["gap_curve"] = gap_curve(record, dense) if record is not dense else []
    bench = {}
    if throughput and os.path.exists(throughput):
        with open(throughput, encoding="utf-8") as f:
            bench = {row["preset"]: row for row in json.load(f).get("rows", [])}
    base_step = dense and dense["wall"] and dense["wall"]["seconds_per_step"]
    for record in runs.values():
        row = bench.get(record["preset"], {})
        record["benchmark"] = {key: row.get(key) for key in
                               ("tokens_per_second", "step_seconds", "step_ratio_to_dense")}
        per_step = record["wall"] and record["wall"]["seconds_per_step"]
        record["step_ratio_to_dense"] = per_step / base_step if per_step and base_step else None
    ablation = [n for n in ABLATION if os.path.isdir(os.path.join(runs_root, n))]
    ablation_runs = [r for r in (runs.get(ABLATION_BASE),
                                 ablation and read_run(runs_root, ablation[0])) if r]
    seeds = {}
    for name in sorted(os.listdir(runs_root)):
        match = SEED_RUN.match(name)
        if match and match["base"] in runs and (record := read_run(runs_root, name)):
            seeds.setdefault(match["base"], [runs[match["base"]]]).append(record)
    return {
        "runs_root": runs_root, "budgets": list(BUDGETS), "names": list(names),
        "present": list(runs), "missing": missing, "runs": runs,
        "ablation": ablation_runs, "seeds": {b: _seed_summary(g) for b, g in seeds.items()},
        "throughput_file": throughput if bench else None,
        # The budget of the experts figure (a str key of `budgets`), None when none is common.
        "experts_figure_budget": largest_common_budget(list(runs.values())),
    }


def gap_curve(record, dense):
    """`[{tokens, gap_percent}, ...]`: the run's every evaluation against dense at the same tokens.

    Dense is read at each of the run's evaluation points with `at_budget`
    (measured there, or interpolated between its evaluations around it),
    so runs that evaluated at different steps still compare at equal data.
    Points dense did not reach are left out.
    """
    if not dense:
        return []
    theirs = [(p["tokens"], p["val_perplexity"]) for p in dense["curve"]]
    points = []
    for p in record["curve"]:
        value, _ = at_budget(theirs, p["tokens"])
        if value is not None:
            points.append({"tokens": p["tokens"],
                           "gap_percent": gap_percent(p["val_perplexity"], value)})
    return points


def _whole_gap(record, dense):
    """Gap on the whole valid file, only when dense was evaluated there at the same tokens."""
    mine, theirs = record["whole_valid"], dense and dense["whole_valid"]
    if not mine or not theirs or not mine["tokens"] or not theirs["tokens"]:
        return None
    if abs(mine["tokens"] - theirs["tokens"]) > TOLERANCE * theirs["tokens"]:
        return None
    return gap_percent(mine["perplexity"], theirs["perplexity"])


def _seed_summary(group):
    """Mean and spread over seeds at the largest budget all reached, and on the whole valid."""
    common = [b for b in map(str, BUDGETS)
              if all(r["budgets"][b]["perplexity"] is not None for r in group)]
    out = {"runs": [r["name"] for r in group], "seeds": [r["seed"] for r in group]}
    wholes = [r["whole_valid"] for r in group]
    same_tokens = None not in wholes and all(
        w["tokens"] and abs(w["tokens"] - wholes[0]["tokens"]) <= TOLERANCE * w["tokens"]
        for w in wholes)
    for key, values in (
        ("budget", [r["budgets"][common[-1]]["perplexity"] for r in group] if common else None),
        # Whole-valid figures only when every seed was evaluated at the same tokens.
        ("whole_valid", [w["perplexity"] for w in wholes] if same_tokens else None),
    ):
        if values and None not in values:
            mean = sum(values) / len(values)
            out[key] = {"values": values, "mean": mean, "spread": max(values) - min(values),
                        "spread_percent": 100.0 * (max(values) - min(values)) / mean}
        else:
            out[key] = None
    out["budget_tokens"] = int(common[-1]) if common else None
    return out


def _ppl(value, how=None):
    if value is None:
        return DASH
    return ("~" if how == "interpolated" else "") + f"{value:,.1f}"


def _gap(value):
    return "" if value is None else f" ({value:+.1f}%)"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def _minutes(seconds):
    if seconds is None:
        return DASH
    hours, minutes = divmod(round(seconds / 60.0), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def _number(value, digits=0, suffix=""):
    return DASH if value is None else f"{value:,.{digits}f}{suffix}"


def markdown(data):
    """The five tables and the notes under them, as Markdown."""
    runs, out = list(data["runs"].values()), []
    rows = []
    for r in runs:
        cells = []
        for b in map(str, BUDGETS):
            at = r["budgets"][b]
            cells.append(_ppl(at["perplexity"], at["how"])
                         + ("" if r["name"] == DENSE else _gap(r["gaps"][b])))
        whole = r["whole_valid"]
        cell = DASH
        if whole:
            cell = _ppl(whole["perplexity"]) + ("" if r["name"] == DENSE
                                                else _gap(r["gaps"]["whole_valid"]))
            if r["partial"]:
                cell += f" at {millions(whole['tokens'])}"
        seen = millions(r["tokens_seen"])
        if r["partial"]:
            seen += f" of {millions(r['target_tokens'])} (partial)"
        rows.append([r["label"], r["experts"], _number(r["ops_per_timestep"]), seen,
                     *cells, cell])
    out.append("### 1. Validation perplexity by training tokens (gap to dense)\n")
    out.append(_table(["model", "experts", "ops/timestep", "tokens seen",
                       *(f"{b // 1_000_000}M" for b in BUDGETS), "whole valid"], rows))
    out.append("\nPer-word perplexity on the first 200k words of valid at each budget, and on the "
               "whole valid file (1.96M words) at the end. Gap: the model's perplexity over "
               "dense's at the same budget, signed (negative: better than dense). `~`: "
               f"interpolated between the evaluations around the budget; {DASH}: not reached.")
    for name in data["missing"]:
        out.append(f"- {name}: not run yet (no history.csv under {data['runs_root']}).")
    for r in runs:
        if r["partial"]:
            whole = r["whole_valid"]
            note = (f"; whole valid from {whole['file']} at step {whole['steps']:,}"
                    if whole else "")
            out.append(f"- {r['label']}: partial, {millions(r['tokens_seen'])} of "
                       f"{millions(r['target_tokens'])} tokens{note}.")

    out.append("\n### 2. Wall time and throughput\n")
    rows = [[r["label"], _minutes(r["wall"] and r["wall"]["seconds"]),
             millions(r["wall"] and r["wall"]["tokens"]),
             _number(r["wall"] and r["wall"]["tokens_per_second"]),
             _number(r["benchmark"]["tokens_per_second"]),
             _number(r["step_ratio_to_dense"], 2), _number(r["benchmark"]["step_ratio_to_dense"], 2)]
            for r in runs]
    out.append(_table(["model", "wall time", "tokens", "tokens/s (run)", "tokens/s (idle bench)",
                       "step vs dense (run)", "step vs dense (idle bench)"], rows))
    out.append("\nRun: training clock (`elapsed.json`, validation included) at the last "
               "evaluation. Idle bench: " + (data["throughput_file"] or "no throughput JSON")
               + " (`benchmarks/lm_throughput.py --gutenberg`).")

    out.append("\n### 3. Balancing ablation (Table 6)\n")
    rows = []
    for r in data["ablation"]:
        budget = largest_common_budget([r for r in data["ablation"]])
        for layer, stats in (r["routing"] or {DASH: {}}).items():
            rows.append([r["label"], _number(r["importance_weight"], 2),
                         _number(r["load_weight"], 2),
                         _ppl(budget and r["budgets"][budget]["perplexity"]),
                         _ppl(r["whole_valid"] and r["whole_valid"]["perplexity"]), layer,
                         millions(stats.get("tokens")),
                         *(_number(stats.get(s), 3) for s in ROUTING)])
    if rows:
        budget = largest_common_budget(data["ablation"])
        out.append(_table(["model", "w_importance", "w_load",
                           f"val ppl at {millions(budget and int(budget))}", "whole valid",
                           "layer", "at tokens", "CV(importance)", "CV(load)", "max/mean load"],
                          rows))
        out.append("\nRouting of the validation pass (clean, inference mode): history.csv's "
                   "`val_<layer>_cv_importance`, `_cv_load`, `_max_mean_load`.")
    else:
        out.append(f"No run yet ({ABLATION_BASE}, {ABLATION[0]}).")

    out.append("\n### 4. Seeds\n")
    rows = []
    for base, s in data["seeds"].items():
        for what, key in ((f"val at {millions(s['budget_tokens'])}", "budget"),
                          ("whole valid", "whole_valid")):
            if s[key]:
                rows.append([data["runs"][base]["label"], ", ".join(map(str, s["seeds"])), what,
                             ", ".join(_ppl(v) for v in s[key]["values"]), _ppl(s[key]["mean"]),
                             f"{s[key]['spread']:,.1f} ({s[key]['spread_percent']:.1f}%)"])
    out.append(_table(["model", "seeds", "perplexity", "per seed", "mean", "spread (max - min)"],
                      rows) if rows else "No second-seed run yet (`<run>-seed-2`).")

    out.append("\n### 5. Out of domain: Wikipedia valid\n")
    dense = data["runs"].get(DENSE)
    base = dense and dense["wikipedia"] and dense["wikipedia"]["perplexity"]
    rows = [[r["label"], _ppl(r["wikipedia"]["perplexity"])
             + ("" if r["name"] == DENSE else _gap(gap_percent(r["wikipedia"]["perplexity"], base))),
             _ppl(r["whole_valid"] and r["whole_valid"]["perplexity"]),
             _number(r["wikipedia"]["words"])]
            for r in runs if r["wikipedia"] and r["wikipedia"]["perplexity"] is not None]
    out.append(_table(["model", "Wikipedia ppl (gap)", "Gutenberg whole valid", "words"], rows)
               if rows else "No wikipedia.json yet (`keras-moe lm evaluate ... --out "
               "RUN/wikipedia.json`).")
    return "\n".join(out)


def largest_common_budget(records):
    """The largest budget (as a string key) every record reached, or None."""
    common = [b for b in map(str, BUDGETS)
              if records and all(r["budgets"][b]["perplexity"] is not None for r in records)]
    return common[-1] if common else None


def _presence_note(data):
    if not data["missing"] and not any(r["partial"] for r in data["runs"].values()):
        return ""
    note = f"{len(data['runs'])} of {len(data['names'])} runs present"
    partial = [r["label"] for r in data["runs"].values() if r["partial"]]
    if partial:
        note += "; partial: " + ", ".join(partial)
    return note


def _finish(plt, fig, ax, path):
    """Legend (when anything is labelled), grid, saved to `path`, closed; returns `path`."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(data, images):
    """Writes the two PNGs into `images`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(images, exist_ok=True)
    note = _presence_note(data)
    runs = list(data["runs"].values())
    paths = []

    # Above, the curves; below, each model's gap to dense at the same tokens
    # (the paper's Figure 2, left, shows the gap growing with data seen).
    fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True,
                                     gridspec_kw={"height_ratios": [2, 1]})
    for r in runs:
        xs = [p["tokens"] / 1e6 for p in r["curve"]]
        ys = [p["val_perplexity"] for p in r["curve"]]
        text = r["label"] + (f" (to {millions(r['tokens_seen'])})" if r["partial"] else "")
        style = "--" if r["name"] == FLOOR else "-"
        line, = ax.plot(xs, ys, marker="o", markersize=3, label=text, linestyle=style)
        if r["gap_curve"]:
            gap_ax.plot([p["tokens"] / 1e6 for p in r["gap_curve"]],
                        [p["gap_percent"] for p in r["gap_curve"]], marker="o", markersize=3,
                        linestyle=style, color=line.get_color())
    gap_ax.axhline(0.0, color="gray", linewidth=1)
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity per word (log scale)")
    gap_ax.set_xlabel("training tokens (millions)")
    gap_ax.set_ylabel("gap to dense (%)\n(below 0: better)")
    gap_ax.grid(True, alpha=0.3)
    ax.set_title("Gutenberg, one pass: validation perplexity by tokens seen"
                 + (f"\n({note})" if note else ""), fontsize=10)
    paths.append(_finish(plt, fig, ax, os.path.join(images, "gutenberg-ppl-vs-tokens.png")))

    budget = data["experts_figure_budget"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if budget:
        value = {r["name"]: r["budgets"][budget]["perplexity"] for r in runs}
        flat = sorted((r["experts"], value[r["name"]]) for r in runs
                      if r["experts"] and not r["hierarchical"])
        if flat:
            ax.plot(*zip(*flat, strict=True), marker="o", label="MoE, flat (k=4)")
        for r in runs:
            if r["hierarchical"]:
                ax.plot([r["experts"]], [value[r["name"]]], marker="s", linestyle="none",
                        label=f"{r['label']} (hierarchical)")
        for name, style in ((DENSE, "-"), (FLOOR, ":")):
            if name in value:
                ax.axhline(value[name], color="gray" if name == DENSE else "black",
                           linestyle=style, label=data["runs"][name]["label"])
    else:
        ax.text(0.5, 0.5, "no budget reached by every run", ha="center",
                transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_xlim(8, 2048)
    ax.set_xticks([16, 64, 256, 1024], ["16", "64", "256", "1024"])
    ax.set_xlabel("number of experts")
    ax.set_ylabel("validation perplexity per word")
    at = f"at {millions(int(budget))} training tokens" if budget else "no common budget"
    guessed = [r["label"] for r in runs
               if budget and r["budgets"][budget]["how"] == "interpolated"]
    notes = "; ".join(filter(None, [note, guessed and "interpolated: " + ", ".join(guessed)]))
    ax.set_title(f"Gutenberg: perplexity by number of experts, {at}"
                 + (f"\n({notes})" if notes else ""), fontsize=10)
    paths.append(_finish(plt, fig, ax, os.path.join(images, "gutenberg-ppl-vs-experts.png")))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", default="runs", help="directory holding the run directories")
    parser.add_argument("--names", nargs="+", default=list(NAMES),
                        help="run directory names, in table order")
    parser.add_argument("--throughput",
                        default=os.path.join("benchmarks", "results",
                                             "lm_throughput_gutenberg.json"))
    parser.add_argument("--images", default=os.path.join("docs", "images"))
    parser.add_argument("--json", default=os.path.join("benchmarks", "results",
                                                       "gutenberg_results.json"))
    args = parser.parse_args(argv)
    try:
        data = collect(args.runs, args.names, args.throughput)
    except (FileNotFoundError, ValueError) as error:
        print(f"gutenberg_results: {error}", file=sys.stderr)
        return 2
    print(markdown(data))
    try:
        data["figures"] = plot(data, args.images)
    except ImportError:
        data["figures"] = []
        print("\nNo figures: matplotlib is missing (pip install 'keras-moe[plots]').")
    for path in data["figures"]:
        print(f"\nwrote {path}")
    if os.path.dirname(args.json):
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
