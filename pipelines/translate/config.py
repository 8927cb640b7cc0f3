"""The translation run configuration (`keras-moe translate train --config FILE.yaml`).

Four sections, each a typed dataclass; see `docs/translation.md` for every key:

```yaml
data:
  train: [{source: ../shared/data/multi30k/train.en, target: ../shared/data/multi30k/train.de}]
  valid: [{source: ../shared/data/multi30k/val.en, target: ../shared/data/multi30k/val.de}]
  vocab_size: 8000
model:  {preset: cpu-gnmt-moe-16, dropout: 0.3}
train:  {steps: 6000, steps_per_eval: 500, learning_rate: 0.002}
decode: {beam_width: 4, alpha: 0.6, beta: 0.2}
```

A corpus is a list of parts read one after the other. A part is one of:
two parallel text files (`source`, `target`; `.gz` read as is, `.sgm`
WMT test sets by their segments), a TSV file (`tsv`), a TFDS translation
dataset (`tfds`, e.g. `wmt14_translate/de-en`, with `split`), or the
machine's gettext message catalogues (`gettext: de`, split
deterministically into train/valid/test by `split`).
"""

import dataclasses

from keras_moe.pipelines.config import check_learner, check_positive
from keras_moe.pipelines.training import config as training_config

GETTEXT_ROOT = "/usr/share/locale"
_KINDS = ("source", "tsv", "tfds", "gettext")


@dataclasses.dataclass
class CorpusConfig:
    """One part of a corpus: exactly one of `source`+`target`, `tsv`, `tfds`, `gettext`."""

    source: str = ""
    target: str = ""
    tsv: str = ""
    source_column: int = 0
    target_column: int = 1
    tfds: str = ""
    split: str = "train"  # tfds: the TFDS split; gettext: train, valid or test
    data_dir: str | None = None  # tfds: TFDS data_dir
    gettext: str = ""  # the catalogues' language folder, e.g. de
    gettext_root: str = GETTEXT_ROOT

    def __post_init__(self):
        if self.target and not self.source:
            raise ValueError(f"`source` is missing for target={self.target!r}")
        given = [kind for kind in _KINDS if getattr(self, kind)]
        if len(given) != 1:
            raise ValueError(
                "a corpus part needs exactly one of `source` (with `target`), `tsv`, `tfds` or "
                f"`gettext`. Received: {', '.join(given) or 'none of them'}"
            )
        if self.source and not self.target:
            raise ValueError(f"`target` is missing for source={self.source!r}")
        if self.gettext and self.split not in ("train", "valid", "test"):
            raise ValueError(
                "`split` of a gettext part must be train, valid or test. "
                f"Received: split={self.split!r}"
            )
        for name in ("source_column", "target_column"):
            check_positive(name, getattr(self, name), allow_zero=True)

    def describe(self):
        """A short human-readable name of the part (for messages and results)."""
        if self.source:
            return f"{self.source} + {self.target}"
        if self.tsv:
            return self.tsv
        if self.tfds:
            return f"tfds:{self.tfds}[{self.split}]"
        return f"gettext:{self.gettext}[{self.split}]"


