"""The language-model run configuration (`keras-moe lm train --config FILE.yaml`).

Three sections, each a typed dataclass; see `docs/lm.md` for every key:

```yaml
data:   {format: ptb, train: ../shared/data/ptb/ptb.train.txt, valid: ..., vocab_size: 10000}
model:  {preset: cpu-moe-32, dropout: 0.25}
train:  {steps: 4000, steps_per_eval: 200, learning_rate: 0.002}
```
"""

import dataclasses

from keras_moe.pipelines.config import check_learner, check_positive
from keras_moe.pipelines.data.lm_corpora import FORMATS

# The `train` section and the strategy names are every pipeline's (re-exported
# here, where the language-model configuration has always offered them).
from keras_moe.pipelines.training.config import (  # noqa: F401
    STRATEGIES,
    MoEModelConfig,
    TrainConfig,
    check_train_keys,
)


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
    vocab_learner: str = "tensorflow_text"  # wordpiece: tensorflow_text | tokenizers (compiled)
    # wordpiece: `learned` keeps the learner's ids; `frequency` numbers the pieces by
    # frequency, as the sampled softmax's log-uniform proposal assumes.
    vocab_order: str = "learned"
    mode: str = "stream"  # stream: fixed windows over the text; sentences: one line per row
    seq_len: int = 35  # stream mode: window length
    # stream mode: blank lines separate documents (not tokens); no window crosses two
    # documents, so each row is one document's text (a per-row expert pool is per document).
    document_rows: bool = False
    batch_size: int = 64  # stream mode: windows per batch
    batch_tokens: int = 8192  # sentences mode: about this many tokens per batch
    max_sentence_len: int = 100  # sentences mode: longer lines are cut
    shuffle_buffer: int = 10000  # windows or sentences
    # Training shards read at once, in blocks of this many lines, then mixed in a
    # buffer of `interleave_buffer_lines` lines (0: the files one after another).
    interleave_block_lines: int = 0
    interleave_buffer_lines: int = 100_000
    eval_seq_len: int = 0  # stream mode evaluation windows (0: seq_len)
    eval_batch_size: int = 32
    # Validation during training on the first lines of `valid` holding at least
    # this many words (0: the whole file); the final evaluation reads the whole file.
    valid_max_words: int = 0

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
        check_learner(self.vocab_learner)
        if self.vocab_order not in ("learned", "frequency"):
            raise ValueError(
                "`vocab_order` must be 'learned' or 'frequency'. "
                f"Received: vocab_order={self.vocab_order!r}"
            )
        if self.mode not in ("stream", "sentences"):
            raise ValueError(f"`mode` must be 'stream' or 'sentences'. Received: mode={self.mode!r}")
        if self.vocab_size < 4:
            raise ValueError(f"`vocab_size` must be >= 4. Received: vocab_size={self.vocab_size}")
        for name in ("min_count", "vocab_max_lines", "seq_len", "batch_size", "batch_tokens",
                     "max_sentence_len", "shuffle_buffer", "eval_batch_size"):
            check_positive(name, getattr(self, name))
        check_positive("eval_seq_len", self.eval_seq_len, allow_zero=True)
        check_positive("valid_max_words", self.valid_max_words, allow_zero=True)
        check_positive("interleave_block_lines", self.interleave_block_lines, allow_zero=True)
        check_positive("interleave_buffer_lines", self.interleave_buffer_lines)
        if self.document_rows and self.mode != "stream":
            raise ValueError(
                "`document_rows` cuts stream-mode windows at document boundaries; set "
                f"`mode: stream`. Received: mode={self.mode!r}"
            )
        if self.document_rows and self.interleave_block_lines:
            raise ValueError(
                "`document_rows` needs the training documents whole, but "
                "`interleave_block_lines` mixes blocks of lines of several files (and drops the "
                "blank lines between documents); shuffle the documents beforehand and set "
                f"`interleave_block_lines: 0`. Received: interleave_block_lines="
                f"{self.interleave_block_lines}"
            )
        if self.interleave_block_lines and self.format != "text":
            raise ValueError(
                "`interleave_block_lines` reads text shards (a glob or a directory); "
                f"set `format: text`. Received: format={self.format!r}"
            )


@dataclasses.dataclass
class ModelConfig(MoEModelConfig):
    """A preset of `keras_moe.models.presets` and overrides of its arguments.

    The MoE keys are `MoEModelConfig`'s; every key left at None keeps the
    preset's value.
    """

    preset: str = "cpu-moe-32"
    expert_hidden_layers: int | None = None
    num_sampled: int | None = None
    unroll: bool | None = None


@dataclasses.dataclass
class LMConfig:
    """A whole language-model run: `data`, `model` and `train` sections."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        check_budget(self.data, self.train)


def tokens_per_step(data_config):
    """Training tokens per optimizer step in `stream` mode: `batch_size * seq_len`.

    Every window of a stream-mode batch is full (only the last window of the
    data is padded), so each of its `seq_len` positions is a target.

    Example:

    >>> tokens_per_step(DataConfig(batch_size=100, seq_len=50))
    5000
    """
    return data_config.batch_size * data_config.seq_len


def check_budget(data_config, train_config):
    """ValueError unless `train.max_tokens` fits the data mode and `train.steps`.

    A budget counts `batch_size * seq_len` tokens a step, which only
    `data.mode: stream` guarantees; `train.steps` must leave room for the
    budget's `ceil(max_tokens / (batch_size * seq_len))` steps (the schedule
    and the evaluation rounds are counted in steps).
    """
    budget = train_config.max_tokens
    if budget is None:
        return
    if data_config.mode != "stream":
        raise ValueError(
            "`train.max_tokens` counts `batch_size * seq_len` tokens a step and needs "
            f"`data.mode: stream`. Received: data.mode={data_config.mode!r}"
        )
    if data_config.document_rows:
        # A document's last window is padded, so a step holds fewer than
        # `batch_size * seq_len` tokens, and a budget counted in steps would overcount.
        raise ValueError(
            "`train.max_tokens` counts `batch_size * seq_len` tokens a step, but with "
            "`data.document_rows: true` each document's last window is padded (padding is not "
            "a token): budget the run in `train.steps` instead. Received: "
            "data.document_rows=True"
        )
    if train_config.strategy == "multi_worker":
        raise ValueError(
            "`train.max_tokens` is not supported with `train.strategy: multi_worker` (its loop "
            "needs a repeating dataset)"
        )
    needed = -(-budget // tokens_per_step(data_config))
    if train_config.steps < needed:
        raise ValueError(
            f"`train.steps` must be >= {needed}, the steps of train.max_tokens={budget} at "
            f"{tokens_per_step(data_config)} tokens a step (data.batch_size * data.seq_len). "
            f"Received: train.steps={train_config.steps}"
        )
