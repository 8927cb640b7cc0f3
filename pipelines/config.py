"""Typed, strict run configurations: dataclasses, YAML files and `key=value` overrides.

A configuration is a tree of dataclasses. It is read from a YAML file, then
overridden by `--set section.key=value` flags (values parsed as YAML
scalars), then checked: an unknown key or a value of the wrong type is an
error naming the dotted key and, for files, the file. The resolved
configuration is written back as YAML into every run directory, so a run can
be repeated from its own `config.yaml`.
"""

import dataclasses
import re
import types
import typing

import yaml


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 numbers: PyYAML (YAML 1.1) reads `3e-4` as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _load_yaml(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration file or override names an unknown key or holds a bad value."""


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key):
    """`value` checked against the annotation `tp` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(
            f"`{key}` must be {' or '.join(_type_name(o) for o in options)}. "
            f"Received: {key}={value!r}"
        )
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"`{key}` must be one of {', '.join(map(repr, choices))}. Received: {key}={value!r}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` must be a list. Received: {key}={value!r}")
        (item_type, *_) = typing.get_args(tp) or (typing.Any,)
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is typing.Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false. Received: {key}={value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer. Received: {key}={value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number. Received: {key}={value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a string. Received: {key}={value!r}")
        return value
    raise TypeError(f"unsupported configuration type {tp!r} for `{key}`")


def from_dict(cls, data, prefix=""):
    """Build the dataclass `cls` from a (nested) dict; missing keys keep defaults.

    Raises:
        ConfigError: naming the dotted key of an unknown key or a bad value.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the configuration"
        raise ConfigError(f"`{where}` must be a mapping of keys to values. Received: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key `{prefix}{unknown[0]}`; known keys here: "
            + ", ".join(f"{prefix}{name}" for name in sorted(fields))
        )
    values = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from None


def to_dict(config):
    """The configuration as plain dicts, lists and scalars (tuples become lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def parse_override(text):
    """`"a.b=c"` -> `(["a", "b"], value)`, the value parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"an override must look like section.key=value. Received: {text!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
    return key.split("."), value


def apply_overrides(data, overrides):
    """Set each `a.b=c` of `overrides` in the nested dict `data` (a copy is returned)."""
    import copy

    data = copy.deepcopy(data) if data else {}
    if overrides and not isinstance(data, dict):
        raise ConfigError(f"the configuration must be a mapping of sections. Received: {data!r}")
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:  # a section left empty in the file
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: `{part}` is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(cls, path=None, overrides=()):
    """Read `cls` from the YAML file `path` (optional) and apply `overrides`.

    Raises:
        FileNotFoundError: naming a missing file.
        ConfigError: naming the file and the key of any unknown key or bad value.
    """
    data = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = _load_yaml(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"configuration file not found: {path}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not a valid YAML file ({error})") from None
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as error:
        where = f"{path} (with --set overrides)" if path and overrides else path or "--set"
        raise ConfigError(f"{where}: {error}") from None


def dump_config(config):
    """YAML text of a configuration, keys in definition order."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def save_config(config, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write(dump_config(config))


def check_positive(name, value, allow_zero=False):
    """ValueError naming `name` unless `value` is > 0 (>= 0 with `allow_zero`); None passes.

    The check every configuration section's `__post_init__` makes of its
    counts, sizes and rates.

    Example:

    >>> check_positive("steps", 10)
    >>> check_positive("steps", 0)
    Traceback (most recent call last):
    ...
    ValueError: `steps` must be > 0. Received: steps=0
    """
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be {bound}. Received: {name}={value!r}")


# WordPiece learners (`data.vocab_learner`): TensorFlow Text's Python learner,
# or HuggingFace's compiled one (`keras_moe.pipelines.data.wordpiece_learner`).
VOCAB_LEARNERS = ("tensorflow_text", "tokenizers")


def check_learner(value, name="vocab_learner"):
    """ValueError naming `name` unless `value` is one of `VOCAB_LEARNERS`."""
    if value not in VOCAB_LEARNERS:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, VOCAB_LEARNERS))}. "
            f"Received: {name}={value!r}"
        )


class PresetOverrides:
    """Mixin of a `model` section: a `preset` name plus optional argument overrides."""

    def overrides(self):
        """The arguments set (not None) besides `preset`, as model keyword arguments."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "preset" and getattr(self, f.name) is not None
        }
