"""The `keras-moe` command line: parses arguments and calls the library.

TensorFlow is imported only once the arguments are parsed and a command
runs (`--help` and argument errors answer at once), and its C++ start-up
chatter ("Could not find cuda drivers",
"failed call to cuInit", oneDNN notices) is silenced unless `--verbose`.
"""

import dataclasses
import sys

from keras_moe.pipelines import progress
from keras_moe.pipelines.command import CommandParser, ensure_environment, load_tensorflow


def _add_dataclass_flags(parser, cls):
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=field.type if field.type in (int, float, str) else str,
                            default=None, help=f"(default: {field.default!r})")


def _dataclass_from_args(cls, args):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if v is not None})


def _add_strategy_flags(parser):
    from keras_moe.pipelines.training.config import STRATEGIES

    parser.add_argument(
        "--strategy", choices=STRATEGIES, default=None,
        help="tf.distribute strategy (overrides train.strategy; default: the config's, "
        "'default'); see docs/lm.md",
    )
    parser.add_argument(
        "--expert-parallel", action="store_true", default=None,
        help="with --strategy mirrored: each replica holds num_experts / replicas experts "
        "(sets train.expert_parallel)",
    )
    parser.add_argument(
        "--cpu-devices", type=int, default=None, metavar="N",
        help="split the CPU into N logical devices first (mirrored then has N replicas on a "
        "machine without GPUs)",
    )


def _train_overrides(args):
    """`--set` overrides plus those of `--strategy` and `--expert-parallel` (which win)."""
    overrides = list(args.overrides)
    if args.strategy is not None:
        overrides.append(f"train.strategy={args.strategy}")
    if args.expert_parallel:
        overrides.append("train.expert_parallel=true")
    return overrides


def _split_cpu(args):
    """`--cpu-devices`: first thing in a train command, before TensorFlow starts."""
    if args.cpu_devices is not None:
        from keras_moe.pipelines.training import distribution

        distribution.split_cpu(args.cpu_devices)


def _train_progress(config):
    """`train.verbose: 0` silences the progress lines too."""
    if config.train.verbose == 0:
        progress.set_enabled(False)


def _train_strategy(config):
    """The run's strategy, made before anything else runs TensorFlow."""
    from keras_moe.pipelines.training import distribution

    return distribution.make_strategy(config.train.strategy)


RUN_DIR_HELP = "a run directory written by `train` (or the demo)"
BEAM_HELP = "beam width (default: the run's decode.beam_width; 1 is greedy)"
AVERAGE_HELP = "average the last N step checkpoints (default: the run's " \
    "decode.average_checkpoints; 0 or 1: the final weights)"


