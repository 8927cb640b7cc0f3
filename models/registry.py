"""Named presets of a model class: lookup, argument checks and construction.

`keras_moe.models.presets` (language models) and
`keras_moe.models.translation_presets` (translation models) each hold one
`PresetRegistry`; the lookup and the checks are written once, here.
"""

import copy
import importlib
import inspect


class PresetRegistry:
    """Presets of one model class, as keyword arguments of its constructor.

    Args:
        presets: dict preset name -> dict of constructor arguments
            (without `vocab_size`).
        model_class: `"module:ClassName"` of the model, imported when first
            needed (the preset modules are imported by the model modules'
            package, so a direct import could be circular).

    Example:

    >>> registry = PresetRegistry(
    ...     {"tiny": {"model_dim": 8}}, "keras_moe.models.lm:LanguageModel")
    >>> registry.get("tiny"), registry.defaults()["k"]
    ({'model_dim': 8}, 4)
    """

    def __init__(self, presets, model_class):
        self.presets = presets
        self.model_class_path = model_class

    @property
    def model_class(self):
        module, _, name = self.model_class_path.partition(":")
        return getattr(importlib.import_module(module), name)

    def names(self):
        """The preset names, sorted."""
        return sorted(self.presets)

    def get(self, name):
        """A copy of preset `name`'s arguments; ValueError naming it if unknown."""
        if name not in self.presets:
            raise ValueError(
                f"Unknown preset {name!r}. Known presets: {', '.join(self.names())}"
            )
        return copy.deepcopy(self.presets[name])

    def defaults(self):
        """The model's keyword arguments and defaults, read from its signature."""
        parameters = inspect.signature(self.model_class.__init__).parameters
        return {
            name: p.default
            for name, p in parameters.items()
            if name not in ("self", "vocab_size") and p.kind is p.POSITIONAL_OR_KEYWORD
        }

    def check(self, kwargs, what):
        """ValueError naming every key of `kwargs` that the model does not take."""
        known = self.defaults()
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(
                f"Unknown {what} {', '.join(map(repr, unknown))}: not a "
                f"{self.model_class.__name__} argument. Known: {', '.join(sorted(known))}"
            )

    def resolve(self, preset_or_kwargs):
        """All constructor arguments of a preset name or of an argument dict."""
        if isinstance(preset_or_kwargs, str):
            given = self.get(preset_or_kwargs)
        else:
            given = {k: v for k, v in dict(preset_or_kwargs).items() if k != "vocab_size"}
            self.check(given, "argument")
        return {**self.defaults(), **given}

    def build(self, preset, vocab_size, **overrides):
        """`Model(vocab_size, **preset arguments, **overrides)`."""
        kwargs = self.get(preset)
        self.check(overrides, "override")
        kwargs.update(overrides)
        return self.model_class(vocab_size, **kwargs)
