"""The reproduction ledger: one JSON line per run, and its report beside the paper's numbers.

`keras-moe reproduce run` appends one line per finished run:

```
{"experiment": "lm1b-moe-32", "table": "Table 7", "paper_row": "MoE-32",
 "metric": "test_perplexity", "value": 40.1, "paper_value": 39.7, "difference": 0.4,
 "relative_difference": 0.0101, "config_hash": "<sha256 of the resolved config YAML>",
 "overrides": [], "hardware": {...}, "wall_seconds": 50400.0, "train_seconds": ...,
 "steps": 27650, "git_commit": "<sha or null>", "git_dirty": false,
 "timestamp": "2026-01-01T00:00:00+00:00", "run_dir": "...", "extra": {...}}
```

`markdown(entries)` tables it; `html(entries)` is a self-contained page
with the same table and an SVG bar chart of ours against the paper's.

Example:

>>> entry = {"experiment": "lm1b-moe-32", "table": "Table 7", "paper_row": "MoE-32",
...          "metric": "test_perplexity", "value": 40.1, "paper_value": 39.7,
...          "difference": 0.4, "overrides": [], "steps": 27650, "wall_seconds": 3600.0,
...          "hardware": {"description": "8 x H100"}, "git_commit": None,
...          "config_hash": "ab" * 32, "timestamp": "2026-01-01T00:00:00+00:00"}
>>> markdown([entry]).splitlines()[-1].split(" | ")[:6]
['| lm1b-moe-32', 'Table 7 MoE-32', 'test_perplexity', '40.10', '39.70', '+0.40']
"""

import datetime
import hashlib
import html as html_lib
import json
import math
import os
import platform
import subprocess

from keras_moe.pipelines.config import dump_config
from keras_moe.pipelines.reproduce import experiments

LEDGER_NAME = "ledger.jsonl"
_ROUTING_KEYS = ("batch_cv_importance", "batch_cv_load", "batch_max_mean_load",
                 "set_cv_importance", "set_cv_load", "set_max_mean_load")


def default_path(run_dir):
    """`ledger.jsonl` in the folder holding `run_dir` (`DIR/../ledger.jsonl`)."""
    return os.path.join(os.path.dirname(os.path.abspath(run_dir)), LEDGER_NAME)


def config_hash(config):
    """sha256 of the resolved configuration's YAML (the text saved as `config.yaml`)."""
    return hashlib.sha256(dump_config(config).encode("utf-8")).hexdigest()


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(replicas=1):
    """This machine: CPU model and cores, GPU names, replicas of the run's strategy."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        gpus.append(details.get("device_name", device.name))
    cpu, cores = _cpu_name(), os.cpu_count()
    if gpus:
        names = sorted(set(gpus))
        description = f"{len(gpus)} x {' + '.join(names)}, {replicas} replica(s)"
    else:
        description = f"CPU only: {cpu}, {cores} cores"
    return {"description": description, "cpu": cpu, "cpu_cores": cores, "gpus": gpus,
            "replicas": replicas, "platform": platform.platform()}


def git_state(path=None):
    """`(commit, dirty)` of the git checkout holding this package; `(None, None)` outside one."""
    # pipelines/reproduce/ledger.py: the checkout is three folders up.
    root = path or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return None, None
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def _number(x):
    """A JSON-safe float: None for NaN or infinity."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def make_entry(experiment, config, results, wall_seconds, run_dir, overrides=(), replicas=1):
    """The ledger line of a finished run (a dict; see the module docstring).

    The metric is the test split's when the configuration has one, else the
    validation split's (named so in `metric`): perplexity per word for a
    language model; for translation the tokenized BLEU (the paper's
    convention), with sacreBLEU's detokenized score in `extra`.
    """
    split = "test" if "test" in results else "valid"
    scores = results[split]
    if experiment.task == "lm":
        metric, value = f"{split}_perplexity", _number(scores["perplexity"])
        routing = results.get("routing_valid") or {}
        extra = {
            "valid_perplexity": _number(results["valid"]["perplexity"]),
            "routing_valid": {name: {k: _number(stats[k]) for k in _ROUTING_KEYS}
                              for name, stats in routing.items()},
        }
    else:
        metric, value = f"{split}_bleu", _number(scores["bleu_tokenized"])
        extra = {"bleu_sacrebleu": _number(scores["bleu"]),
                 "bleu_signature": scores.get("bleu_signature"),
                 "perplexity": _number(scores["perplexity"]),
                 "valid_bleu": _number(results["valid"]["bleu_tokenized"])}
    paper = experiment.paper_value
    difference = None if value is None else value - paper
    commit, dirty = git_state()
    return {
        "experiment": experiment.name, "table": experiment.table,
        "paper_row": experiment.paper_row, "metric": metric, "value": value,
        "paper_value": paper, "difference": difference,
        "relative_difference": None if value is None else difference / paper,
        "config_hash": config_hash(config), "overrides": list(overrides),
        "hardware": hardware(replicas), "wall_seconds": round(wall_seconds, 1),
        "train_seconds": results.get("train_seconds"), "steps": results.get("steps"),
        "git_commit": commit, "git_dirty": dirty,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": os.path.abspath(run_dir), "extra": extra,
    }