@dataclasses.dataclass
class DataConfig:
    """Where the parallel text is and how it becomes batches.

    Training pairs are cleaned (empty sides, more than `max_length` words on
    a side, a length ratio above `max_ratio`: each counted and reported);
    validation and test pairs are never dropped, so scores cover the whole
    set. One WordPiece vocabulary of `vocab_size` tokens is learned from
    both sides of the first `vocab_max_pairs` training pairs.
    """

    train: list[CorpusConfig] = dataclasses.field(default_factory=list)
    valid: list[CorpusConfig] = dataclasses.field(default_factory=list)
    test: list[CorpusConfig] = dataclasses.field(default_factory=list)
    source_language: str = "en"
    target_language: str = "de"
    vocab_size: int = 8000
    vocab_max_pairs: int = 1_000_000
    # The WordPiece learner's time grows with the distinct words it sees:
    # None learns from all of them; a number keeps only the most frequent.
    vocab_max_words: int | None = None
    vocab_iterations: int = 4  # the learner's refinement passes (tensorflow_text)
    vocab_learner: str = "tensorflow_text"  # tensorflow_text | tokenizers (compiled)
    max_length: int | None = 80  # words per side in training pairs
    max_ratio: float | None = 3.0  # longer side / shorter side, in words
    max_pieces: int = 128  # training pairs with more pieces on a side are skipped
    batch_tokens: int = 4096  # about this many (padded) tokens per side per batch
    shuffle_buffer: int = 50_000  # pairs
    eval_batch_size: int = 64  # sentences per evaluation or decoding batch
    valid_bleu_sentences: int = 0  # validation BLEU during training on the first N (0: all)
    # Validation and test sentences of more pieces are cut to this many for
    # decoding and perplexity (counted in results.json's `truncated`).
    max_eval_pieces: int = 256

    def __post_init__(self):
        for name in ("vocab_max_pairs", "vocab_max_words", "vocab_iterations", "max_length", "max_pieces", "batch_tokens",
                     "shuffle_buffer", "eval_batch_size"):
            check_positive(name, getattr(self, name))
        check_positive("valid_bleu_sentences", self.valid_bleu_sentences, allow_zero=True)
        check_positive("max_eval_pieces", self.max_eval_pieces)
        check_learner(self.vocab_learner)
        if self.vocab_size < 4:
            raise ValueError(f"`vocab_size` must be >= 4. Received: vocab_size={self.vocab_size}")
        if self.max_ratio is not None and self.max_ratio < 1:
            raise ValueError(
                f"`max_ratio` must be a number >= 1. Received: max_ratio={self.max_ratio!r}"
            )
        if self.batch_tokens < self.max_pieces:
            raise ValueError(
                f"`batch_tokens` must be >= max_pieces ({self.max_pieces}) so that the longest "
                f"pair fits a batch. Received: batch_tokens={self.batch_tokens}"
            )


@dataclasses.dataclass
class ModelConfig(training_config.MoEModelConfig):
    """A preset of `keras_moe.models.translation_presets` and overrides of its arguments.

    The MoE keys are `MoEModelConfig`'s; every key left at None keeps the
    preset's value.
    """

    # Document pools are refused here (see `check_pool_keys`).
    supports_pools = False
    preset: str = "cpu-gnmt-moe-16"
    lstm_units: int | None = None
    lstm_projection: int | None = None
    bidirectional_encoder: bool | None = None
    middle_block: str | None = None
    attention: str | None = None
    attention_units: int | None = None
    upper_context: bool | None = None


@dataclasses.dataclass
class TrainConfig(training_config.TrainConfig):
    """Optimiser, schedule, length of the run, early stopping and checkpoints.

    The training keys every pipeline shares (`keras_moe.pipelines.training.config`) with
    App. E's defaults: the learning rate rises linearly for `warmup_steps`,
    stays constant for `hold_steps`, then falls proportionally to
    `1/sqrt(step)`. Every `steps_per_eval` steps (one Keras epoch) the
    validation loss, perplexity and BLEU are computed, checkpoints are
    written and the backup for resuming is refreshed.
    """

    steps: int = 20000
    steps_per_eval: int = 1000
    learning_rate: float = 0.001
    warmup_steps: int = 2000
    hold_steps: int = 8000
    early_stopping_patience: int = 0  # evaluations without a better val_bleu (0: off)
    keep_checkpoints: int = 5  # last N evaluation checkpoints kept, for averaging

    def __post_init__(self):
        super().__post_init__()
        check_positive("keep_checkpoints", self.keep_checkpoints)
        for name in ("hold_steps", "early_stopping_patience"):
            check_positive(name, getattr(self, name), allow_zero=True)


@dataclasses.dataclass
class DecodeConfig:
    """Beam search for evaluation and `translate run` (GNMT's scoring, Wu et al. 2016).

    `valid_beam_width` is used for the validation BLEU during training
    (1: greedy, cheap); `beam_width` for evaluation and translation.
    `average_checkpoints` > 1 evaluates the average of the last N
    evaluation checkpoints' weights instead of the final weights.
    """

    beam_width: int = 4
    alpha: float = 0.6
    beta: float = 0.2
    max_length_ratio: float = 2.0
    min_extra: int = 10
    valid_beam_width: int = 1
    average_checkpoints: int = 0

    def __post_init__(self):
        for name in ("beam_width", "max_length_ratio", "valid_beam_width"):
            check_positive(name, getattr(self, name))
        for name in ("alpha", "beta", "min_extra", "average_checkpoints"):
            check_positive(name, getattr(self, name), allow_zero=True)


@dataclasses.dataclass
class TranslateConfig:
    """A whole translation run: `data`, `model`, `train` and `decode` sections."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
