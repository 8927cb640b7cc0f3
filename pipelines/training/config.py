"""The configuration keys every training pipeline shares.

A run configuration (`LMConfig`, `TranslateConfig`) is a tree of typed
dataclasses (`keras_moe.pipelines.config`). Two of its sections are mostly
the same in both pipelines and live here once:

- `TrainConfig`: the `train` section (optimiser, schedule, length of the
  run, logging, `tf.distribute` strategy). The language models use it as
  it is (App. C.1's schedule); the translation models subclass it with
  App. E's defaults and their own keys (`hold_steps`, early stopping,
  checkpoints kept for averaging).
- `MoEModelConfig`: the `model` keys of the MoE and feed-forward blocks
  that both model families take (`num_experts`, `k`, `gating`, the
  balancing weights, dropout ...); each pipeline's `ModelConfig` adds its
  own architecture keys and its default preset.
"""

import dataclasses
import typing

from keras_moe.pipelines.config import PresetOverrides, check_positive

# `train.strategy` values (see `keras_moe.pipelines.training.distribution`).
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

# `train.optimizer` and `train.mixed_precision` (applied by `training.precision`).
OPTIMIZERS = ("adam", "factored_adam")
MIXED_PRECISION = ("none", "mixed_bfloat16", "mixed_float16")


def check_choice(name, value, choices):
    """ValueError naming the key unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(choices)}. Received: {name}={value!r}")


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


@dataclasses.dataclass
class TrainConfig:
    """Optimiser, schedule, length of the run and what is logged.

    The learning rate follows the paper (App. C.1): it rises linearly for
    `warmup_steps` steps, then decays proportionally to `1/sqrt(step)`
    (`decay: inverse_sqrt`), or stays constant (`decay: constant`).

    `max_tokens` (language models, `data.mode: stream`): a one-pass budget
    of training tokens. A token is one target position of a batch (a word
    or a WordPiece piece, `<eos>` included), `batch_size * seq_len` per
    step; the run stops after `ceil(max_tokens / (batch_size * seq_len))`
    steps, which `steps` must not be below, and never reads a line of its
    training data twice (it also stops, saying so, when the data ends first).
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
    # With a time limit: stop at the last evaluation whose next round would not
    # fit, so that a resumed run evaluates at the steps of an uninterrupted one.
    time_limit_at_evaluation: bool = False
    verbose: int = 1  # 0 silent, 1 step lines (every 10 s) and evaluations, 2 evaluations only
    strategy: str = "default"  # default | mirrored | multi_worker | tpu (--strategy)
    expert_parallel: bool = False  # mirrored only: E / replicas experts per replica
    # A one-pass budget in training tokens (target positions, vocabulary pieces,
    # <eos> included): the training data is read once and training stops when the
    # budget is seen (`keras_moe.pipelines.training.budget`). Language models only.
    max_tokens: int | None = None
    optimizer: str = "adam"  # adam | factored_adam (App. D; pipelines/training/precision.py)
    mixed_precision: str = "none"  # none | mixed_bfloat16 | mixed_float16

    def __post_init__(self):
        check_train_keys(self.strategy, self.expert_parallel)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_positive("max_tokens", self.max_tokens)
        if self.max_tokens is not None and type(self) is not TrainConfig:
            # The translation pipeline's `train` section subclasses this one;
            # its batches (pairs by tokens) have no fixed count to budget.
            raise ValueError(
                "`max_tokens` (a one-pass token budget) is for the language models "
                f"(`keras-moe lm train`) only. Received: max_tokens={self.max_tokens}"
            )
        for name in ("steps", "steps_per_eval", "learning_rate", "monitor_every_n_steps"):
            check_positive(name, getattr(self, name))
        for name in ("warmup_steps", "epsilon", "clipnorm", "time_limit_minutes"):
            check_positive(name, getattr(self, name), allow_zero=True)
        if self.decay not in ("inverse_sqrt", "constant"):
            raise ValueError(
                f"`decay` must be 'inverse_sqrt' or 'constant'. Received: decay={self.decay!r}"
            )
        if self.verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2. Received: verbose={self.verbose!r}")


