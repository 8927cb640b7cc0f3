"""`keras-moe experts select|prune|merge`: a smaller run from a trained one, and what it cost.

Each command routes up to `max_documents` documents of `data` through the
run's model in inference mode (`runs.measure`: each MoE layer's usage
share per expert, from the pipeline's own evaluator), builds a model with
fewer experts with `keras_moe.surgery`, writes it as the run directory
`out` (config.yaml with the new `model.num_experts`, the vocabulary,
model.keras), reloads it from there and measures it again. The report,
printed as a table and written to `out/experts.json`, gives the quality
before and after (perplexity; BLEU too for translation runs), the experts
per MoE layer, the size of `model.keras`, the bytes of the weights and,
with `measure_rss=True`, the resident memory a fresh process gains by
loading each file.

- `select`: keep the `keep` fraction of experts most used by the documents
  (a domain), the same number in every MoE layer;
- `prune`: remove experts whose usage share is under `threshold`
  (`keras_moe.pruning.prune_model`);
- `merge`: merge experts whose outputs on the documents' rows have cosine
  similarity `>= similarity` (`keras_moe.merging.merge_model`).

Quality is measured on `eval_data` (and `eval_target`) when given, else on
the same documents.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from keras_moe import merging, pruning, surgery
from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines.experts import runs

RSS_SCRIPT = """
import os, sys
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import keras
import keras_moe.models.lm, keras_moe.models.seq2seq  # registers the model classes
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
before = rss()
model = keras.saving.load_model(sys.argv[1], compile=False)
print(rss() - before)
"""


def load_rss_bytes(model_file):
    """Resident memory a fresh Python process gains by loading `model_file` (bytes)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, os.fspath(model_file)],
                          capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise RuntimeError(f"loading {model_file} in a new process failed: {done.stderr[-500:]}")
    return int(done.stdout.split()[-1])


def _check_fraction(name, value, low_open=True):
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"--{name} must be a number in {interval}. Received: {value!r}")


def top_experts(usage, fraction, k=None):
    """Per layer, the `max(1, round(fraction * E))` most used experts, in index order.

    Ties go to the lower index. Example:

    >>> top_experts({"moe": [0.1, 0.4, 0.2, 0.3]}, 0.5)
    {'moe': [1, 3]}
    """
    out = {}
    for name, share in usage.items():
        share = np.asarray(share, np.float64)
        n = max(1, int(round(fraction * share.size)))
        out[name] = sorted(int(e) for e in np.argsort(-share, kind="stable")[:n])
    return out


def select(run_dir, data, keep=0.25, out=None, **options):
    """Keep the `keep` fraction of experts that the documents of `data` use most.

    Args:
        run_dir: a language-model or translation run.
        data: the domain's text (documents: see `runs`).
        keep: float in (0, 1].
        out: the new run directory (must not exist, or be empty).
        **options: see `_operate` (`target`, `max_documents`, `eval_data`,
            `eval_target`, `measure_rss`, `quiet`).

    Returns:
        The report (also `out/experts.json`).
    """
    _check_fraction("keep", keep)

    def check(run):
        # Before any routing: a subset smaller than k is refused at once.
        for layer in find_moe_layers(run.model):
            n = max(1, int(round(keep * layer.num_experts)))
            if n < layer.k:
                raise ValueError(
                    f"--keep {keep} keeps {n} of the {layer.num_experts} experts of layer "
                    f"{layer.name!r}, which routes each token to k={layer.k}; keep at least "
                    f"{layer.k / layer.num_experts:.3g}")

    def transform(run, sample, usage):
        kept = top_experts(usage, keep)
        return surgery.subset_model(run.model, kept), {"kept": kept}

    return _operate("select", run_dir, data, out, transform, {"keep": keep}, check=check,
                    **options)


def prune(run_dir, data, threshold, out=None, **options):
    """Remove the experts whose usage share on the documents is under `threshold`."""
    _check_fraction("threshold", threshold, low_open=False)

    def transform(run, sample, usage):
        model, kept = pruning.prune_model(run.model, usage, threshold)
        return model, {"kept": kept}

    return _operate("prune", run_dir, data, out, transform, {"threshold": threshold}, **options)


