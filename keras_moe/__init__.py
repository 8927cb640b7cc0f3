"""keras-moe: the sparsely-gated Mixture-of-Experts layer for Keras 3.

Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", arXiv:1701.06538.
"""

import importlib
import os
import sys

# Where each public name lives. Importing the package imports them all (and
# so registers every layer with Keras, as `keras.saving.load_model` needs),
# except in the `keras-moe` command line, whose `--help`, preset listings and
# argument errors must not wait for TensorFlow to load: there they are
# imported on first use (PEP 562), and the commands that use TensorFlow
# import the modules they need.
_PUBLIC = {
    "BatchwiseGating": "batchwise",
    "ExpertParallelOptimizer": "expert_optimizer",
    "FactoredAdam": "optimizers",
    "FeedForwardExperts": "experts",
    "GateDecision": "routing",
    "HierarchicalGating": "hierarchical",
    "HierarchicalMoE": "hierarchical",
    "MoE": "moe",
    "NoisyTopKGating": "gating",
    "Routing": "routing",
    "RoutingMonitor": "monitoring",
    "SoftmaxGating": "gating",
    "SwitchGating": "gating",
    "set_inference_k": "inference_k",
}


def _command_line():
    """True while the `keras-moe` command (or `python -m keras_moe...`) starts."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    return program in ("keras-moe", "-m") and not os.environ.get("KERAS_MOE_EAGER_IMPORT")


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"keras_moe.{_PUBLIC[name]}"), name)
    else:
        try:  # a submodule, e.g. `keras_moe.monitoring` or `keras_moe.statistics`
            value = importlib.import_module(f"keras_moe.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"keras_moe.{name}":
                raise
            raise AttributeError(f"module 'keras_moe' has no attribute {name!r}") from None
    globals()[name] = value
    return value


if not _command_line():
    # Scripts that print tables (benchmarks/) ask for TensorFlow's start-up
    # C++ lines to be left out (keras_moe/_startup.py); a plain import
    # shows them.
    from keras_moe import _startup

    if _startup.quiet_start_requested():
        _startup.import_tensorflow_quietly()
    from keras_moe import losses, pools, statistics  # noqa: E402, F401
    from keras_moe.batchwise import BatchwiseGating  # noqa: E402, F401
    from keras_moe.expert_optimizer import ExpertParallelOptimizer  # noqa: E402, F401
    from keras_moe.experts import FeedForwardExperts  # noqa: E402, F401
    from keras_moe.gating import NoisyTopKGating, SoftmaxGating, SwitchGating  # noqa: E402, F401
    from keras_moe.hierarchical import HierarchicalGating, HierarchicalMoE  # noqa: E402, F401
    from keras_moe.inference_k import set_inference_k  # noqa: E402, F401
    from keras_moe.moe import MoE  # noqa: E402, F401
    from keras_moe.monitoring import RoutingMonitor  # noqa: E402, F401
    from keras_moe.optimizers import FactoredAdam  # noqa: E402, F401
    from keras_moe.routing import GateDecision, Routing  # noqa: E402, F401

__version__ = "0.1.0"

__all__ = [
    "BatchwiseGating",
    "ExpertParallelOptimizer",
    "FactoredAdam",
    "FeedForwardExperts",
    "GateDecision",
    "HierarchicalGating",
    "HierarchicalMoE",
    "MoE",
    "NoisyTopKGating",
    "Routing",
    "RoutingMonitor",
    "SoftmaxGating",
    "SwitchGating",
    "losses",
    "statistics",
]