def build_parser():
    # Light modules only: `--help` must not wait for TensorFlow.
    from keras_moe.pipelines.lm.demo import DemoConfig
    from keras_moe.pipelines.translate.demo import TranslateDemoConfig

    parser = CommandParser(
        prog="keras-moe", top=True,
        description="Sparsely-gated Mixture-of-Experts models for Keras (Shazeer et al. 2017).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small MoE translation model on real text on this machine (its gettext "
        "catalogues by default) and report BLEU, perplexity and expert load",
    )
    _add_dataclass_flags(demo, TranslateDemoConfig)

    lm = sub.add_parser("lm", help="train and evaluate language models (Section 5.1, App. C)")
    lm_sub = lm.add_subparsers(dest="lm_command", required=True)
    lm_demo = lm_sub.add_parser(
        "demo",
        help="train a small MoE-LSTM language model on real text on this machine and report "
        "perplexity and expert load",
    )
    _add_dataclass_flags(lm_demo, DemoConfig)
    train = lm_sub.add_parser(
        "train", help="train a language model; a killed run resumes when started again"
    )
    train.add_argument("--config", help="YAML configuration file (see docs/lm.md)")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one configuration key, e.g. --set train.steps=100 (repeatable)",
    )
    train.add_argument("--run-dir", required=True, help="directory that receives the run")
    _add_strategy_flags(train)
    evaluate = lm_sub.add_parser(
        "evaluate", help="per-word perplexity of a trained run on a corpus, printed as JSON"
    )
    evaluate.add_argument("--run-dir", required=True, help=RUN_DIR_HELP)
    evaluate.add_argument("--data", required=True, help="file, glob or directory of text")
    evaluate.add_argument("--format", default=None, help="corpus format (default: the run's)")
    evaluate.add_argument("--k", type=int, default=None,
                          help="evaluate at k experts per position (default: the trained k)")
    evaluate.add_argument("--out", default=None, metavar="FILE",
                          help="also write the JSON to FILE (e.g. runs/RUN/wikipedia.json, which "
                          "benchmarks/gutenberg_results.py reads)")
    lm_sub.add_parser("presets", help="list the language-model presets with their costs")
    domains = lm_sub.add_parser(
        "domains", help="write the multi-domain corpus (Gutenberg, Wikipedia, PTB, Multi30k, "
        "Bible, gettext) as documents: train.txt, valid.txt, valid/<domain>.{select,eval}.txt, "
        "manifest.json (docs/lm.md)"
    )
    domains.add_argument("--out", required=True, help="folder that receives the corpus")
    domains.add_argument("--data-root", default="../shared/data",
                         help="the shared data folder (default: ../shared/data)")
    domains.add_argument("--seed", type=int, default=1, help="seeds every draw (default: 1)")
    domains.add_argument("--train-words", type=int, default=None, metavar="N",
                         help="training words of Gutenberg and of Wikipedia (default: 2,000,000 "
                         "each; the other domains take all of their training text)")
    domains.add_argument("--eval-words", type=int, default=40_000, metavar="N",
                         help="about N words in each valid/<domain>.eval.txt (default: 40,000)")

    _add_translate_parser(sub)
    _add_reproduce_parser(sub)
    from keras_moe.pipelines.experts import cli as experts_cli  # argparse only: cheap
    experts_cli.add_parser(sub)

    inspect = sub.add_parser(
        "inspect",
        help="how a trained run's MoE layers route a corpus: per-expert traffic and "
        "characteristic tokens, per-token experts, gates, logits and margins; tables on "
        "stdout and a self-contained HTML report",
    )
    inspect.add_argument("--run-dir", required=True, help=RUN_DIR_HELP)
    inspect.add_argument("--data", required=True, help="file, glob or directory of text")
    inspect.add_argument("--layer", default=None, help="one MoE layer by name (default: all)")
    inspect.add_argument(
        "--sentence", dest="sentences", action="append", default=[], metavar="TEXT",
        help="a sentence to report token by token (repeatable; default: the first 3 lines "
        "of --data)",
    )
    inspect.add_argument(
        "--out", default=None, help="HTML report path (default: <run-dir>/inspect.html)"
    )
    inspect.add_argument(
        "--max-lines", type=int, default=2000, help="lines of --data routed (default: 2000)"
    )
    inspect.add_argument("--domain", dest="domains", action="append", default=[],
                         metavar="NAME=FILE", help="a domain's text: report each expert's top "
                         "domains (repeatable; docs/experts.md)")

    compare = sub.add_parser(
        "compare",
        help="runs side by side from their run directories: validation curves by step, best "
        "evaluations, final scores, configuration differences; runs with the same label "
        "are a group (mean, standard deviation, count)",
    )
    compare.add_argument(
        "runs", nargs="+", metavar="[LABEL=]RUN_DIR",
        help="run directories, each optionally labelled (runs with one label form a group)",
    )
    compare.add_argument(
        "--metric", dest="metrics", action="append", default=[], metavar="NAME",
        help="a history.csv column, or elapsed_minutes (repeatable; default: val_bleu and "
        "val_perplexity where logged)",
    )
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return parser


