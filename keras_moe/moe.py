"""The sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017)."""

import keras
import tensorflow as tf

from keras_moe import dispatch
from keras_moe import expert_parallel as ep
from keras_moe.batchwise import BatchwiseGating
from keras_moe.experts import FeedForwardExperts
from keras_moe.gating import (
    GATING_TYPES,
    NoisyTopKGating,
    SoftmaxGating,
    SwitchGating,
    validate_common,
)
from keras_moe.pools import RoutingOptions
from keras_moe.pools import Tokens as _Tokens
from keras_moe.routing import (
    make_routing,
    make_routing_metrics,
    scatter_rows,
    update_routing_metrics,
)
from keras_moe.validation import check_capacity_factor, check_int, check_rate


def make_gating(gating, num_experts, k, importance_weight, load_weight, noise_epsilon,
                threshold_weight, seed):
    """The gating layer (named `"gating"`) behind an `MoE`'s `gating` name."""
    shared = dict(importance_weight=importance_weight, load_weight=load_weight, seed=seed,
                  name="gating")
    if gating == "batchwise":
        return BatchwiseGating(num_experts, k, threshold_weight=threshold_weight, **shared)
    if gating in ("switch", "softmax"):
        return {"switch": SwitchGating, "softmax": SoftmaxGating}[gating](num_experts, k, **shared)
    return NoisyTopKGating(num_experts, k, gating, noise_epsilon=noise_epsilon, **shared)


