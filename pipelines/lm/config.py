"""The language-model run configuration (`keras-moe lm train --config FILE.yaml`).

Three sections, each a typed dataclass; see `docs/lm.md` for every key:

```yaml
data:   {format: ptb, train: ../shared/data/ptb/ptb.train.txt, valid: ..., vocab_size: 10000}
model:  {preset: cpu-moe-32, dropout: 0.25}
train:  {steps: 4000, steps_per_eval: 200, learning_rate: 0.002}
```
"""

import dataclasses

from keras_moe.pipelines.config import PresetOverrides
from keras_moe.pipelines.data.lm_corpora import FORMATS

# `train.strategy` values (see `keras_moe.pipelines.training.distribution`).
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def check_train_keys(strategy, expert_parallel):
    """ValueError naming the key unless `train.strategy` / `train.expert_parallel` are valid.

    Example:

    >>> check_train_keys("mirrored", True)
    >>> check_train_keys("default", True)
    Traceback (most recent call last):
    ...
    ValueError: `expert_parallel` (--expert-parallel) needs strategy 'mirrored'. Received: expert_parallel=True, strategy='default'
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"`strategy` must be one of {', '.join(map(repr, STRATEGIES))}. "
            f"Received: strategy={strategy!r}"
        )
    if not isinstance(expert_parallel, bool):
        raise ValueError(
            f"`expert_parallel` must be true or false. Received: expert_parallel={expert_parallel!r}"
        )
    if expert_parallel and strategy != "mirrored":
        raise ValueError(
            "`expert_parallel` (--expert-parallel) needs strategy 'mirrored'. "
            f"Received: expert_parallel=True, strategy={strategy!r}"
        )


def _positive(name, value, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be {bound}. Received: {name}={value!r}")


@dataclasses.dataclass
class DataConfig:
    """Where the text is and how it becomes batches.

    `train`, `valid` and `test` are a file, a glob or a directory (`.gz`
    files are read as they are); for `format: 1b` the root of the 1B Word
    benchmark's layout (the split picks the files); for `format: tfds` a
    TFDS name such as `lm1b` (splits `train` and `test`).
    """

    format: str = "text"
    train: str = ""
    valid: str = ""
    test: str = ""
    tfds_data_dir: str | None = None
    vocabulary: str = "word"  # word | wordpiece
    vocab_size: int = 10000
    min_count: int = 1
    vocab_max_lines: int = 2_000_000  # lines read to build the vocabulary
    mode: str = "stream"  # stream: fixed windows over the text; sentences: one line per row
    seq_len: int = 35  # stream mode: window length
    batch_size: int = 64  # stream mode: windows per batch
    batch_tokens: int = 8192  # sentences mode: about this many tokens per batch
    max_sentence_len: int = 100  # sentences mode: longer lines are cut
    shuffle_buffer: int = 10000  # windows or sentences
    eval_seq_len: int = 0  # stream mode evaluation windows (0: seq_len)
    eval_batch_size: int = 32

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(
                f"`format` must be one of {', '.join(map(repr, FORMATS))}. "
                f"Received: format={self.format!r}"
            )
        if self.vocabulary not in ("word", "wordpiece"):
            raise ValueError(
                "`vocabulary` must be 'word' or 'wordpiece'. "
                f"Received: vocabulary={self.vocabulary!r}"
            )
        if self.mode not in ("stream", "sentences"):
            raise ValueError(f"`mode` must be 'stream' or 'sentences'. Received: mode={self.mode!r}")
        if self.vocab_size < 4:
            raise ValueError(f"`vocab_size` must be >= 4. Received: vocab_size={self.vocab_size}")
        for name in ("min_count", "vocab_max_lines", "seq_len", "batch_size", "batch_tokens",
                     "max_sentence_len", "shuffle_buffer", "eval_batch_size"):
            _positive(name, getattr(self, name))
        _positive("eval_seq_len", self.eval_seq_len, allow_zero=True)


@dataclasses.dataclass
class ModelConfig(PresetOverrides):
    """A preset of `keras_moe.models.presets` and overrides of its arguments.

    Every key left at None keeps the preset's value.
    """

    preset: str = "cpu-moe-32"
    model_dim: int | None = None
    num_experts: int | None = None
    expert_hidden_dim: int | None = None
    expert_hidden_layers: int | None = None
    k: int | None = None
    num_groups: int | None = None
    gating: str | None = None
    importance_weight: float | None = None
    load_weight: float | None = None
    capacity_factor: float | None = None
    ffn_hidden_dim: int | None = None
    dropout: float | None = None
    moe_activation: str | None = None
    moe_output_scale: float | None = None
    expert_dropout: float | None = None
    num_sampled: int | None = None
    unroll: bool | None = None



@dataclasses.dataclass
class TrainConfig:
    """Optimiser, schedule, length of the run and what is logged.

    The learning rate follows the paper (App. C.1): it rises linearly for
    `warmup_steps` steps, then decays proportionally to `1/sqrt(step)`
    (`decay: inverse_sqrt`), or stays constant (`decay: constant`).
    """

    steps: int = 2000
    steps_per_eval: int = 200  # one Keras epoch: validation, checkpoint, backup
    learning_rate: float = 0.002
    warmup_steps: int = 1000
    decay: str = "inverse_sqrt"
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    clipnorm: float | None = 1.0
    seed: int = 1
    monitor_every_n_steps: int = 50  # routing histograms and bar charts
    time_limit_minutes: float | None = None  # stop after this much wall time
    verbose: int = 1  # Keras progress bar: 0 silent, 1 bar, 2 a line per epoch
    strategy: str = "default"  # default | mirrored | multi_worker | tpu (--strategy)
    expert_parallel: bool = False  # mirrored only: E / replicas experts per replica

    def __post_init__(self):
        check_train_keys(self.strategy, self.expert_parallel)
        for name in ("steps", "steps_per_eval", "learning_rate", "monitor_every_n_steps"):
            _positive(name, getattr(self, name))
        for name in ("warmup_steps", "epsilon", "clipnorm", "time_limit_minutes"):
            _positive(name, getattr(self, name), allow_zero=True)
        if self.decay not in ("inverse_sqrt", "constant"):
            raise ValueError(
                f"`decay` must be 'inverse_sqrt' or 'constant'. Received: decay={self.decay!r}"
            )
        if self.verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2. Received: verbose={self.verbose!r}")


@dataclasses.dataclass
class LMConfig:
    """A whole language-model run: `data`, `model` and `train` sections."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
