"""Command-line flags derived from :class:`TrainConfig` and the loss registry.

How a TrainConfig field becomes a flag: :func:`config_options` turns each field into one
``inspect.Parameter`` (:func:`_field_option`: the name ``--field-name``, the type, help and
choices from the field; a bool becomes ``--x/--no-x``), and each hyper-parameter a registered
loss declares into one more (:func:`loss_options`). A command's parameter builder
(:mod:`facecli.commands.training`) adds its fixed arguments; :func:`derived_command` fixes that
list as the callback's signature, once, and Typer reads flags from it like any signature.
So a field added to ``TrainConfig`` is a flag of ``train`` with no second list to edit.
Flags default to None ("not given"), so a config file's value survives unless the flag is
written; the help text shows the setting's real default.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from facecli.engine.config import TrainConfig, choices, flag_name, with_absolute_paths
from facecli.errors import UserError


def derived_command(body: Callable, parameters: list[inspect.Parameter]) -> Callable:
    """``body(**kw)`` as a Typer callback whose signature is ``parameters``: computed by the caller once, assigned once here."""

    def command(**kwargs):
        return body(**kwargs)

    command.__name__, command.__qualname__, command.__doc__ = body.__name__, body.__name__, body.__doc__
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}  # Typer reads types through get_type_hints
    return command


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
        return param(name, Optional[bool], opt)
    if typing.get_origin(kinds[0]) is list and not extra.get("csv"):
        opt = typer.Option(None, flag, help=help_text.replace("[default: []]", ""), show_default=False)
        return param(name, Optional[List[str]], opt)
    kwargs: dict[str, Any] = {"help": help_text, "show_default": False}
    annotation: Any = Optional[str]
    if extra.get("choices"):
        annotation = Optional[choice_type(name, choices(name))]
    elif kinds == (int,):
        annotation = Optional[int]
    elif kinds == (float,):
        annotation = Optional[float]
    return param(name, annotation, typer.Option(None, flag, **kwargs))


def choice_type(name: str, values: list[str]) -> type[enum.Enum]:
    """An Enum of a registry's names: Typer shows, completes and checks the choices from it."""
    return enum.Enum(name.title().replace("_", ""), {v: v for v in values}, type=str)


def param(name: str, annotation, default) -> inspect.Parameter:
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
        defaults = ", ".join(f"{n} {('on' if h.default else 'off') if h.switch else format(h.default, 'g')}" for n, h in owners)
        help_text = f"{owners[0][1].help} (default: {defaults})."
        flag = "--" + key.replace("_", "-")
        if owners[0][1].switch:  # on/off: --elastic-sort / --no-elastic-sort
            params.append(param(key, Optional[bool], typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)))
        else:
            params.append(param(key, Optional[float], typer.Option(None, flag, help=help_text, show_default=False)))
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
    from facecli.engine.config import shorten

    return {k: f"{path}: {shorten(str(k))}" for k in values}


# --------------------------------------------------------------------------- train's configuration


def train_values(kw: dict[str, Any], checkpoints_dir: Path, warn: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, str]]:
    """(values, origins) of ``train``: the --config file < the flags < MODEL; no data is looked at."""
    from facecli.engine.config import read_config_file

    values: dict = {}
    origins: dict = {}
    if kw["config"] is not None:
        values = read_config_file(kw["config"])
        origins = file_origins(kw["config"], values)
    flags = given_values(kw)
    if kw["model"] and values.get("model") not in (None, kw["model"].value):
        _drop_other_loss_options(kw["config"], values, flags, kw["model"].value, warn)
    values.update(flags)
    origins.update(flag_origins(flags))
    if kw["model"]:
        values["model"], origins["model"] = kw["model"].value, "MODEL"
    if "model" not in values:
        raise UserError("No model to train: name one (`facecli train arcface`) or set `model:` in the --config file.")
    if kw["train_rec"]:
        values["train_dir"], origins["train_dir"] = str(kw["train_rec"]), "--train-rec"
    values.setdefault("checkpoints_dir", str(checkpoints_dir))
    return values, origins


def _drop_other_loss_options(path: Path, values: dict, flags: dict, model: str, warn: Callable[[str], None]) -> None:
    """A file written for another loss: its loss hyper-parameters are that loss's, not ``model``'s.

    ArcFace's margin 0.5 is not CosFace's 0.35 (nor on the same scale): the new loss starts
    from its own defaults (flags still set them), and one line says so.
    """
    from facecli.engine.config import _loss_option_names
    from facecli.losses import LOSSES

    dropped = {k: values.pop(k) for k in list(values) if k in _loss_option_names() and k not in flags}
    if not dropped:
        return
    cls = LOSSES.get(model)
    defaults = ", ".join(f"{h.option} {h.default:g}" for h in cls.hyper_parameters()) if cls is not None else ""
    shown = ", ".join(f"{k} {v}" for k, v in dropped.items())
    warn(f"{path}: was written for {values.get('model')}; its {shown} are not used for {model}, which starts from its own defaults"
         + (f" ({defaults})" if defaults else "") + "; give --margin/--scale to change them.")


def with_data_paths(cfg: TrainConfig, dataset_path, *, check: bool, root_given: bool) -> TrainConfig:
    """``cfg`` with its data folders found (under the dataset root when not given) and every path absolute.

    ``check`` (training): the training folder must exist. Without it (``--print-config``)
    nothing needs to exist: a folder that cannot be found stays as given (None when not given).
    Absolute paths: a saved or printed config works from any folder.
    """
    from facecli.data import resolve_lfw_dir, resolve_train_dir

    root = dataset_path
    if check:
        if not root_given and root is not None and cfg.train_dir is None and not Path(root).expanduser().is_dir():
            raise UserError(f"DATASET_PATH {str(root)!r} does not exist or is not a directory.", hint="Fix DATASET_PATH or pass --dataset-path.")
        train, lfw = resolve_train_dir(cfg.train_dir, root), resolve_lfw_dir(cfg.lfw_dir, root)
    else:
        train = _found_or(lambda: resolve_train_dir(cfg.train_dir, root), cfg.train_dir)
        lfw = _found_or(lambda: resolve_lfw_dir(cfg.lfw_dir, root), cfg.lfw_dir)
    paths = {"train_dir": train, "lfw_dir": lfw, "identities_file": cfg.identities_file, "checkpoints_dir": cfg.checkpoints_dir}
    return cfg.model_copy(update=with_absolute_paths(paths))


def _found_or(find: Callable[[], Any], given: Any) -> Any:
    try:
        return find()
    except UserError:
        return given