def append(path, entry):
    """Append `entry` as one JSON line to `path` (its folder is created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, allow_nan=False, sort_keys=False) + "\n")


def read(path):
    """Every entry of the ledger `path`; ValueError naming the line of a bad one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ledger not found: {path}")
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
    return entries


def _fmt(x, sign=False):
    if x is None:
        return "-"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def _duration(seconds):
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _commit(entry):
    commit = (entry.get("git_commit") or "-")[:10]
    return commit + ("+dirty" if entry.get("git_dirty") else "")


def _rows(entries):
    """Table cells per entry, and whether any entry was overridden."""
    rows = []
    for e in entries:
        name = e["experiment"] + (" †" if e.get("overrides") else "")
        steps = e.get("steps")
        rows.append([
            name, f"{e['table']} {e['paper_row']}", e["metric"], _fmt(e["value"]),
            _fmt(e["paper_value"]), _fmt(e["difference"], sign=True),
            "-" if steps is None else f"{steps:,}", _duration(e.get("wall_seconds")),
            e["hardware"]["description"], _commit(e),
            e["config_hash"][:12], e["timestamp"][:10],
        ])
    return rows


HEADER = ["experiment", "paper row", "metric", "ours", "paper", "ours - paper", "steps",
          "wall time", "hardware", "commit", "config", "date"]
FOOTNOTE = ("† trained with `--set` overrides: not the paper's configuration, so not "
            "comparable with its figure.")


BALANCE_HEADER = ["experiment", "w_importance", "w_load", "perplexity", "CV(Importance)",
                  "CV(Load)", "max/mean Load"]
BALANCE_NOTE = ("Table 6's balance figures, ours / the paper's. Ours are the validation set's "
                "per-batch averages without noise (`routing_valid`); the paper's are averaged "
                "over training batches.")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def balance_rows(entries):
    """Table 6 cells (ours / paper) for the Table 6 entries: latest run of each."""
    rows = []
    for e in latest(entries):
        if e["table"] != "Table 6" or e["experiment"] not in experiments.EXPERIMENTS:
            continue
        f = experiments.EXPERIMENTS[e["experiment"]].figures
        routing = next(iter((e.get("extra") or {}).get("routing_valid", {}).values()), {})
        ours = [e["value"]] + [routing.get(k) for k in _ROUTING_KEYS[:3]]
        paper = [f[k] for k in ("test_perplexity", "cv_importance", "cv_load", "max_mean_load")]
        rows.append([e["experiment"] + (" †" if e.get("overrides") else ""), f["w_importance"],
                     f["w_load"]] + [f"{_fmt(o)} / {p}" for o, p in zip(ours, paper, strict=True)])
    return rows


def markdown(entries):
    """The ledger as a Markdown table beside the paper's figures (and Table 6's balance)."""
    lines = _table(HEADER, _rows(entries))
    if any(e.get("overrides") for e in entries):
        lines = [FOOTNOTE, ""] + lines
    balance = balance_rows(entries)
    if balance:
        lines += ["", BALANCE_NOTE, ""] + _table(BALANCE_HEADER, balance)
    return "\n".join(lines)


