"""keras-moe: the sparsely-gated Mixture-of-Experts layer for Keras 3.

Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", arXiv:1701.06538.
"""

from keras_moe import losses, pools, statistics
from keras_moe.batchwise import BatchwiseGating
from keras_moe.expert_optimizer import ExpertParallelOptimizer
from keras_moe.experts import FeedForwardExperts
from keras_moe.gating import NoisyTopKGating, SoftmaxGating, SwitchGating
from keras_moe.hierarchical import HierarchicalGating, HierarchicalMoE
from keras_moe.inference_k import set_inference_k
from keras_moe.moe import MoE
from keras_moe.monitoring import RoutingMonitor
from keras_moe.optimizers import FactoredAdam
from keras_moe.routing import GateDecision, Routing

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
    "pools",
    "set_inference_k",
    "statistics",
]