def _add_translate_parser(sub):
    translate = sub.add_parser(
        "translate", help="train, evaluate, run and export translation models (Section 5.3, "
        "App. E)"
    )
    t_sub = translate.add_subparsers(dest="translate_command", required=True)
    train = t_sub.add_parser(
        "train", help="train a translation model; a killed run resumes when started again"
    )
    train.add_argument("--config", help="YAML configuration file (see docs/translation.md)")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one configuration key, e.g. --set train.steps=100 (repeatable)",
    )
    train.add_argument("--run-dir", required=True, help="directory that receives the run")
    _add_strategy_flags(train)
    evaluate = t_sub.add_parser(
        "evaluate", help="translate a test set and print BLEU (sacreBLEU, with signature), "
        "tokenized BLEU, chrF and perplexity as JSON; the hypotheses are written to a file"
    )
    evaluate.add_argument("--run-dir", required=True, help=RUN_DIR_HELP)
    evaluate.add_argument("--src", required=True, help="source file (text, .gz or .sgm)")
    evaluate.add_argument("--ref", dest="refs", action="append", required=True,
                          help="reference file (repeatable for several references)")
    evaluate.add_argument("--beam-width", type=int, default=None, help=BEAM_HELP)
    evaluate.add_argument("--average", type=int, default=None, metavar="N", help=AVERAGE_HELP)
    evaluate.add_argument("--out", default=None,
                          help="hypotheses file (default: <run-dir>/eval/<src name>.hyp)")
    evaluate.add_argument("--k", type=int, default=None,
                          help="evaluate at k experts per position (default: the trained k)")
    run = t_sub.add_parser("run", help="translate stdin or a file, one line per sentence")
    run.add_argument("--run-dir", required=True, help=RUN_DIR_HELP)
    run.add_argument("--input", default="-", help="file to translate (default: stdin)")
    run.add_argument("--beam-width", type=int, default=None, help=BEAM_HELP)
    export = t_sub.add_parser(
        "export", help="write a SavedModel that maps raw source strings to translations"
    )
    export.add_argument("--run-dir", required=True, help=RUN_DIR_HELP)
    export.add_argument("--out", required=True, help="new directory for the SavedModel")
    export.add_argument("--beam-width", type=int, default=None, help=BEAM_HELP)
    export.add_argument("--average", type=int, default=None, metavar="N", help=AVERAGE_HELP)
    score = t_sub.add_parser(
        "score", help="score any system's output file against references (JSON on stdout)"
    )
    score.add_argument("--hyp", required=True,
                       help="the system's output: one detokenized sentence per line")
    score.add_argument("--ref", dest="refs", action="append", required=True,
                       help="reference file, one line per --hyp line (repeatable for several "
                       "references)")
    score.add_argument("--target-language", default="de",
                       help="language of the hypotheses, for sacreBLEU's tokenizer (default: de)")
    t_sub.add_parser("presets", help="list the translation presets with their costs")


def _add_reproduce_parser(sub):
    reproduce = sub.add_parser(
        "reproduce", help="the paper's experiments (Tables 2, 3, 6, 7): list them, plan one "
        "(costs checked against the paper, batch, memory, time), run one into the ledger, "
        "report the ledger beside the paper (see docs/reproduce.md)"
    )
    r_sub = reproduce.add_subparsers(dest="reproduce_command", required=True)
    r_sub.add_parser("list", help="every experiment with the paper's figures, time and hardware")
    plan = r_sub.add_parser(
        "plan", help="costs against the paper's (exit 2 if they disagree by more than 2%%), "
        "batch per device and per expert, memory per device, steps, estimated time"
    )
    plan.add_argument("name", help="an experiment name (see `keras-moe reproduce list`)")
    plan.add_argument("--gpus", type=int, default=None,
                      help="devices to plan for (default: the experiment's assumed count)")
    plan.add_argument("--no-measure", dest="measure", action="store_false",
                      help="skip timing a scaled-down copy on this machine")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    overrides = dict(
        dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one configuration key, e.g. --set train.steps=100 (repeatable)",
    )
    plan.add_argument("--set", **overrides)
    run = r_sub.add_parser("run", help="train the experiment, then append its line to the ledger")
    run.add_argument("name", help="an experiment name (see `keras-moe reproduce list`)")
    run.add_argument("--run-dir", required=True, help="directory that receives the run")
    run.add_argument("--set", **overrides)
    run.add_argument("--ledger", default=None,
                     help="JSON-lines ledger (default: ledger.jsonl beside --run-dir)")
    report = r_sub.add_parser(
        "report", help="the ledger as a Markdown table beside the paper's figures, and an "
        "HTML page with a chart"
    )
    report.add_argument("--ledger", default="runs/reproduce/ledger.jsonl",
                        help="(default: runs/reproduce/ledger.jsonl)")
    report.add_argument("--out", default=None,
                        help="Markdown file (default: report.md beside the ledger); the HTML "
                        "page goes to the same name with .html")