class SparseMoEBase(RoutingOptions, keras.layers.Layer):
    """Shared anatomy of `MoE` and `HierarchicalMoE` (not public).

    `__init__` validates and stores the arguments both layers share (by
    keyword) and creates the experts and the routing metrics; a subclass
    then sets `self.gating`, a layer returning a `GateDecision` over
    `num_experts` experts that has `balancing_loss(sums)` and
    `top_k_routing`, and `self.k`. `build` builds both and chooses the
    dispatcher once; `call` flattens the positions, asks the gate, sends the
    rows to their experts and reports the call's `keras_moe.Routing`.

    Every call's `Routing` goes to the layer's metrics and to the routing
    observers registered with `add_routing_observer`, the public hook
    through which `keras_moe.RoutingMonitor` and the routing inspector see
    the routing of calls made by `fit` or by a model's own `call`.
    """

    def __init__(
        self,
        *,
        num_experts,
        expert_hidden_dim,
        output_dim=None,
        gating="noisy_top_k",
        importance_weight=0.1,
        load_weight=0.1,
        noise_epsilon=1e-2,
        capacity_factor=None,
        expert_activation="relu",
        use_bias=True,
        seed=None,
        balancing_scope="global",
        expert_hidden_layers=1,
        expert_parallel=False,
        expert_dropout=0.0,
        recompute_hidden=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if balancing_scope not in ("global", "replica"):
            raise ValueError(
                "`balancing_scope` must be 'global' or 'replica'. "
                f"Received: balancing_scope={balancing_scope!r}"
            )
        check_int("expert_hidden_dim", expert_hidden_dim)
        check_int("expert_hidden_layers", expert_hidden_layers)
        check_rate("expert_dropout", expert_dropout)
        self.balancing_scope = balancing_scope
        self.num_experts = num_experts
        self.expert_hidden_dim = expert_hidden_dim
        self.expert_hidden_layers = expert_hidden_layers
        self.output_dim = output_dim
        self.gating_type = gating
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.noise_epsilon = float(noise_epsilon)
        self.expert_activation = expert_activation
        self.use_bias = bool(use_bias)
        self.seed = seed
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.supports_masking = True
        # Dropless dispatch has data-dependent shapes, which XLA cannot
        # compile; this keeps `compile(jit_compile="auto")` off XLA. So does
        # the batchwise gate's mask (a data-dependent number of pairs).
        self.supports_jit = self.capacity_factor is not None and gating != "batchwise"
        self.routing_metrics = make_routing_metrics(self.name)
        self._routing_observers = ()
        self.experts = FeedForwardExperts(
            num_experts, expert_hidden_dim, output_dim, expert_activation, use_bias,
            seed=seed, num_hidden_layers=expert_hidden_layers, expert_parallel=expert_parallel,
            dropout=expert_dropout, recompute_hidden=recompute_hidden,
            dtype=self.dtype_policy, name="experts",
        )
        self.recompute_hidden = recompute_hidden
        self.expert_parallel = expert_parallel
        self.expert_dropout = self.experts.dropout

    def get_config(self):
        config = {
            "expert_hidden_dim": self.expert_hidden_dim,
            "expert_hidden_layers": self.expert_hidden_layers,
            "output_dim": self.output_dim,
            "gating": self.gating_type,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
            "noise_epsilon": self.noise_epsilon,
            "capacity_factor": self.capacity_factor,
            "expert_activation": self.expert_activation,
            "use_bias": self.use_bias,
            "seed": self.seed,
            "balancing_scope": self.balancing_scope,
            "expert_parallel": self.expert_parallel,
            "expert_dropout": self.expert_dropout,
            **self.routing_options_config(),
            "recompute_hidden": self.recompute_hidden,
        }
        return {**super().get_config(), **config}

    # --- routing observers ---------------------------------------------------

    @property
    def routing_observers(self):
        """The observers registered with `add_routing_observer`, in call order."""
        return self._routing_observers

    def add_routing_observer(self, observer):
        """Have `observer(inputs, routing, training)` called by every call of the layer.

        `routing` is the call's `keras_moe.Routing` (what `return_routing=True`
        returns), `inputs` the layer's input and `training` a bool. In a traced
        function (`fit`, `tf.function`) the observer runs while the function is
        traced and sees symbolic tensors: to keep something per step it must
        add TensorFlow ops (e.g. `tf.Variable.assign_add`) or return the
        tensors it records from the traced function. Functions traced before
        the observer was added do not call it (`Model.make_train_function(
        force=True)` retraces `fit`'s).
        """
        if not callable(observer):
            raise ValueError(
                f"`observer` must be callable. Received: observer={observer!r:.80}"
            )
        self._routing_observers = (*self._routing_observers, observer)

    def remove_routing_observer(self, observer):
        """Stop calling `observer` (registered with `add_routing_observer`)."""
        if observer not in self._routing_observers:
            raise ValueError(
                f"`observer` is not a routing observer of layer {self.name!r}. "
                f"Received: observer={observer!r:.80}"
            )
        observers = list(self._routing_observers)
        observers.remove(observer)
        self._routing_observers = tuple(observers)

    # --- layer anatomy -------------------------------------------------------

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__} expects inputs of rank >= 2 with a known last "
                f"dimension. Received: input_shape={input_shape}"
            )
        self.gating.build(input_shape[-1:])
        self.experts.build(input_shape[-1:])
        # The experts know their replica sharding only once built.
        if self.experts.num_shards > 1:
            self._dispatch_rows = self._expert_parallel_dispatch
        elif self.capacity_factor is None:
            self._dispatch_rows = self._dropless_dispatch
        else:
            self._dispatch_rows = self._capacity_dispatch
        # Top-k pairs are laid out [N, k]; serving every token's first
        # choice before anyone's second keeps drops on the weaker gates.
        self._ranked_choices = bool(self.gating.top_k_routing)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def compute_output_spec(self, inputs, training=None, mask=None, return_routing=False,
                            document_ids=None):
        if return_routing:
            # A functional model's outputs must have one structure in every
            # mode; a Routing's optional fields (noise_std in noisy training)
            # do not, so it is only returned for concrete inputs.
            raise ValueError(
                f"`return_routing=True` needs concrete inputs; {type(self).__name__} "
                f"{self.name!r} was called on a symbolic Keras input of shape "
                f"{tuple(inputs.shape)}. Call the layer (or a model containing it) on "
                "tensors to get its routing, or observe it with `add_routing_observer`. "
                "Received: return_routing=True"
            )
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )

    def compute_mask(self, inputs, mask=None):
        return mask

    def call(self, inputs, training=None, mask=None, return_routing=False, document_ids=None):
        training = bool(training)
        tokens = self._flatten(inputs, mask)
        # Pools' logits mask and inference-time k (`keras_moe.pools`).
        options, pools = self._gate_options(tokens, training, document_ids)
        decision = self.gating(tokens.rows, training=training, weight=tokens.weight, **options)
        y, dropped, exchanged = self._dispatch_rows(tokens, decision, training)
        aux_loss = decision.aux_loss
        if training:
            aux_loss = self._global_balancing_loss(decision)
            self.add_loss(aux_loss)
        routing = make_routing(
            decision, aux_loss, dropped, exchanged, tokens.lead_shape,
            kept=tokens.kept, weight=tokens.weight, num_positions=tokens.num_positions,
        )
        routing = self._with_pools(routing, pools)
        self._report(inputs, routing, training)
        y = self._restore(y, tokens)
        return (y, routing) if return_routing else y

    # --- the steps of `call` -----------------------------------------------

    def _flatten(self, inputs, mask):
        d = inputs.shape[-1]
        flat = tf.reshape(inputs, [-1, d])
        lead_shape, num_positions = tf.shape(inputs)[:-1], tf.shape(flat)[0]
        if mask is None:
            return _Tokens(flat, None, None, num_positions, lead_shape)
        weight = tf.reshape(tf.cast(mask, tf.float32), [-1])
        if self.capacity_factor is not None:
            return _Tokens(flat, weight, None, num_positions, lead_shape)
        # Dropless: masked positions are removed before routing, so they
        # cost nothing and cannot touch the statistics.
        kept = tf.cast(tf.where(weight > 0)[:, 0], tf.int32)
        return _Tokens(tf.gather(flat, kept), None, kept, num_positions, lead_shape)

    def _valid_pairs(self, tokens, decision):
        if tokens.weight is None:
            return None
        return tf.gather(tokens.weight, decision.token_index) > 0

    def _pair_priority(self, decision):
        num_pairs = tf.shape(decision.expert_index)[0]
        if not self._ranked_choices:
            return tf.zeros([num_pairs], tf.int32)
        k = decision.top_indices.shape[-1]
        return tf.range(num_pairs, dtype=tf.int32) % k

    def _dropless_dispatch(self, tokens, decision, training):
        y = dispatch.dropless_dispatch(
            tokens.rows, decision.token_index, decision.expert_index, decision.gate,
            self.experts, tf.shape(tokens.rows)[0], training=training,
        )
        return y, tf.zeros([], tf.float32), None

    def _capacity_dispatch(self, tokens, decision, training):
        y, dropped = dispatch.capacity_dispatch(
            tokens.rows, decision.token_index, decision.expert_index, decision.gate,
            self.experts, tf.shape(tokens.rows)[0], self.capacity_factor,
            valid=self._valid_pairs(tokens, decision),
            priority=self._pair_priority(decision), training=training,
        )
        return y, dropped, None

    def _expert_parallel_dispatch(self, tokens, decision, training):
        return ep.expert_parallel_dispatch(
            tokens.rows, decision.token_index, decision.expert_index, decision.gate,
            self.experts, tf.shape(tokens.rows)[0], self.capacity_factor,
            valid=self._valid_pairs(tokens, decision),
            priority=self._pair_priority(decision), training=training,
        )

    def _restore(self, y, tokens):
        """Answers of the routed rows back to `[..., out]` (masked positions: 0)."""
        if tokens.kept is not None:
            y = scatter_rows(y, tokens.kept, tokens.num_positions, 0.0)
        elif tokens.weight is not None:
            y = y * tf.cast(tokens.weight, y.dtype)[:, None]
        return tf.reshape(y, tf.concat([tokens.lead_shape, tf.shape(y)[1:]], axis=0))

    def _report(self, inputs, routing, training):
        """The call's routing to the layer's metrics and its observers."""
        update_routing_metrics(
            self.routing_metrics, routing.importance, routing.counts, routing.dropped_fraction
        )
        if routing.primary_counts is not None:
            update_routing_metrics(
                self.primary_routing_metrics, routing.primary_importance,
                routing.primary_counts, tf.zeros([]),
            )
        for observer in self._routing_observers:
            observer(inputs, routing, training)

    def _global_balancing_loss(self, decision):
        """The balancing loss over the batch of *all* replicas (Section 3).

        Under a `tf.distribute` strategy each replica sees a shard of the
        batch. The paper computes Importance and Load over the whole batch,
        so the per-expert sums are added across replicas (an all-reduce,
        whose gradient is again an all-reduce) before the CV^2 is taken.
        Keras divides added losses by the replica count and sums the
        replicas' gradients, which then equals one device's gradient on the
        global batch. `balancing_scope="replica"` keeps per-replica losses.
        """
        if self.balancing_scope != "global":
            return decision.aux_loss
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync <= 1:
            return decision.aux_loss
        # One flat vector, one collective: replicas then issue the same
        # collectives in the same order in the forward and backward passes.
        names = sorted(decision.loss_stats)
        parts = [tf.reshape(tf.cast(decision.loss_stats[n], tf.float32), [-1]) for n in names]
        sizes = [int(p.shape[0]) for p in parts]
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat(parts, axis=0))
        totals = {
            n: tf.reshape(t, tf.shape(decision.loss_stats[n]))
            for n, t in zip(names, tf.split(summed, sizes), strict=True)
        }
        return self.gating.balancing_loss(totals) + decision.local_loss


