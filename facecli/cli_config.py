"""Command-line options derived from :class:`TrainConfig` and the loss registry.

No setting is written out here: each flag's name, type, help, default and choices come
from the field that defines the setting (or from the :class:`facecli.losses.HParam` a loss
declares), so a field added to ``TrainConfig`` is a flag of ``train`` with no second list
to edit. Flags default to None ("not given"), so a config file's value survives unless
the flag is written; the help text shows the setting's real default.

Typer builds a command's options from its callback's signature. :class:`DerivedCommand`
computes that signature when the command is built, after plugins have registered their
losses and backbones, so a user's own head brings its own flags.
"""

from __future__ import annotations

import enum
import inspect
import os
import types
import typing
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from facecli.engine.config import TrainConfig, choices, flag_name
from facecli.errors import UserError

PLUGIN_GROUP = "facecli.plugins"
PLUGIN_ENV = "FACECLI_PLUGINS"
_loaded: set[str] = set()


def load_plugins() -> None:
    """Import plugin modules (entry points in ``facecli.plugins``, or ``FACECLI_PLUGINS=mod1,mod2``):
    importing one registers its losses and backbones."""
    names = [ep.value for ep in entry_points(group=PLUGIN_GROUP)]
    names += [n.strip() for n in os.environ.get(PLUGIN_ENV, "").split(",") if n.strip()]
    for name in names:
        if name in _loaded:
            continue
        module = name.split(":")[0]
        try:
            import_module(module)
        except ImportError as e:
            raise UserError(f"Plugin module {module!r} (from {PLUGIN_ENV} or the {PLUGIN_GROUP} entry points) cannot be imported: {e}.") from e
        _loaded.add(name)


class DerivedCommand:
    """A Typer callback whose parameters are computed when the command is built."""

    def __init__(self, body: Callable, parameters: Callable[[], list[inspect.Parameter]]):
        self.body, self.parameters = body, parameters
        self.__name__ = body.__name__
        self.__doc__ = body.__doc__
        self.__wrapped_body__ = body

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(self.parameters())

    @property
    def __annotations__(self) -> dict:  # typer reads type hints through typing.get_type_hints
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **kwargs):
        return self.body(**kwargs)


def _unwrap_optional(annotation) -> tuple[Any, ...]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in args if a is not type(None))
    return (annotation,)


def _field_option(name: str, field, default: Any) -> inspect.Parameter:
    """One ``--flag`` for a TrainConfig field."""
    extra = field.json_schema_extra or {}
    flag = flag_name(name)
    kinds = _unwrap_optional(field.annotation)
    help_text = field.description if default is None else f"{field.description} [default: {_show(default)}]"
    if kinds == (bool,):
        opt = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
        return _param(name, Optional[bool], opt)
    if typing.get_origin(kinds[0]) is list and not extra.get("csv"):
        opt = typer.Option(None, flag, help=help_text.replace("[default: []]", ""), show_default=False)
        return _param(name, Optional[List[str]], opt)
    kwargs: dict[str, Any] = {"help": help_text, "show_default": False}
    annotation: Any = Optional[str]
    if extra.get("choices"):
        annotation = Optional[choice_type(name, choices(name))]
    elif kinds == (int,):
        annotation = Optional[int]
    elif kinds == (float,):
        annotation = Optional[float]
    return _param(name, annotation, typer.Option(None, flag, **kwargs))


def choice_type(name: str, values: list[str]) -> type[enum.Enum]:
    """An Enum of a registry's names: Typer shows, completes and checks the choices from it."""
    return enum.Enum(name.title().replace("_", ""), {v: v for v in values}, type=str)


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def loss_options() -> list[inspect.Parameter]:
    """One ``--flag`` per hyper-parameter key any registered loss declares (``--scale``, ``--margin``, ...)."""
    from facecli.losses import LOSSES

    by_key: dict[str, list] = {}
    for name in sorted(LOSSES):
        for h in LOSSES[name].hyper_parameters():
            by_key.setdefault(h.option, []).append((name, h))
    params = []
    for key, owners in by_key.items():
        defaults = ", ".join(f"{n} {h.default:g}" for n, h in owners)
        help_text = f"{owners[0][1].help} (default: {defaults})."
        params.append(_param(key, Optional[float], typer.Option(None, "--" + key.replace("_", "-"), help=help_text, show_default=False)))
    return params


def config_options(*, keys: set[str] | None = None, defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """Options for the TrainConfig fields in ``keys`` (all but ``model`` when None) and every loss option."""
    defaults = defaults or {}
    params = []
    for name, field in TrainConfig.model_fields.items():
        if name == "model" or (keys is not None and name not in keys):
            continue
        params.append(_field_option(name, field, defaults.get(name, field.default)))
    if keys is None or "loss_options" in keys:
        params += loss_options()
    return params


def resume_keys() -> set[str]:
    """The settings ``facecli resume`` may change: those of the run's environment."""
    return {n for n, f in TrainConfig.model_fields.items() if (f.json_schema_extra or {}).get("resume")}


def given_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The config settings the user wrote on the command line (flags left at None are not given)."""
    from facecli.engine.config import all_keys

    out = {}
    for key, value in kwargs.items():
        if key not in all_keys() or value is None or (isinstance(value, list) and not value):
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        field = TrainConfig.model_fields.get(key)
        if field is not None and (field.json_schema_extra or {}).get("csv"):
            value = _csv(value, key)
        out[key] = value
    return out


def _csv(text: str, key: str) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag_name(key)} must be comma-separated numbers, got {text!r}.") from None


def flag_origins(values: dict[str, Any]) -> dict[str, str]:
    return {k: flag_name(k) if k in TrainConfig.model_fields else "--" + k.replace("_", "-") for k in values}


def file_origins(path: Path, values: dict[str, Any]) -> dict[str, str]:
    return {k: f"{path}: {k}" for k in values}