def run_reproduce(args):
    """`keras-moe reproduce ...`: parse, call the library, print."""
    import json

    from keras_moe.pipelines.reproduce import plan as reproduce

    command = args.reproduce_command
    if command == "list":
        print(reproduce.format_list())
    elif command == "plan":
        result = reproduce.plan(args.name, gpus=args.gpus, overrides=args.overrides,
                                measure=args.measure)
        print(json.dumps(result, indent=2) if args.json else reproduce.format_plan(result))
        reproduce.check_plan(result)
    elif command == "run":
        entry = reproduce.run(args.name, args.run_dir, args.overrides, args.ledger)
        print(json.dumps(entry, indent=2))
    else:
        from keras_moe.pipelines.reproduce import ledger

        text, md_path, html_path = ledger.write_report(args.ledger, args.out)
        print(text)
        print(f"written: {md_path}, {html_path}")


def run_translate(args):
    """`keras-moe translate ...`: parse, call the library, print."""
    import json

    command = args.translate_command
    if command != "presets":
        from keras_moe.pipelines.translate import train as translate_train
    if command == "train":
        _split_cpu(args)
        from keras_moe.pipelines.config import load_config
        from keras_moe.pipelines.translate.config import TranslateConfig

        config = load_config(TranslateConfig, args.config, _train_overrides(args))
        _train_progress(config)
        results = translate_train.train(config, args.run_dir, _train_strategy(config))
        summary = {"run_dir": args.run_dir}
        if results.get("chief") is False:
            summary.update(results)
        for split in ("valid", "test"):
            if split in results:
                summary[split] = {k: results[split][k] for k in (
                    "bleu", "bleu_signature", "chrf", "perplexity", "truncated",
                    "hypotheses_file") if k in results[split]}
        print(json.dumps(summary, indent=2))
    elif command == "evaluate":
        print(json.dumps(translate_train.evaluate(
            args.run_dir, args.src, args.refs, args.beam_width, args.average, args.out, args.k),
            indent=2))
    elif command == "run":
        stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        with stream:
            for line in translate_train.run(args.run_dir, stream, args.beam_width):
                print(line, flush=True)
    elif command == "export":
        path = translate_train.export(args.run_dir, args.out, args.beam_width, args.average)
        print(json.dumps({"export_dir": path}))
    elif command == "score":
        from keras_moe.pipelines.translate.scoring import score_files

        print(json.dumps(score_files(args.hyp, args.refs, target_language=args.target_language),
                         indent=2))
    else:
        from keras_moe.models import translation_presets

        for name in translation_presets.preset_names():
            costs = translation_presets.costs(name)
            print(
                f"{name:18s} ops/timestep {costs['ops_per_timestep'] / 1e6:7.2f}M   "
                f"params without embedding and softmax {costs['params'] / 1e6:8.2f}M"
            )