@dataclasses.dataclass
class MoEModelConfig(PresetOverrides):
    """A model preset and the overrides of its MoE / feed-forward block arguments.

    Every key left at None keeps the preset's value. Subclasses set the
    default `preset` and add their architecture's keys.
    """

    preset: str = ""
    model_dim: int | None = None
    num_experts: int | None = None
    expert_hidden_dim: int | None = None
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
    # Document pools (EMO; `keras_moe.pools`): each batch row is one document
    # whose tokens route within its top `pool_size` experts. `pool_size_range`
    # [low, high] draws the pool size per training step; `pool_size` is the
    # pool size at inference. None: no pools. Language models only.
    pool_size: int | None = None
    pool_size_range: list[int] | None = None

    # Whether the model family takes the pool keys (a subclass sets False).
    supports_pools: typing.ClassVar[bool] = True

    def __post_init__(self):
        check_pool_keys(self.pool_size, self.pool_size_range, self.supports_pools,
                        self.num_experts, self.k, self.num_groups)


def check_pool_keys(pool_size, pool_size_range, supported=True, num_experts=None, k=None,
                    num_groups=None):
    """ValueError naming the key unless `model.pool_size` / `model.pool_size_range` are valid.

    What the configuration alone can tell: the types, `1 <= low <= high`,
    a range only with a `pool_size`, and, where the section sets them,
    `k <= pool_size` and the sizes at most `num_experts` (`num_groups` for
    a hierarchical MoE, whose pools are made of groups). The model's
    constructor checks the same against the preset's values before any
    file is written (`guards.check_model_arguments`).

    Example:

    >>> check_pool_keys(32, [8, 32], num_experts=64, k=4)
    >>> check_pool_keys(32, [32, 8])
    Traceback (most recent call last):
    ...
    ValueError: `pool_size_range` must be two integers [low, high] with 1 <= low <= high. Received: pool_size_range=[32, 8]
    """
    if pool_size is None and pool_size_range is None:
        return
    if not supported:
        raise ValueError(
            "document pools (`pool_size`, `pool_size_range`) are for the language models "
            "(`keras-moe lm train`) only: a translation decoder decodes one position at a "
            "time, where a pool per row would see only the prefix. "
            f"Received: pool_size={pool_size!r}, pool_size_range={pool_size_range!r}"
        )
    if pool_size is None:
        raise ValueError(
            "`pool_size_range` needs `pool_size` (the pool size at inference, e.g. the top of "
            f"the range). Received: pool_size=None, pool_size_range={pool_size_range!r}"
        )
    check_positive("pool_size", pool_size)
    if pool_size_range is not None:
        low_high = list(pool_size_range)
        if len(low_high) != 2 or not 1 <= low_high[0] <= low_high[1]:
            raise ValueError(
                "`pool_size_range` must be two integers [low, high] with 1 <= low <= high. "
                f"Received: pool_size_range={low_high!r}"
            )
    units, name = (num_groups, "num_groups") if num_groups else (num_experts, "num_experts")
    sizes = [("pool_size", pool_size)]
    if pool_size_range is not None:
        sizes.append(("pool_size_range", list(pool_size_range)))
    for key, value in sizes:
        low, high = (value, value) if isinstance(value, int) else value
        if k is not None and low < k:
            raise ValueError(
                f"`{key}` must be at least k={k} (each token routes to k experts of its pool). "
                f"Received: {key}={value!r}"
            )
        if units and high > units:
            raise ValueError(
                f"`{key}` must be at most {name}={units} (a pool is made of the layer's "
                f"{'groups' if num_groups else 'experts'}). Received: {key}={value!r}"
            )
