"""`keras-moe demo` (the README's `make demo`): train a small MoE translation model on real text.

The built-in default corpus is the machine's own gettext message
catalogues (`/usr/share/locale/<lang>/LC_MESSAGES/*.mo`, read with Python's
`gettext` module): English messages and their German translations,
written by people, that every Debian-like machine has (about 54k pairs on
this kind of machine). They are split deterministically into
train/valid/test by a hash of the English message and written to
`run_dir/data/` as plain parallel files, so the run can be repeated or
extended with `keras-moe translate train --config run_dir/config.yaml`.

`--data DIR` uses a directory of parallel files instead (`train.<src>`,
`train.<tgt>`, `val|valid|dev.<lang>`, `test*.<lang>`, e.g. Multi30k), and
`--tfds NAME` a prepared TFDS translation dataset (`wmt14_translate/de-en`).

The demo trains with `keras_moe.pipelines.translate.train.train` for a
wall-time budget (`--minutes`), then reports BLEU on the test split
(sacreBLEU, detokenized, with its signature), chrF, perplexity and the
load of every expert, and leaves the run directory and TensorBoard logs.
"""

import dataclasses
import glob
import os
import time

import numpy as np

from keras_moe.pipelines import progress
from keras_moe.pipelines.data import corpora, parallel_corpora
from keras_moe.pipelines.translate.config import (
    CorpusConfig,
    DataConfig,
    DecodeConfig,
    ModelConfig,
    TrainConfig,
    TranslateConfig,
)


@dataclasses.dataclass
class TranslateDemoConfig:
    data: str = ""  # a directory of parallel files; empty: the gettext catalogues
    tfds: str = ""  # a prepared TFDS translation dataset, e.g. wmt14_translate/de-en
    source_language: str = "en"
    target_language: str = "de"
    run_dir: str = "runs/demo"
    minutes: float = 4.0  # training wall time
    preset: str = "cpu-gnmt-moe-16"
    model_dim: int = 128
    expert_hidden_dim: int = 128
    vocab_size: int = 6000
    max_length: int = 30  # words per side of a training pair
    batch_tokens: int = 2048
    dropout: float = 0.1  # a few minutes of training: little to regularise
    learning_rate: float = 0.003
    steps_per_eval: int = 250
    eval_sentences: int = 400  # valid and test sentences scored (the first N)
    beam_width: int = 4
    gettext_root: str = corpora.GETTEXT_ROOT
    seed: int = 1

    def __post_init__(self):
        if self.data and self.tfds:
            raise ValueError("choose one of `data` and `tfds`")
        if self.minutes <= 0:
            raise ValueError(f"`minutes` must be > 0. Received: minutes={self.minutes!r}")
        if self.eval_sentences < 1:
            raise ValueError(
                f"`eval_sentences` must be >= 1. Received: eval_sentences={self.eval_sentences!r}"
            )


def _write_pairs(pairs, prefix, source_language, target_language):
    paths = {}
    for side, language in enumerate((source_language, target_language)):
        paths[language] = f"{prefix}.{language}"
        with open(paths[language], "w", encoding="utf-8") as f:
            f.write("".join(pair[side] + "\n" for pair in pairs))
    return CorpusConfig(source=paths[source_language], target=paths[target_language])


def _gettext_parts(config, data_dir):
    src, tgt = config.source_language, config.target_language
    if "en" not in (src, tgt):
        raise ValueError("the gettext catalogues pair English with another language; "
                         f"source_language or target_language must be 'en'. Received: {src}->{tgt}")
    language = tgt if src == "en" else src
    pairs, skipped = corpora.gettext_pairs(language, config.gettext_root)
    if not pairs:
        raise FileNotFoundError(
            f"no gettext message catalogues found in {config.gettext_root}/{language}/"
            "LC_MESSAGES/*.mo on this machine. Point the demo at other parallel text: "
            "`keras-moe demo --data DIR` (train.en/train.de, val.en/val.de, test.en/test.de; "
            "e.g. Multi30k) or `keras-moe demo --tfds wmt14_translate/de-en` (a prepared "
            "TFDS dataset)"
        )
    # Messages may span lines: one line per side.
    pairs = [(" ".join(s.split()), " ".join(t.split())) for s, t in pairs]
    if src != "en":
        pairs = [(t, s) for s, t in pairs]
    train, valid, test = corpora.split_deterministic(pairs)
    os.makedirs(data_dir, exist_ok=True)
    n = config.eval_sentences
    where = f"gettext catalogues {config.gettext_root}/{language}/LC_MESSAGES/*.mo"
    if skipped:
        where += f" ({skipped} unreadable catalogues skipped)"
    return (
        _write_pairs(train, os.path.join(data_dir, "train"), src, tgt),
        _write_pairs(valid[:n], os.path.join(data_dir, "valid"), src, tgt),
        _write_pairs(test[:n], os.path.join(data_dir, "test"), src, tgt),
        f"{where}: {len(train)}/{len(valid)}/{len(test)} train/valid/test pairs",
    )


def _find(directory, stems, language):
    for stem in stems:
        found = sorted(glob.glob(os.path.join(directory, f"{stem}.{language}")))
        if found:
            return found[0]
    return None