def run_lm(args):
    """`keras-moe lm ...`: parse, call the library, print."""
    import json

    if args.lm_command == "domains":
        from keras_moe.pipelines.data.domain_corpus import build_domain_corpus

        manifest = build_domain_corpus(args.out, args.data_root, seed=args.seed,
                                       train_words=args.train_words, eval_words=args.eval_words)
        print(json.dumps({"out": args.out, **manifest["total"], "skipped": manifest["skipped"],
                          "seconds": manifest["seconds"]}, indent=2))
        return
    if args.lm_command not in ("demo", "presets"):
        from keras_moe.pipelines.lm import train as lm_train
    if args.lm_command == "demo":
        from keras_moe.pipelines.lm.demo import DemoConfig, run_demo

        run_demo(_dataclass_from_args(DemoConfig, args))
    elif args.lm_command == "train":
        _split_cpu(args)
        from keras_moe.pipelines.config import load_config
        from keras_moe.pipelines.lm.config import LMConfig

        config = load_config(LMConfig, args.config, _train_overrides(args))
        _train_progress(config)
        results = lm_train.train(config, args.run_dir, _train_strategy(config))
        summary = {"run_dir": args.run_dir}
        summary.update({"valid": results["valid"]} if "valid" in results else results)
        print(json.dumps(summary, indent=2))
    elif args.lm_command == "evaluate":
        text = json.dumps(lm_train.evaluate(args.run_dir, args.data, args.format, args.k), indent=2)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        print(text)
    else:
        from keras_moe.models import presets

        for name in presets.preset_names():
            costs = presets.costs(name)
            print(
                f"{name:16s} ops/timestep {costs['ops_per_timestep'] / 1e6:6.2f}M   "
                f"params without embedding and softmax {costs['params'] / 1e6:8.2f}M "
                f"({costs['params_without_biases'] / 1e6:.1f}M without biases)"
            )


def run_inspect(args):
    """`keras-moe inspect ...`: the library prints the tables and writes the report."""
    from keras_moe.pipelines.inspection.report import inspect_run

    inspect_run(
        args.run_dir, args.data, sentences=args.sentences, layer=args.layer, out=args.out,
        max_lines=args.max_lines, domains=args.domains,
    )


def run_compare(args):
    """`keras-moe compare ...`: the library reads the runs; Markdown or JSON on stdout."""
    import json

    from keras_moe.pipelines.compare import compare, markdown

    comparison = compare(args.runs, metrics=args.metrics)
    if args.json:
        print(json.dumps(comparison, indent=2))
    else:
        print(markdown(comparison), end="")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_environment(argv)
    args = build_parser().parse_args(argv)
    if args.quiet:
        progress.set_enabled(False)
    # Every command past this point uses TensorFlow (the preset tables too:
    # their costs read the model classes' defaults).
    load_tensorflow(args.verbose)
    try:
        if args.command == "demo":
            from keras_moe.pipelines.translate.demo import TranslateDemoConfig, run_translate_demo

            run_translate_demo(_dataclass_from_args(TranslateDemoConfig, args))
        elif args.command == "lm":
            run_lm(args)
        elif args.command == "translate":
            run_translate(args)
        elif args.command == "inspect":
            run_inspect(args)
        elif args.command == "compare":
            run_compare(args)
        elif args.command == "reproduce":
            run_reproduce(args)
        elif args.command == "experts":
            from keras_moe.pipelines.experts.cli import run as run_experts
            run_experts(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, RuntimeError) as error:
        print(f"keras-moe {_command_name(args)}: error: {error}", file=sys.stderr)
        # A run that trained but failed (training/guards.py) has its own code.
        return getattr(error, "exit_code", 2)
    except KeyboardInterrupt:
        # Ctrl-C: one line instead of TensorFlow's traceback. Nothing is
        # lost that a resume needs: a training run's state on disk is its
        # last evaluation's backup, written atomically.
        name = _command_name(args)
        message = f"keras-moe {name}: interrupted"
        if getattr(args, "run_dir", None) and name.endswith(" train"):
            message += (f"; the same command resumes {args.run_dir} from its last evaluation "
                        "(or starts it again if it made none)")
        print(message, file=sys.stderr)
        return INTERRUPTED
    return 0


# The shell's code for a command ended by SIGINT (128 + 2).
INTERRUPTED = 130


def _command_name(args):
    sub = next((getattr(args, a) for a in ("lm_command", "translate_command",
                "reproduce_command") if getattr(args, a, None)), None)
    return " ".join(a for a in (args.command, sub) if a)


if __name__ == "__main__":
    sys.exit(main())
