"""Tests of inference-time k (`keras_moe.set_inference_k`) and the pipelines' `--k`.

Expected outputs come from the dense NumPy reference (tests/keras_moe/reference.py)
evaluated at k', or from the unchanged model.
"""

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.pipelines import cli
from tests.keras_moe import reference as ref

D = 5


def normal(rng, *shape):
    return rng.normal(size=shape).astype("float32")


def make_moe(num_experts=6, k=2, rng=None, **kwargs):
    rng = rng if rng is not None else np.random.default_rng(0)
    layer = keras_moe.MoE(num_experts, 4, k=k, **kwargs)
    layer.build((None, D))
    if layer.gating_type == "batchwise" or not hasattr(layer.gating, "w_gate"):
        return layer
    layer.gating.w_gate.assign(rng.normal(size=layer.gating.w_gate.shape) * 1.5)
    for v in layer.experts.weights:
        v.assign(rng.normal(size=v.shape) * 0.6)
    return layer


def make_hmoe(rng, **kwargs):
    layer = keras_moe.HierarchicalMoE(4, 3, 4, k_primary=2, k_secondary=2, **kwargs)
    layer.build((None, D))
    g = layer.gating
    g.primary.w_gate.assign(rng.normal(size=g.primary.w_gate.shape) * 1.5)
    g.w_gate.assign(rng.normal(size=g.w_gate.shape) * 1.5)
    for v in layer.experts.weights:
        v.assign(rng.normal(size=v.shape) * 0.6)
    return layer


def reference(layer, x, k, logits_mask=None):
    return ref.moe_reference(x, ref.as_np(layer.gating.w_gate), *ref.expert_weights(layer), k,
                             logits_mask=logits_mask)


# ------------------------------------------------------------------ layers ---


@pytest.mark.parametrize("gating", ["noisy_top_k", "top_k"])
def test_k_prime_equal_to_k_is_the_unchanged_layer(gating):
    rng = np.random.default_rng(1)
    layer = make_moe(gating=gating, rng=rng)
    hier = make_hmoe(rng)
    x = normal(rng, 3, 4, D)
    for lay, k in ((layer, 2), (hier, 4)):
        y0, r0 = lay(x, return_routing=True)
        assert keras_moe.set_inference_k(lay, k) == [lay]
        y, r = lay(x, return_routing=True)
        np.testing.assert_array_equal(y.numpy(), y0.numpy())
        np.testing.assert_array_equal(r.expert_indices.numpy(), r0.expert_indices.numpy())


@pytest.mark.parametrize("k_prime", [1, 2, 3, 4, 6])
def test_k_prime_outputs_equal_the_numpy_reference_at_k_prime(k_prime):
    rng = np.random.default_rng(2)
    layer = make_moe(k=2, rng=rng)
    x = normal(rng, 2, 5, D)
    keras_moe.set_inference_k(layer, k_prime)
    y, routing = layer(x, return_routing=True)
    expected = reference(layer, x, k_prime)
    np.testing.assert_allclose(y.numpy(), expected["y"], rtol=1e-5, atol=1e-5)
    assert routing.gates.shape == (2, 5, k_prime)
    # Eq. 3 at k': the softmax over the k' kept logits.
    np.testing.assert_allclose(routing.gates.numpy().reshape(-1, k_prime), expected["gates"],
                               rtol=1e-5)
    if k_prime != 2:
        assert not np.allclose(expected["y"], reference(layer, x, 2)["y"])


@pytest.mark.parametrize("k_prime", [2, 6])
def test_hierarchical_k_prime_sets_the_groups_per_position(k_prime):
    rng = np.random.default_rng(3)
    layer = make_hmoe(rng)
    x = normal(rng, 7, D)
    keras_moe.set_inference_k(layer, k_prime)
    g = layer.gating
    expected = ref.hierarchical_reference(
        x, ref.as_np(g.primary.w_gate), ref.as_np(g.w_gate), *ref.expert_weights(layer),
        k_prime // 2, 2,
    )
    y, routing = layer(x, return_routing=True)
    np.testing.assert_allclose(y.numpy(), expected["y"], rtol=1e-5, atol=1e-5)
    assert routing.expert_indices.shape == (7, k_prime)


def test_training_calls_keep_the_trained_k():
    rng = np.random.default_rng(4)
    layer = make_moe(k=2, gating="top_k", rng=rng)
    x = normal(rng, 6, D)
    keras_moe.set_inference_k(layer, 1)
    y, routing = layer(x, training=True, return_routing=True)
    assert routing.expert_indices.shape == (6, 2)
    np.testing.assert_allclose(y.numpy(), reference(layer, x, 2)["y"], rtol=1e-5, atol=1e-5)
    assert layer(x, return_routing=True)[1].expert_indices.shape == (6, 1)


