"""`keras-moe experts ...`: argparse setup and the handler (registered by pipelines/cli.py).

`add_parser(subparsers)` adds the `experts` command with `select`,
`prune`, `merge` and `heatmap`; `run(args)` calls the library
(`pipelines/experts/commands.py`, `pipelines/experts/heatmap.py`) and lets
its `FileNotFoundError` / `ValueError` / `ImportError` reach `cli.main`,
which prints one line and exits 2. Library imports happen in `run`, so
`keras-moe --help` does not load TensorFlow.
"""

import argparse


def _fraction(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _add_common(parser):
    parser.add_argument("--run-dir", required=True,
                        help="a finished language-model or translation run directory")
    parser.add_argument(
        "--data", required=True,
        help="the domain's UTF-8 text: documents are blank-line-separated groups of lines, "
        "or single lines when the file has no blank line (translation runs: the source side)")
    parser.add_argument(
        "--target", default=None,
        help="translation runs: the line-aligned target side of --data (required there)")
    parser.add_argument("--out", required=True,
                        help="the new run directory to write (must not exist or be empty)")
    parser.add_argument("--max-documents", type=_positive_int, default=100,
                        help="documents of --data routed (default: 100)")
    parser.add_argument(
        "--eval-data", default=None,
        help="text on which quality is measured before and after (default: the documents "
        "of --data)")
    parser.add_argument("--eval-target", default=None,
                        help="translation runs: the target side of --eval-data")
    parser.add_argument(
        "--measure-rss", action="store_true",
        help="also measure the resident memory a fresh process gains by loading each "
        "model.keras (two extra Python processes)")


def add_parser(subparsers):
    """Add `experts select|prune|merge|heatmap` to the `keras-moe` subparsers."""
    experts = subparsers.add_parser(
        "experts",
        help="deployable expert subsets, pruning and merging of a trained run's experts, "
        "and the expert x domain heat map (docs/experts.md)")
    sub = experts.add_subparsers(dest="experts_command", required=True)
    select = sub.add_parser(
        "select", help="keep the fraction of experts a domain uses most; write a smaller run")
    _add_common(select)
    select.add_argument("--keep", type=_fraction, default=0.25,
                        help="fraction of each MoE layer's experts kept, in (0, 1] "
                        "(default: 0.25)")
    prune = sub.add_parser(
        "prune", help="remove the experts whose usage share is under a threshold")
    _add_common(prune)
    prune.add_argument("--threshold", type=_fraction, required=True,
                       help="minimum share of the routed (token, expert) pairs an expert "
                       "keeps, in [0, 1] (e.g. 0.01)")
    merge = sub.add_parser(
        "merge", help="merge experts whose outputs on the documents are near-duplicates")
    _add_common(merge)
    merge.add_argument("--similarity", type=_fraction, default=0.9,
                       help="cosine similarity of two experts' outputs at which they merge, "
                       "in [-1, 1] (default: 0.9)")
    merge.add_argument("--mode", default="average", choices=("average", "busier"),
                       help="merged weights: the members' mean, or the busier member's "
                       "(default: average)")
    merge.add_argument("--gate", default="busier", choices=("busier", "mean"),
                       help="merged gate column: the busier member's, or the mean "
                       "(default: busier)")
    heatmap = sub.add_parser(
        "heatmap", help="PNG and HTML heat map of each domain's share per expert")
    heatmap.add_argument("--run-dir", required=True, help="a language-model or translation run")
    heatmap.add_argument("--domain", dest="domains", action="append", default=[],
                         metavar="NAME=FILE", required=True,
                         help="a domain and its text file (repeatable)")
    heatmap.add_argument("--out", required=True, help="directory for the PNG, HTML and JSON")
    heatmap.add_argument("--max-documents", type=_positive_int, default=100,
                         help="documents per domain (default: 100)")
    heatmap.add_argument("--layer", default=None, help="one MoE layer by name (default: all)")
    return experts


def run(args):
    """`keras-moe experts ...`: call the library; it prints its table."""
    command = args.experts_command
    if command == "heatmap":
        from keras_moe.pipelines.experts.heatmap import heatmap

        heatmap(args.run_dir, args.domains, args.out, args.max_documents, args.layer)
        return
    from keras_moe.pipelines.experts import commands

    options = dict(target=args.target, max_documents=args.max_documents,
                   eval_data=args.eval_data, eval_target=args.eval_target,
                   measure_rss=args.measure_rss, out=args.out)
    if command == "select":
        commands.select(args.run_dir, args.data, keep=args.keep, **options)
    elif command == "prune":
        commands.prune(args.run_dir, args.data, threshold=args.threshold, **options)
    else:
        commands.merge(args.run_dir, args.data, similarity=args.similarity, mode=args.mode,
                       gate=args.gate, **options)
