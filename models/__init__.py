"""Models built on the MoE layer (import `keras_moe.models`).

Importing this package registers every model, layer, schedule and metric
with Keras, so saved `.keras` files reload without `custom_objects`.
"""

from keras_moe.models import (  # noqa: F401
    attention,
    blocks,
    decoding,
    lm,
    lstmp,
    presets,
    registry,
    seq2seq,
    softmax,
    training,
    translation_presets,
)
from keras_moe.models.lm import LanguageModel, moe_lstm_language_model  # noqa: F401
from keras_moe.models.presets import build_language_model, costs, get_preset  # noqa: F401
from keras_moe.models.seq2seq import TranslationModel  # noqa: F401
from keras_moe.models.translation_presets import build_translation_model  # noqa: F401
