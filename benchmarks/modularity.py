"""Issue 27's experiment: domain expert subsets, pruning, merging and k' of two LM runs.

Given a standard MoE language-model run (`--standard`) and the same model
trained with document pools (`--pooled`), and a multi-domain directory
(`--domains DIR`: `valid.txt`, and per domain `valid/<domain>.select.txt`,
at most 100 held-out documents, and `valid/<domain>.eval.txt`, other
held-out documents), this measures for each model:

1. per domain: each expert's usage share on the domain's select documents
   and the full model's perplexity on `<domain>.eval.txt`; per keep
   fraction `f` (`--keep`), the subset that keeps the `f` most used experts
   (`commands.top_experts`, `keras_moe.surgery.subset_model`), written as
   the run `WORK/<model>-<domain>-<f>`, its perplexity on the eval text and
   the relative change `(subset - full) / full`, its `model.keras` and
   weight bytes, and for `--rss-domain` the resident memory at load;
2. the expert x domain heat map of those usage shares
   (`experts.heatmap.draw_png`, rows in `domains.expert_order`), copied to
   `--images/modularity-heatmap-<model>.png`, and the cluster metrics below;
3. for the standard model (both with `--prune-pooled`): pruning by usage
   (`pruning.prune_model` per `--prune-threshold`) and merging
   (`merging.merge_model`, mode average, gate busier, per
   `--merge-similarity`), with the usage of all domains' select documents
   together (`WORK/all.select.txt`), the perplexity on the mixed text
   before and after and the experts left;
4. inference-time k: per `k'` in `--k`, the perplexity and tokens/s on the
   mixed text (`lm.train.evaluate(..., k=k')`, what `keras-moe lm evaluate
   --k` prints; each call loads the run, so its compiled step has `k'`).

Each step is what `keras-moe experts select|prune|merge` does (the same
`runs.measure`, `runs.save_run` and surgery calls, so `experts select
--run-dir R --data <domain>.select.txt --keep f --eval-data
<domain>.eval.txt` reports the same figures), but on one loaded run per
model: the usage pass and the full model's eval pass of a domain are made
once for all keep fractions, and the usage of all select documents and the
full model's mixed-text pass once for all prune and merge settings. The
heat map is drawn from the usage shares of the select pass (the
`experts heatmap` command routes the same documents line by line instead,
which can move a few pairs).

Documents. For a run trained with `data.document_rows` every document is
followed by a blank line, so no evaluation window crosses two documents
(as `keras-moe lm evaluate` reads the files, and as `runs.read_sample`,
which the `experts` commands use, reads them for such a run).

The mixed text is `DIR/valid.txt`, or with `--mixed-max-words N` (the
default) an evenly spaced sample of its documents of about N words,
written to `WORK/valid.mixed.txt` (blank lines between documents).

The cluster metrics, the targets and the printed summary are in
`benchmarks/modularity_report.py`.

Time. Full-softmax evaluation passes dominate: per model and domain, one
over the select documents and `1 + len(--keep)` over the eval text; then
the mixed text `len(--k)` times, and for pruning and merging once over all
select documents and `1 + settings` times over the mixed text. Each new
model (subset, pruned, merged, k') also traces its evaluation step once,
and `--rss-domain` starts three fresh Python processes. Measured on the
shared 2-core machine under a load of about 6: a 64-expert width-128 model
with a 32k vocabulary, 2 domains (select 110k and 42k words, eval 41k and
28k words, mixed 69k words), both models and the default settings took
8 minutes (usage pass plus full eval ~60 s for the Gutenberg domain, each
subset ~15 s, all-select usage ~80 s, each k' ~19 s); six domains take
about 20-25 minutes so, less on an idle machine.

Usage:
    python benchmarks/modularity.py --standard runs/std --pooled runs/pool --domains data/md \\
        [--keep 0.25 0.125] [--k 1 2 4] [--work runs/modularity] \\
        [--json benchmarks/results/modularity.json] [--images docs/images]
"""

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_MOE_QUIET_START", "1")  # no C++ start-up lines (keras_moe/_startup.py)

