"""The docstring examples (doctests) of the public modules run and pass.

Each module's examples run in a copy of that module's own globals, the way
a reader would try them after `from <module> import *`-style access.
"""

import doctest
import importlib
import io

import pytest

MODULES = [
    "keras_moe.losses",
    "keras_moe.gating",
    "keras_moe.experts",
    "keras_moe.moe",
    "keras_moe.hierarchical",
    "keras_moe.batchwise",
    "keras_moe.pools",
    "keras_moe.inference_k",
    "keras_moe.monitoring",
    "keras_moe.statistics",
    "keras_moe.pipelines.inspection.routes",
    "keras_moe.validation",
    "keras_moe.optimizers",
    "keras_moe.recompute",
    "keras_moe.pipelines.training.precision",
    "keras_moe.expert_optimizer",
    "keras_moe.grouped",
    "keras_moe.pipelines.data.shards",
    "keras_moe.pipelines.training.multi_worker",
    "keras_moe.models.lm",
    "keras_moe.models.lstmp",
    "keras_moe.models.softmax",
    "keras_moe.models.blocks",
    "keras_moe.models.presets",
    "keras_moe.models.registry",
    "keras_moe.models.training",
    "keras_moe.models.attention",
    "keras_moe.models.seq2seq",
    "keras_moe.models.decoding",
    "keras_moe.models.translation_presets",
    # report.py moved its examples into these when it was split.
    "keras_moe.pipelines.inspection.experts",
    "keras_moe.pipelines.inspection.page",
    "keras_moe.pipelines.inspection.domains",
    "keras_moe.surgery",
    "keras_moe.pruning",
    "keras_moe.merging",
    "keras_moe.alarms",
    "keras_moe.pipelines.training.budget",
    "keras_moe.pipelines.training.guards",
    "keras_moe.pipelines.progress",
    "keras_moe.pipelines.data.parallel_corpora",
    "keras_moe.pipelines.translate.scoring",
    "keras_moe.pipelines.compare",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = finder.find(module, module_name, globs=dict(vars(module)))
    # Only docstrings written in this module (not ones imported into it).
    tests = [t for t in tests if t.examples and t.filename == module.__file__]
    examples = sum(len(t.examples) for t in tests)
    assert examples >= 1, f"{module_name} has no docstring example"
    report = io.StringIO()
    runner = doctest.DocTestRunner(verbose=False)
    for test in tests:
        runner.run(test, out=report.write)
    assert runner.tries == examples
    assert runner.failures == 0, report.getvalue()
