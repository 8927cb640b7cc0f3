"""`keras-moe lm demo`: train a small MoE-LSTM language model on real text.

The built-in default corpus is the English side of the machine's own gettext
message catalogues (`/usr/share/locale/de/LC_MESSAGES/*.mo`): real text that
every Debian-like machine has, no download needed. `--data FILE` trains on
any plain text file instead (one sentence per line; the Penn Treebank files
work as they are). The run directory receives TensorBoard logs, the
vocabulary, the trained `.keras` model and `results.json`.
"""

import dataclasses
import time

import numpy as np

from keras_moe.pipelines import progress
from keras_moe.pipelines.data import corpora

# TensorFlow, Keras and the modules that import them are imported inside the
# functions: the command line builds its `--help` from `DemoConfig` without
# waiting for TensorFlow.


@dataclasses.dataclass
class DemoConfig:
    data: str = ""  # empty: the machine's gettext catalogues
    run_dir: str = "runs/demo"
    vocab_size: int = 8000
    seq_len: int = 35
    batch_size: int = 32
    epochs: int = 2
    model_dim: int = 128
    num_experts: int = 16
    expert_hidden_dim: int = 128
    k: int = 4
    dropout: float = 0.1
    importance_weight: float = 0.1
    load_weight: float = 0.1
    learning_rate: float = 3e-3
    monitor_every_n_steps: int = 50
    tokenizer: str = "auto"  # auto: whitespace for --data files, regex for gettext text
    max_train_tokens: int = 300_000
    seed: int = 1


def choose_tokenizer(config):
    name = config.tokenizer
    if name == "auto":
        name = "whitespace" if config.data else "regex"
    if name not in corpora.TOKENIZERS:
        raise ValueError(
            f"`tokenizer` must be 'auto', 'whitespace' or 'regex'. Received: tokenizer={name!r}"
        )
    return corpora.TOKENIZERS[name]


def load_demo_text(config):
    """Train/valid/test lines and a description of where they came from."""
    if config.data:
        lines = corpora.read_lines(config.data)
        source = config.data
    else:
        lines = corpora.gettext_english_lines()
        source = f"{corpora.GETTEXT_ROOT}/de/LC_MESSAGES/*.mo (English message ids)"
        if not lines:
            raise SystemExit(
                f"No gettext catalogues were found under {corpora.GETTEXT_ROOT}/de/LC_MESSAGES. "
                "Point the demo at a text file instead, e.g.\n"
                "  .venv/bin/keras-moe demo --data path/to/corpus.txt"
            )
    train, valid, test = corpora.split_deterministic(lines)
    for split, part in (("train", train), ("valid", valid), ("test", test)):
        if not part:
            raise ValueError(
                f"{source}: {len(lines)} lines leave the {split} split empty "
                "(5% of lines go to valid and 5% to test); use a larger corpus"
            )
    return train, valid, test, source


def expert_load_table(model, inputs, batch_size=64):
    """Per-expert share of tokens on held-out windows (inference routing)."""
    counts = None
    for start in range(0, len(inputs), batch_size):
        _, routings = model(inputs[start : start + batch_size], training=False,
                            return_routing=True)
        c = routings["moe"].counts.numpy()
        counts = c if counts is None else counts + c
    return counts