def test_k_prime_inside_document_pools():
    rng = np.random.default_rng(5)
    layer = make_moe(num_experts=8, k=2, pool_size=3, gating="top_k", rng=rng)
    x = normal(rng, 2, 6, D)
    keras_moe.set_inference_k(layer, 3)
    y = layer(x)
    rows = np.repeat(np.arange(2), 6)
    logits = x.reshape(-1, D) @ ref.as_np(layer.gating.w_gate)
    pools, _ = ref.document_pools(logits, rows, 3)
    expected = reference(layer, x, 3, logits_mask=ref.pool_mask(rows, pools, 8))
    np.testing.assert_allclose(y.numpy(), expected["y"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"pool_size=3\). Received: k=4"):
        keras_moe.set_inference_k(layer, 4)


# ------------------------------------------------------------------ models ---


def test_a_model_is_retraced_at_k_prime_and_none_restores_the_trained_k():
    rng = np.random.default_rng(6)
    first, second = make_moe(k=2, rng=rng, name="a"), make_moe(k=3, rng=rng, name="b")
    inputs = keras.Input((4, D))
    model = keras.Model(inputs, second(keras.layers.ReLU()(first(inputs))))
    x = normal(rng, 3, 4, D)
    trained = model.predict(x, verbose=0)
    assert keras_moe.set_inference_k(model, 1) == [first, second]
    assert (first.inference_k, second.inference_k) == (1, 1)
    hidden = np.maximum(reference(first, x, 1)["y"], 0.0)
    expected = reference(second, hidden, 1)["y"]
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)
    keras_moe.set_inference_k(model, None)
    np.testing.assert_allclose(model.predict(x, verbose=0), trained, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make, k, fragment", [
    (lambda: make_moe(), 0, "`k` must be an integer >= 1. Received: k=0"),
    (lambda: make_moe(), 7, "num_experts=6. Received: k=7"),
    (lambda: make_moe(k=1, gating="switch"), 2, "gating='switch'"),
    (lambda: make_moe(gating="batchwise"), 2, "gating='batchwise'"),
    (lambda: make_hmoe(np.random.default_rng(0)), 3, "multiple of k_secondary=2"),
    (lambda: make_hmoe(np.random.default_rng(0)), 10, "at most num_groups=4"),
])
def test_a_k_prime_a_layer_cannot_route_is_refused(make, k, fragment):
    layer = make()
    with pytest.raises(ValueError) as error:
        keras_moe.set_inference_k(layer, k)
    assert fragment in str(error.value)
    assert layer.inference_k is None


def test_nothing_changes_when_one_layer_refuses_and_a_model_without_moe_is_named():
    rng = np.random.default_rng(7)
    small, large = make_moe(num_experts=4, rng=rng, name="s"), make_moe(num_experts=8, rng=rng)
    inputs = keras.Input((D,))
    model = keras.Model(inputs, large(small(inputs)))
    with pytest.raises(ValueError, match="num_experts=4"):
        keras_moe.set_inference_k(model, 6)
    assert small.inference_k is None and large.inference_k is None
    dense = keras.Sequential([keras.Input((D,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="holds no MoE layer"):
        keras_moe.set_inference_k(dense, 1)


# --------------------------------------------------------------- pipelines ---


def test_cli_evaluate_commands_take_k():
    parser = cli.build_parser()
    args = parser.parse_args(["lm", "evaluate", "--run-dir", "r", "--data", "d", "--k", "1"])
    assert args.k == 1
    args = parser.parse_args(["translate", "evaluate", "--run-dir", "r", "--src", "s",
                              "--ref", "t", "--k", "3"])
    assert args.k == 3
    assert parser.parse_args(["lm", "evaluate", "--run-dir", "r", "--data", "d"]).k is None


def test_lm_evaluate_at_k(tmp_path):
    from keras_moe.pipelines.lm import train as lm_train
    from tests.pipelines.lm.train_test import TINY, write_corpus

    corpus = {"train": write_corpus(tmp_path / "train.txt", 200, 0),
              "valid": write_corpus(tmp_path / "valid.txt", 30, 1)}
    from keras_moe.pipelines.config import load_config
    from keras_moe.pipelines.lm.config import LMConfig

    config = load_config(LMConfig, None, [f"data.train={corpus['train']}",
                                          f"data.valid={corpus['valid']}", *TINY])
    run_dir = str(tmp_path / "run")
    lm_train.train(config, run_dir)
    trained = lm_train.evaluate(run_dir, corpus["valid"])
    same = lm_train.evaluate(run_dir, corpus["valid"], k=2)  # the tiny run has k=2
    one = lm_train.evaluate(run_dir, corpus["valid"], k=1)
    assert same["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-6)
    assert one["perplexity"] != pytest.approx(trained["perplexity"], rel=1e-6)
    assert one["k"] == 1 and trained["k"] is None
    assert one["tokens"] == trained["tokens"] and one["tokens_per_second"] > 0
    with pytest.raises(ValueError, match="num_experts=4. Received: k=5"):
        lm_train.evaluate(run_dir, corpus["valid"], k=5)


@pytest.mark.slow
def test_translate_evaluate_at_k(tmp_path):
    from keras_moe.pipelines.translate import train as translate_train
    from tests.pipelines.translate.train_test import tiny_config, write_corpus

    corpus = write_corpus(tmp_path)
    run_dir = str(tmp_path / "run")
    translate_train.train(tiny_config(corpus), run_dir)
    test = corpus["test"]
    trained = translate_train.evaluate(run_dir, test["en"], [test["de"]], beam_width=1,
                                       out=str(tmp_path / "a.hyp"))
    same = translate_train.evaluate(run_dir, test["en"], [test["de"]], beam_width=1,
                                    out=str(tmp_path / "b.hyp"), k=2)
    one = translate_train.evaluate(run_dir, test["en"], [test["de"]], beam_width=1,
                                   out=str(tmp_path / "c.hyp"), k=1)
    assert same["bleu"] == trained["bleu"]
    assert same["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-6)
    assert one["perplexity"] != pytest.approx(trained["perplexity"], rel=1e-6)
    assert one["k"] == 1 and one["tokens_per_second"] > 0 and one["sentences_per_second"] > 0