def merge(run_dir, data, similarity=0.9, mode="average", gate="busier", out=None, **options):
    """Merge the experts whose outputs on the documents' rows are near-duplicates."""
    if isinstance(similarity, bool) or not isinstance(similarity, (int, float)) or not (
            -1 <= similarity <= 1):
        raise ValueError(f"--similarity must be a number in [-1, 1]. Received: {similarity!r}")
    if mode not in merging.MERGE_MODES:
        raise ValueError(f"--mode must be one of {', '.join(merging.MERGE_MODES)}. "
                         f"Received: {mode!r}")
    if gate not in merging.GATE_MODES:
        raise ValueError(f"--gate must be one of {', '.join(merging.GATE_MODES)}. "
                         f"Received: {gate!r}")

    def transform(run, sample, usage):
        rows = runs.sample_rows(run, sample)
        model, clusters = merging.merge_model(run.model, rows, usage, similarity, mode, gate)
        merged = {name: [c for c in groups if len(c) > 1] for name, groups in clusters.items()}
        return model, {"clusters": clusters, "merged": merged}

    settings = {"similarity": similarity, "mode": mode, "gate": gate}
    return _operate("merge", run_dir, data, out, transform, settings, **options)


def _operate(command, run_dir, data, out, transform, settings, target=None, max_documents=100,
             eval_data=None, eval_target=None, measure_rss=False, quiet=False, check=None):
    """Load, measure, `transform(run, sample, usage) -> (model, details)`, save, measure."""
    if out is None:
        raise ValueError("--out: name the new run directory")
    runs.check_out(out)
    run = runs.load(run_dir)
    if check is not None:
        check(run)
    sample = runs.read_sample(run, data, target, max_documents)
    evaluation = sample
    if eval_data is not None:
        evaluation = runs.read_sample(run, eval_data, eval_target, max_documents=10**9,
                                      target_flag="--eval-target")
    measured = runs.measure(run, run.model, sample)
    before = measured if evaluation is sample else runs.measure(run, run.model, evaluation)
    usage = measured["usage"]
    model, details = transform(run, sample, usage)
    written = runs.save_run(run, model, out)
    reloaded = runs.load(written.path)
    after = runs.measure(reloaded, reloaded.model, evaluation)
    report = {
        "command": command,
        "run_dir": os.fspath(run_dir),
        "out": written.path,
        "kind": run.kind,
        "data": os.fspath(data),
        "documents": sample.documents,
        "settings": settings,
        "usage": usage,
        **details,
        "before": _quality(before, run.model, run.model_path),
        "after": _quality(after, reloaded.model, reloaded.model_path),
    }
    # The run's model.keras also holds the optimizer's slots; the same model
    # saved as the new file is (weights only) is the like-for-like size.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        run.model.save(path)
        report["before"]["file_bytes_weights_only"] = os.path.getsize(path)
    if measure_rss:
        report["before"]["rss_bytes"] = load_rss_bytes(run.model_path)
        report["after"]["rss_bytes"] = load_rss_bytes(reloaded.model_path)
    report["table"] = format_table(report)
    with open(os.path.join(written.path, "experts.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    if not quiet:
        print(report["table"])
    return report


def _quality(measured, model, model_path):
    layers = find_moe_layers(model)
    out = {key: measured[key] for key in ("perplexity", "bleu") if key in measured}
    return {
        **out,
        "experts": {layer.name: layer.num_experts for layer in layers},
        "model_file": os.fspath(model_path),
        "file_bytes": os.path.getsize(model_path),
        "weight_bytes": surgery.weight_bytes(model),
    }


def _megabytes(value):
    return f"{value / 2**20:.2f} MiB"


def _change(before, after):
    if not before:
        return ""
    return f"{100.0 * (after - before) / before:+.1f}%"


def format_table(report):
    """The before/after table of a report, as printed."""
    b, a = report["before"], report["after"]
    rows = []
    for key, label in (("perplexity", "perplexity"), ("bleu", "BLEU")):
        if key in b and key in a:
            rows.append((label, f"{b[key]:.3f}", f"{a[key]:.3f}", _change(b[key], a[key])))
    for name in b["experts"]:
        rows.append((f"experts ({name})", str(b["experts"][name]), str(a["experts"][name]),
                     _change(b["experts"][name], a["experts"][name])))
    # The new file holds weights only: it is compared with the run's file
    # and with the run's model saved the same way.
    for key, label, new_key in (
        ("file_bytes", "model.keras", "file_bytes"),
        ("file_bytes_weights_only", "model.keras, weights only", "file_bytes"),
        ("weight_bytes", "weights in memory", "weight_bytes"),
        ("rss_bytes", "RSS at load", "rss_bytes"),
    ):
        if key in b and new_key in a:
            rows.append((label, _megabytes(b[key]), _megabytes(a[new_key]),
                         _change(b[key], a[new_key])))
    header = ("", "full", report["command"], "change")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    lines = [f"keras-moe experts {report['command']}: {report['run_dir']} -> {report['out']} "
             f"({report['documents']} documents of {report['data']})"]
    for row in [header, *rows]:
        lines.append("  ".join(
            str(v).ljust(w) if i == 0 else str(v).rjust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


__all__ = ["format_table", "load_rss_bytes", "merge", "prune", "select", "top_experts"]