def run_demo(config):
    """Train, evaluate and report; returns the results dict."""
    import keras

    import keras_moe
    from keras_moe.models.lm import moe_lstm_language_model
    from keras_moe.pipelines.data.vocabulary import WordVocabulary
    from keras_moe.pipelines.lm.inputs import array_perplexity, stream_arrays
    from keras_moe.pipelines.training.rundir import RunDir

    keras.utils.set_random_seed(config.seed)
    run = RunDir(config.run_dir).makedirs()
    started = time.time()
    tokenize = choose_tokenizer(config)
    train, valid, test, source = load_demo_text(config)
    train_tokens = [tokenize(line) for line in train]
    vocab = WordVocabulary.build(train_tokens, max_size=config.vocab_size)
    run.save_vocabulary(vocab)

    def windows(lines, limit=None):
        ids = [vocab.encode(tokenize(line)) for line in lines]
        x, y, w = stream_arrays(ids, config.seq_len)
        if limit:
            n = max(1, limit // config.seq_len)
            x, y, w = x[:n], y[:n], w[:n]
        return x, y, w

    x_train, y_train, w_train = windows(train, config.max_train_tokens)
    x_valid, y_valid, w_valid = windows(valid)
    x_test, y_test, w_test = windows(test)
    print(
        f"corpus: {source}\n  lines train/valid/test: {len(train)}/{len(valid)}/{len(test)}; "
        f"vocabulary {len(vocab)}; training tokens {int(w_train.sum())}",
        flush=True,
    )

    model = moe_lstm_language_model(
        len(vocab), model_dim=config.model_dim, num_experts=config.num_experts,
        expert_hidden_dim=config.expert_hidden_dim, k=config.k, dropout=config.dropout,
        importance_weight=config.importance_weight, load_weight=config.load_weight,
        seed=config.seed,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    log_dir = run.tensorboard_dir
    monitor = keras_moe.RoutingMonitor(log_dir, every_n_steps=config.monitor_every_n_steps)
    history = model.fit(
        x_train, y_train, sample_weight=w_train, batch_size=config.batch_size,
        epochs=config.epochs, validation_data=(x_valid, y_valid, w_valid),
        callbacks=[
            keras.callbacks.TensorBoard(log_dir=log_dir),
            # Per-expert load views and the collapse alarm (logs/routing).
            monitor,
        ],
        verbose=2,
    )
    model.save(run.model_file)
    valid_ppl = array_perplexity(model, x_valid, y_valid, w_valid)
    test_ppl = array_perplexity(model, x_test, y_test, w_test)
    counts = expert_load_table(model, x_test)
    share = counts / max(counts.sum(), 1.0)
    mean = counts.mean()
    results = {
        "corpus": source,
        "config": dataclasses.asdict(config),
        "valid": valid_ppl,
        "test": test_ppl,
        "expert_token_share": [round(float(s), 4) for s in share],
        "max_mean_load": float(counts.max() / mean) if mean > 0 else 0.0,
        "cv_load": float(counts.std() / mean) if mean > 0 else 0.0,
        "unused_experts": int((counts == 0).sum()),
        "collapse_alarms": [
            {"step": int(a["step"]), "layer": a["layer"], "reasons": list(a["reasons"])}
            for a in monitor.alarms
        ],
        "train_history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
        "wall_seconds": round(time.time() - started, 1),
    }
    run.write_results(results)

    print()
    print(f"validation perplexity {valid_ppl['perplexity']:.1f}, "
          f"test perplexity {test_ppl['perplexity']:.1f} "
          f"({test_ppl['tokens']} test tokens, {valid_ppl['convention']})")
    print(f"expert load on the test set (share of routed tokens, k={config.k} "
          f"of {config.num_experts} experts):")
    order = np.argsort(-share)
    for rank, e in enumerate(order):
        bar = "#" * int(round(share[e] * 200))
        print(f"  expert {e:3d}  {share[e]:6.3f}  {bar}")
        if rank >= 31:
            break
    print(f"max/mean load {results['max_mean_load']:.2f}, CV(load) {results['cv_load']:.2f}, "
          f"experts without tokens {results['unused_experts']}")
    for alarm in results["collapse_alarms"]:
        print(f"COLLAPSE ALARM at step {alarm['step']} in {alarm['layer']}: "
              + "; ".join(alarm["reasons"]))
    print(f"run directory: {config.run_dir} (TensorBoard: {progress.tensorboard_command(log_dir)})")
    print(f"wall time {results['wall_seconds']} s")
    return results