def latest(entries):
    """The last entry of each experiment, in first-seen order."""
    last = {}
    for e in entries:
        last[e["experiment"]] = e
    return list(last.values())


def svg_plot(entries, width=760):
    """An SVG bar chart: ours against the paper's, one panel per metric kind."""
    bar, gap, label_w, right = 14, 10, 250, 70
    plot_w = width - label_w - right
    panels = [(kind, [e for e in latest(entries) if e["metric"].endswith(kind)])
              for kind in ("perplexity", "bleu")]
    panels = [(k, es) for k, es in panels if es]
    parts, y = [], 30
    parts.append('<rect x="250" y="8" width="12" height="12" fill="#1f77b4"/>'
                 '<text x="266" y="18">ours</text><rect x="320" y="8" width="12" '
                 'height="12" fill="#aaaaaa"/><text x="336" y="18">paper</text>')
    for kind, items in panels:
        title = ("perplexity (lower is better)" if kind == "perplexity"
                 else "BLEU (higher is better)")
        parts.append(f'<text x="0" y="{y + 14}" font-weight="bold">{title}</text>')
        y += 24
        top = max([e["paper_value"] for e in items] + [e["value"] or 0 for e in items]) * 1.1 or 1
        for e in items:
            parts.append(f'<text x="{label_w - 6}" y="{y + bar + 4}" text-anchor="end">'
                         f'{html_lib.escape(e["experiment"])}{" †" if e.get("overrides") else ""}'
                         '</text>')
            for offset, value, colour in ((0, e["value"], "#1f77b4"),
                                          (bar, e["paper_value"], "#aaaaaa")):
                if value is None:
                    parts.append(f'<text x="{label_w}" y="{y + offset + 11}">n/a</text>')
                    continue
                w = max(1.0, plot_w * value / top)
                parts.append(f'<rect x="{label_w}" y="{y + offset}" width="{w:.1f}" '
                             f'height="{bar - 2}" fill="{colour}"/>')
                parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + offset + 11}">'
                             f'{value:.2f}</text>')
            y += 2 * bar + gap
        y += 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
            f'font-family="sans-serif" font-size="12" role="img" '
            f'aria-label="ours against the paper">{"".join(parts)}</svg>')


def _html_table(header, rows):
    head = "".join(f"<th>{html_lib.escape(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{html_lib.escape(c)}</td>" for c in row) + "</tr>"
                    for row in rows)
    return f"<table><tr>{head}</tr>{cells}</table>"


def html(entries, title="keras-moe reproduction ledger"):
    """A self-contained HTML page: the SVG chart and the tables."""
    note = f"<p>{html_lib.escape(FOOTNOTE)}</p>" if any(e.get("overrides") for e in entries) else ""
    balance = balance_rows(entries)
    if balance:
        note_b = f"<p>{html_lib.escape(BALANCE_NOTE)}</p>"
        balance_html = note_b + _html_table(BALANCE_HEADER, balance)
    else:
        balance_html = ""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html_lib.escape(title)}</title><style>body{{font-family:sans-serif;"
        "margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 6px;font-size:13px}</style></head><body>"
        f"<h1>{html_lib.escape(title)}</h1><p>Ours against Shazeer et al. (2017), "
        "arXiv:1701.06538; the latest run of each experiment is plotted.</p>"
        f"{svg_plot(entries)}{note}{_html_table(HEADER, _rows(entries))}{balance_html}"
        "</body></html>\n"
    )


def write_report(ledger_path, out=None):
    """Write `out` (Markdown; default `report.md` beside the ledger) and the same name `.html`.

    Returns:
        `(markdown text, markdown path, html path)`.
    """
    entries = read(ledger_path)
    out = out or os.path.join(os.path.dirname(os.path.abspath(ledger_path)), "report.md")
    text = (f"# Reproduction ledger\n\nOurs against Shazeer et al. (2017), arXiv:1701.06538, "
            f"from `{ledger_path}`.\n\n{markdown(entries)}\n")
    html_path = os.path.splitext(out)[0] + ".html"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(html(entries))
    return text, out, html_path