@keras.saving.register_keras_serializable(package="keras_moe")
class MoE(SparseMoEBase):
    """Sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017).

    `y = sum_i G(x)_i E_i(x)` (Eq. 1) where `G` is a sparse gate that keeps
    `k` of `num_experts` experts per position (Eq. 3-5 for the default
    noisy top-k gate) and each expert is a feed-forward network with one
    hidden layer (`expert_hidden_layers` of them for deep experts). Only
    the chosen experts are evaluated: compute grows with `k`, not with
    `num_experts`, and no tensor of size `tokens * num_experts * width` is
    ever built.

    In training the layer adds the balancing losses of Section 4 with
    `add_loss`, so `model.fit` optimises them:
    `importance_weight * CV(Importance)^2 + load_weight * CV(Load)^2`
    (Eq. 6-7 and 8-11), Load being the paper's smooth estimator.
    Routing statistics (CV of importance and load, max/mean load, fraction
    of experts left without tokens, dropped fraction) are Keras metrics and
    show in `fit` logs as `<layer name>_<statistic>`.

    Inputs may have any rank >= 2 (`[..., d]`); every position is routed on
    its own. Positions masked by a Keras mask are not routed, produce
    zeros and are left out of the statistics. Routing runs in float32 under
    mixed precision; expert matmuls follow the layer's dtype policy.

    Args:
        num_experts: int >= 1, `n` in the paper.
        expert_hidden_dim: int >= 1, hidden width of each expert.
        k: int, experts per position, `1 <= k <= num_experts`.
        output_dim: int or None (same width as the input).
        gating: `"noisy_top_k"` (Eq. 3-5), `"top_k"` (no noise),
            `"switch"` (top-1, Switch Transformer loss; needs `k=1`),
            `"softmax"` (dense mixture; needs `k=num_experts`) or
            `"batchwise"` (App. F, balanced batchwise mask in training,
            learned thresholds at inference).
        importance_weight: float >= 0, `w_importance` (Eq. 7).
        load_weight: float >= 0, `w_load` (Eq. 11).
        noise_epsilon: float >= 0, added to the noise std.
        capacity_factor: None for dropless dispatch (every position reaches
            its k experts), or a float > 0: each expert then has a static
            capacity of `ceil(capacity_factor * T * k / num_experts)`
            positions per call, first choices are served first, and the
            overflow is dropped (reported as `dropped_fraction`).
        expert_activation: activation of the experts' hidden layer.
        use_bias: bool, biases in the experts.
        threshold_weight: float >= 0, weight of the batchwise threshold loss
            (Eq. 18; used by `gating="batchwise"` only).
        seed: optional int, seeds the initializers and the gating noise.
        balancing_scope: `"global"` (default): under a `tf.distribute`
            strategy the balancing losses are computed over the batch of all
            replicas (importance and load summed across replicas before the
            CV^2), as the paper computes them over the whole batch;
            `"replica"`: each replica's own shard.
        expert_hidden_layers: int >= 1, hidden layers of width
            `expert_hidden_dim` in each expert (the paper's MoE-1-Deep has
            4); see `keras_moe.FeedForwardExperts`.
        expert_parallel: bool (default False). Built under a
            `tf.distribute.MirroredStrategy` of `R` replicas, each replica
            holds `num_experts / R` experts instead of a copy of all of them,
            and tokens travel to their experts' replica and back (Section
            3.1; see `keras_moe.expert_parallel`). `num_experts` must be
            divisible by `R`. The gate stays data parallel.
        expert_dropout: float in [0, 1) (default 0), dropout on the experts'
            hidden activations in training (Switch Transformer's expert
            dropout; see `keras_moe.FeedForwardExperts`).
        pool_size: None (default), or an int `k <= P <= num_experts`: each
            document routes within a pool of its top `P` experts (EMO; see
            `keras_moe.pools`). `pool_size_range`: optional `(low, high)`,
            `P` drawn per training call. `pool_by`: `"row"` (each batch row
            is one document) or `"document_ids"` (the call argument).
        recompute_hidden: bool (default False), recompute the experts'
            hidden activations in the backward pass instead of keeping them
            (App. D; see `keras_moe.recompute`). Passed through `**kwargs`.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., d]`.
        training: bool; noise, balancing losses and `expert_dropout`
            apply only in training.
        mask: optional bool `[...]` (a Keras mask is passed automatically).
        return_routing: bool; if True, return `(y, routing)`.
        document_ids: int `[...]`, each position's document
            (`pool_by="document_ids"` only).

    Returns:
        `y` of shape `[..., output_dim or d]`, or `(y, routing)` with
        `routing` a `keras_moe.Routing`.

    Example:

    >>> layer = MoE(num_experts=8, expert_hidden_dim=16, k=2)
    >>> y, routing = layer(tf.random.normal([4, 5, 12]), return_routing=True)
    >>> y.shape, routing.expert_indices.shape
    (TensorShape([4, 5, 12]), TensorShape([4, 5, 2]))
    """

    def __init__(
        self,
        num_experts,
        expert_hidden_dim,
        k=4,
        output_dim=None,
        gating="noisy_top_k",
        importance_weight=0.1,
        load_weight=0.1,
        noise_epsilon=1e-2,
        capacity_factor=None,
        expert_activation="relu",
        use_bias=True,
        threshold_weight=1.0,
        seed=None,
        balancing_scope="global",
        expert_hidden_layers=1,
        expert_parallel=False,
        expert_dropout=0.0,
        pool_size=None,
        pool_size_range=None,
        pool_by="row",
        **kwargs,
    ):
        validate_common(num_experts, k, importance_weight, load_weight, noise_epsilon)
        if gating not in GATING_TYPES:
            raise ValueError(
                f"`gating` must be one of {', '.join(map(repr, GATING_TYPES))}. "
                f"Received: gating={gating!r}"
            )
        super().__init__(
            num_experts=num_experts, expert_hidden_dim=expert_hidden_dim,
            output_dim=output_dim, gating=gating, importance_weight=importance_weight,
            load_weight=load_weight, noise_epsilon=noise_epsilon,
            capacity_factor=capacity_factor, expert_activation=expert_activation,
            use_bias=use_bias, seed=seed, balancing_scope=balancing_scope,
            expert_hidden_layers=expert_hidden_layers, expert_parallel=expert_parallel,
            expert_dropout=expert_dropout, **kwargs,
        )
        self.k = k
        self.threshold_weight = float(threshold_weight)
        self.gating = make_gating(
            gating, num_experts, k, importance_weight, load_weight, noise_epsilon,
            threshold_weight, seed,
        )
        self._init_routing_options(pool_size, pool_size_range, pool_by, num_experts, k)

    def get_config(self):
        config = {
            "num_experts": self.num_experts,
            "k": self.k,
            "threshold_weight": self.threshold_weight,
        }
        return {**super().get_config(), **config}
