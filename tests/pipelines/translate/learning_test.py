"""`keras-moe translate` learns: a small model trained on the word-for-word
substitution corpus of `translate_train_test.py` translates held-out
sentences well.

In its own file so that `make test`'s worker processes run this, the suite's
longest single test, beside the end-to-end tests that share a trained run.
"""

import pytest

from keras_moe.pipelines.translate import train as translate_train
from tests.pipelines.translate.train_test import tiny_config, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


@pytest.mark.slow  # 205 s: 300 training steps to BLEU > 60
def test_the_model_learns_the_substitution(corpus, tmp_path):
    """300 steps take a random model to high BLEU on held-out sentences.

    The final scores come from the average of the last two evaluation
    checkpoints (steps 200 and 300).
    """
    config = tiny_config(
        corpus, "model.model_dim=32", "model.expert_hidden_dim=32", "train.steps=300",
        "train.steps_per_eval=100", "train.learning_rate=0.01", "train.warmup_steps=20",
        "train.keep_checkpoints=2", "decode.average_checkpoints=2",
        "data.batch_tokens=512", "data.valid_bleu_sentences=8", "decode.beam_width=1",
    )
    results = translate_train.train(config, str(tmp_path / "run"))
    assert results["averaged_checkpoints"] == 2
    assert results["test"]["bleu"] > 60, results["test"]
    assert results["valid"]["perplexity"] < 2.0
    # Validation BLEU rose during training (TensorBoard and history.csv carry it).
    bleu = results["history"]["val_bleu"]
    assert len(bleu) == 3 and bleu[-1] > bleu[0]