import numpy as np  # noqa: E402

from keras_moe import merging, pruning, surgery  # noqa: E402
from keras_moe.monitoring import find_moe_layers  # noqa: E402
from keras_moe.pipelines.experts import commands, runs  # noqa: E402
from keras_moe.pipelines.experts import heatmap as heatmap_lib  # noqa: E402
from keras_moe.pipelines.inspection import domains as domains_lib  # noqa: E402
from keras_moe.pipelines.inspection.domains import read_documents  # noqa: E402
from keras_moe.pipelines.lm import train as lm_train  # noqa: E402


def _report_module():
    path = pathlib.Path(__file__).with_name("modularity_report.py")
    spec = importlib.util.spec_from_file_location("modularity_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _report_module()

DOMAINS = ("gutenberg", "wikipedia", "ptb", "multi30k", "bible", "gettext")
MODELS = ("standard", "pooled")
NOTE = ("measured on a shared 2-core machine under load from other jobs: tokens/s and "
        "seconds are indicative; perplexities and sizes are not affected")


# --- the experiment ---------------------------------------------------------------------------


class Progress:
    """Progress lines with the elapsed time, to stderr."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message):
        print(f"[modularity {time.perf_counter() - self.start:7.1f} s] {message}",
              file=sys.stderr, flush=True)

    def elapsed(self):
        return time.perf_counter() - self.start


def domain_files(directory, names):
    """`{domain: (select file, eval file)}`; FileNotFoundError naming the missing file."""
    files = {}
    for name in names:
        pair = tuple(os.path.join(directory, "valid", f"{name}.{part}.txt")
                     for part in ("select", "eval"))
        for path in pair:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--domains {directory}: no file {path}")
        files[name] = pair
    return files


def write_documents(path, documents):
    """One line per line of a document, one blank line after each document."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join("".join(line + "\n" for line in doc) + "\n" for doc in documents))
    return path


def read_sample(run, path, max_documents=10**9):
    """The first documents of `path` as the `runs.Sample` that `runs.measure` evaluates.

    A run trained with `data.document_rows` sees a blank line after each
    document, so no evaluation window crosses two documents, as in
    `keras-moe lm evaluate`; otherwise the documents' lines in order
    (`runs.read_sample`).
    """
    documents = read_documents(path, max_documents)
    if getattr(run.config.data, "document_rows", False):
        return runs.Sample(len(documents), lines=[x for doc in documents for x in [*doc, ""]])
    return runs.read_sample(run, path, max_documents=max_documents)


def mixed_text(valid, out, max_words):
    """`valid`, or an evenly spaced sample of its documents of about `max_words` words."""
    if not max_words:
        return valid, None
    documents = read_documents(valid, max_documents=10**9)
    words = [sum(len(line.split()) for line in doc) for doc in documents]
    total = sum(words)
    step = max(1, int(np.ceil(total / max_words))) if total > max_words else 1
    chosen = documents[::step]
    write_documents(out, chosen)
    return out, {"documents": len(chosen), "of_documents": len(documents),
                 "words": sum(words[::step]), "of_words": total}


def _guarded(progress, what, call, *args, **kwargs):
    """`call(*args, **kwargs)`, or `{"error": message}` when the library refuses it."""
    try:
        return call(*args, **kwargs)
    except ValueError as error:
        progress(f"{what}: refused: {error}")
        return {"error": str(error)}


def _sizes(model, model_path=None):
    out = {"weight_bytes": surgery.weight_bytes(model)}
    if model_path is not None:
        out["file_bytes"] = os.path.getsize(model_path)
    return out


def load_model_run(run_dir, rss):
    """The loaded run and its facts: experts, k, pool settings, sizes (and RSS at load)."""
    run = runs.load(run_dir)
    layers = find_moe_layers(run.model)
    info = {
        "run_dir": os.fspath(run_dir),
        "experts": layers[0].num_experts if layers else 0,
        "k": layers[0].k if layers else None,
        "moe_layers": [layer.name for layer in layers],
        "pool_size": getattr(run.config.model, "pool_size", None),
        "pool_size_range": getattr(run.config.model, "pool_size_range", None),
        "sizes": _sizes(run.model, run.model_path),
    }
    # The run's file also holds the optimizer's slots; saved like a subset is
    # (weights only) is the like-for-like size, as `experts select` reports.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        run.model.save(path)
        info["sizes"]["file_bytes_weights_only"] = os.path.getsize(path)
    if rss:
        info["sizes"]["rss_bytes"] = commands.load_rss_bytes(run.model_path)
    return run, info


def _save_and_measure(run, model, where, evaluation):
    """Write `model` as the run directory `where`; its quality on `evaluation`, its sizes."""
    written = runs.save_run(run, model, where)
    measured = runs.measure(run, model, evaluation)
    return written, measured


def subsets(name, run, info, files, args, progress):
    """Per domain: usage on its select documents, full and subset perplexity, sizes."""
    out = {}
    for domain, (select_file, eval_file) in files.items():
        progress(f"{name}: {domain}: usage on the select documents, full model on the eval text")
        sample = read_sample(run, select_file, args.max_documents)
        evaluation = read_sample(run, eval_file)
        usage = runs.measure(run, run.model, sample)
        full = runs.measure(run, run.model, evaluation)
        entry = {"documents": sample.documents, "select_tokens": usage["tokens"],
                 "usage": usage["usage"],
                 "full": {key: full[key] for key in ("perplexity", "tokens", "words")},
                 "keep": {}}
        for fraction in args.keep:
            where = os.path.join(args.work, f"{name}-{domain}-{fraction:g}")
            kept = commands.top_experts(usage["usage"], fraction)
            model = _guarded(progress, f"{name} {domain} keep {fraction:g}",
                             surgery.subset_model, run.model, kept)
            if isinstance(model, dict):
                entry["keep"][f"{fraction:g}"] = model
                continue
            written, after = _save_and_measure(run, model, where, evaluation)
            change = (after["perplexity"] - full["perplexity"]) / full["perplexity"]
            entry["keep"][f"{fraction:g}"] = {
                "perplexity": after["perplexity"], "change": change, "kept": kept,
                "experts": {layer.name: layer.num_experts for layer in find_moe_layers(model)},
                "out": written.path, **_sizes(model, written.model_file)}
            if domain == args.rss_domain:
                entry["keep"][f"{fraction:g}"]["rss_bytes"] = commands.load_rss_bytes(
                    written.model_file)
            progress(f"{name}: {domain}: full {full['perplexity']:.2f}, keep {fraction:g} "
                     f"{after['perplexity']:.2f} ({100 * change:+.1f}%) -> {written.path}")
        out[domain] = entry
    return out


def inference_k(name, info, mixed, ks, progress):
    """Perplexity and tokens/s on the mixed text at the trained k and at each k'."""
    progress(f"{name}: mixed text at the trained k={info['k']}")
    trained = lm_train.evaluate(info["run_dir"], mixed)
    rows = []
    for k in ks:
        if k == info["k"]:
            result = trained
        else:
            progress(f"{name}: mixed text at k'={k}")
            result = _guarded(progress, f"{name} k'={k}", lm_train.evaluate, info["run_dir"],
                              mixed, k=k)
        if "error" in result:
            rows.append({"k": k, "error": result["error"]})
            continue
        rows.append({"k": k, "perplexity": result["perplexity"],
                     "change": (result["perplexity"] - trained["perplexity"])
                     / trained["perplexity"],
                     "tokens_per_second": result["tokens_per_second"],
                     "tokens": result["tokens"]})
    return {"trained_k": info["k"], "perplexity": trained["perplexity"],
            "words": trained["words"], "rows": rows}


def heat(name, domains, args):
    """Per MoE layer: the `[E][D]` shares, their heat map and the cluster metrics."""
    names = list(domains)
    layers = {}
    for index, layer in enumerate(next(iter(domains.values()))["usage"]):
        shares = np.asarray([domains[d]["usage"][layer] for d in names]).T
        order = domains_lib.expert_order(shares)
        png = os.path.join(args.work, f"heatmap-{name}-{layer}.png")
        heatmap_lib.draw_png(shares, order, names, png, f"{name}: expert x domain usage "
                             f"({layer})")
        layers[layer] = {**report.cluster_metrics(shares, names), "shares": shares.tolist(),
                         "order": order, "png": png}
        if args.images:
            os.makedirs(args.images, exist_ok=True)
            suffix = "" if index == 0 else f"-{layer}"
            target = os.path.join(args.images, f"modularity-heatmap-{name}{suffix}.png")
            shutil.copyfile(png, target)
            layers[layer]["image"] = target
    return {"layers": layers}


def prune_and_merge(name, run, all_select, documents, mixed, args, progress):
    """Prune at each threshold and merge at each similarity; before/after on the mixed text."""
    progress(f"{name}: usage on all select documents, full model on the mixed text")
    sample = read_sample(run, all_select, documents)
    evaluation = read_sample(run, mixed)
    usage = runs.measure(run, run.model, sample)["usage"]
    before = runs.measure(run, run.model, evaluation)
    rows_in = runs.sample_rows(run, sample) if args.merge_similarity else None
    experts = {layer.name: layer.num_experts for layer in find_moe_layers(run.model)}
    out = {"usage": usage, "before": before["perplexity"], "rows": []}
    settings = [("prune", t) for t in args.prune_threshold]
    settings += [("merge", s) for s in args.merge_similarity]
    for command, value in settings:
        where = os.path.join(args.work, f"{name}-{command}-{value:g}")
        if command == "prune":
            made = _guarded(progress, f"{name} prune {value:g}", pruning.prune_model,
                            run.model, usage, value)
        else:
            made = _guarded(progress, f"{name} merge {value:g}", merging.merge_model,
                            run.model, rows_in, usage, value, "average", "busier")
        row = {"command": command, "value": value}
        if isinstance(made, dict):
            out["rows"].append({**row, **made})
            continue
        model, details = made
        written, after = _save_and_measure(run, model, where, evaluation)
        row.update(before=before["perplexity"], after=after["perplexity"],
                   change=(after["perplexity"] - before["perplexity"]) / before["perplexity"],
                   experts_before=experts, out=written.path,
                   experts_after={layer.name: layer.num_experts
                                  for layer in find_moe_layers(model)},
                   **_sizes(model, written.model_file))
        row["kept" if command == "prune" else "clusters"] = details
        out["rows"].append(row)
        progress(f"{name}: {command} {value:g}: {before['perplexity']:.2f} -> "
                 f"{after['perplexity']:.2f}, experts {sum(experts.values())} -> "
                 f"{sum(row['experts_after'].values())}")
    return out


# --- main -------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--standard", required=True, help="the standard MoE LM run directory")
    parser.add_argument("--pooled", required=True, help="the document-pool MoE LM run directory")
    parser.add_argument("--domains", required=True,
                        help="directory with valid.txt and valid/<domain>.{select,eval}.txt")
    parser.add_argument("--domain-names", nargs="+", default=None,
                        help="domains (default: manifest.json's, else the six of issue 27)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.125])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-documents", type=int, default=100)
    parser.add_argument("--prune-threshold", type=float, nargs="+", default=[0.005, 0.01])
    parser.add_argument("--merge-similarity", type=float, nargs="+", default=[0.9, 0.8])
    parser.add_argument("--prune-pooled", action="store_true",
                        help="also prune and merge the pooled model")
    parser.add_argument("--mixed-max-words", type=int, default=100000,
                        help="evaluate on an evenly spaced sample of valid.txt's documents of "
                        "about this many words (0: all of valid.txt)")
    parser.add_argument("--work", default="runs/modularity",
                        help="directory for the subset runs (must not exist or be empty)")
    parser.add_argument("--json", default="benchmarks/results/modularity.json")
    parser.add_argument("--images", default="docs/images",
                        help="where the heat map PNGs are copied ('' for nowhere)")
    parser.add_argument("--rss-domain", default="gutenberg",
                        help="the domain whose subsets get RSS measured at load")
    args = parser.parse_args(argv)
    for f in args.keep:
        if not 0 < f <= 1:
            parser.error(f"--keep must be in (0, 1]. Received: {f}")
    return args


def domain_names(directory, names):
    if names:
        return list(names)
    manifest = os.path.join(directory, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            listed = json.load(f).get("domains")
        if isinstance(listed, dict):
            return list(listed)
        if isinstance(listed, list):
            return [d["name"] if isinstance(d, dict) else str(d) for d in listed]
    return list(DOMAINS)


def run(args):
    """The whole experiment; returns the result dict (also written to `args.json`)."""
    progress = Progress()
    commands_out = runs.check_out(args.work)  # refuse a used work directory at once
    names = domain_names(args.domains, args.domain_names)
    files = domain_files(args.domains, names)
    valid = os.path.join(args.domains, "valid.txt")
    if not os.path.isfile(valid):
        raise FileNotFoundError(f"--domains {args.domains}: no file {valid}")
    os.makedirs(commands_out, exist_ok=True)
    mixed, mixed_info = mixed_text(valid, os.path.join(args.work, "valid.mixed.txt"),
                                   args.mixed_max_words)
    # Every domain's select documents together: the usage for pruning and merging.
    all_select = os.path.join(args.work, "all.select.txt")
    selected = {d: read_documents(s, args.max_documents) for d, (s, _) in files.items()}
    documents = sum(len(docs) for docs in selected.values())
    write_documents(all_select, [doc for docs in selected.values() for doc in docs])
    result = {
        "benchmark": "modularity", "issue": 27, "note": NOTE,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {key: getattr(args, key) for key in (
            "standard", "pooled", "domains", "keep", "k", "max_documents", "prune_threshold",
            "merge_similarity", "prune_pooled", "mixed_max_words", "work", "rss_domain")},
        "domains": names, "mixed": {"path": mixed, **(mixed_info or {})},
        "all_select": {"path": all_select, "documents": documents},
        "models": {}, "seconds": {},
    }
    for name, run_dir in (("standard", args.standard), ("pooled", args.pooled)):
        started = progress.elapsed()
        progress(f"{name}: loading {run_dir}")
        run, model = load_model_run(run_dir, rss=args.rss_domain in names)
        model["domains"] = subsets(name, run, model, files, args, progress)
        model["heatmap"] = heat(name, model["domains"], args)
        if name == "standard" or args.prune_pooled:
            model["surgery"] = prune_and_merge(name, run, all_select, documents, mixed, args,
                                               progress)
        del run  # the k' evaluations load their own model
        model["inference_k"] = inference_k(name, model, mixed, args.k, progress)
        result["models"][name] = model
        result["seconds"][name] = progress.elapsed() - started
    result["seconds"]["total"] = progress.elapsed()
    result["targets"] = report.targets(result)
    result["summary"] = report.summary(result)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(result["summary"])
    progress(f"done; JSON: {args.json}")
    return result


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    # Later harmless native lines too (the LSTM mask's oneDNN notice): as the CLI.
    from keras_moe.pipelines.command import filter_native_log

    filter_native_log()
    main()