def _directory_parts(config, data_dir):
    src, tgt = config.source_language, config.target_language
    found = {}
    for split, stems in (("train", ["train"]), ("valid", ["val", "valid", "dev"]),
                         ("test", ["test", "test*"])):
        paths = [_find(config.data, stems, lang) for lang in (src, tgt)]
        if None in paths:
            raise FileNotFoundError(
                f"{config.data}: no {split} files; expected {stems[0]}.{src} and "
                f"{stems[0]}.{tgt}"
            )
        found[split] = paths
    os.makedirs(data_dir, exist_ok=True)
    n = config.eval_sentences
    parts = [CorpusConfig(source=found["train"][0], target=found["train"][1])]
    for split in ("valid", "test"):
        lines = [parallel_corpora.read_sentences(p)[:n] for p in found[split]]
        parts.append(_write_pairs(list(zip(*lines, strict=True)),
                                  os.path.join(data_dir, split), src, tgt))
    return (*parts, f"parallel files in {config.data}")


def _tfds_parts(config):
    def part(split):
        return CorpusConfig(tfds=config.tfds, split=split)

    return part("train"), part("validation"), part("test"), f"TFDS {config.tfds}"


def demo_config(config, train, valid, test):
    """The `TranslateConfig` the demo trains."""
    steps = 1_000_000  # the wall-time budget ends the run
    return TranslateConfig(
        data=DataConfig(
            train=[train], valid=[valid], test=[test],
            source_language=config.source_language, target_language=config.target_language,
            vocab_size=config.vocab_size, vocab_max_words=8000, vocab_iterations=2,
            max_length=config.max_length, max_pieces=64,
            batch_tokens=config.batch_tokens, shuffle_buffer=20_000,
            valid_bleu_sentences=config.eval_sentences,
        ),
        model=ModelConfig(preset=config.preset, model_dim=config.model_dim,
                          expert_hidden_dim=config.expert_hidden_dim, dropout=config.dropout,
                          ffn_hidden_dim=4 * config.expert_hidden_dim
                          if "dense" in config.preset else None),
        train=TrainConfig(
            steps=steps, steps_per_eval=config.steps_per_eval,
            learning_rate=config.learning_rate, warmup_steps=200, hold_steps=1000,
            seed=config.seed, time_limit_minutes=config.minutes, verbose=1,
            monitor_every_n_steps=25,
        ),
        decode=DecodeConfig(beam_width=config.beam_width),
    )


def run_translate_demo(config):
    """Prepare the data, train, evaluate and print the report; returns the results dict."""
    # Here, not at the top: the command line builds its `--help` from
    # `TranslateDemoConfig` without waiting for TensorFlow.
    from keras_moe.pipelines.training.rundir import RunDir
    from keras_moe.pipelines.translate import train as translate_train

    started = time.time()
    run = RunDir(config.run_dir)
    data_dir = run.demo_data_dir
    if run.is_finished():
        raise ValueError(f"{config.run_dir}: holds a finished run; choose another --run-dir")
    if config.tfds:
        *parts, source = _tfds_parts(config)
    elif config.data:
        *parts, source = _directory_parts(config, data_dir)
    else:
        *parts, source = _gettext_parts(config, data_dir)
    print(f"corpus: {source}", flush=True)
    run_config = demo_config(config, *parts)
    results = translate_train.train(run_config, config.run_dir)
    _report(config, run_config, results, time.time() - started)
    return results


def _report(config, run_config, results, seconds):
    test = results["test"]
    print()
    overrides = ", ".join(f"{k}={v}" for k, v in results["model"]["preset_overrides"].items())
    print(f"model: preset {results['model']['preset']}"
          + (f", overridden: {overrides}" if overrides else ""))
    print(f"trained {results['steps']} steps in {results['train_seconds']:.0f} s "
          f"({results['cleaning']['kept']} training pairs after cleaning: "
          f"{_cleaning_line(results['cleaning'])})")
    print(f"test BLEU {test['bleu']:.2f}  (sacreBLEU {test['bleu_signature']}, "
          f"beam {test['beam_width']}, {test['sentences']} sentences)")
    print(f"test chrF {test['chrf']:.2f}, tokenized BLEU {test['bleu_tokenized']:.2f}, "
          f"perplexity {test['perplexity']:.2f} per target piece")
    for name, stats in results["routing_valid"].items():
        print(f"expert load, {name} (validation set, inference routing): max/mean "
              f"{stats['set_max_mean_load']:.2f}, CV(load) {stats['set_cv_load']:.2f}, "
              f"experts without tokens {stats['zero_experts']}")
        share = np.asarray(stats["set_load_share"])
        busiest = " ".join(f"{e}:{share[e]:.3f}" for e in np.argsort(-share)[:16])
        print(f"  token share per expert, busiest first: {busiest}")
    print(f"hypotheses: {test['hypotheses_file']}")
    from keras_moe.pipelines.training.rundir import RunDir

    log_dir = RunDir(config.run_dir).tensorboard_dir
    print(f"run directory: {config.run_dir} "
          f"(TensorBoard: {progress.tensorboard_command(log_dir)})")
    print(f"wall time {seconds:.0f} s")


def _cleaning_line(counts):
    return (f"{counts['empty']} empty, {counts['too_long']} too long, "
            f"{counts['bad_ratio']} with a bad length ratio dropped of {counts['read']}")
