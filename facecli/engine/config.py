"""The training configuration: every setting of a run, defined once, validated once, saved with it.

Each field of :class:`TrainConfig` names a setting with its type, default, range or choices
and help text. The ``train``, ``resume`` and ``demo`` flags are derived from these fields
(``facecli.commands.flags``), config files use the field names as keys, and every run writes
its resolved configuration to ``config.yaml`` so that ``facecli train --config`` starts it
again. The loss's own hyper-parameters (``scale``, ``margin``, ...) are declared by the
loss classes (:class:`facecli.losses.HParam`) and stored here as extra keys.

A value a user wrote that does not fit is one :class:`UserError` line naming the flag or
the file and key it came from (``origins``).
"""

from __future__ import annotations

import json
import math
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from facecli.errors import UserError
from facecli.hardware import DEVICE_HELP, is_device_name

# Registries the choices of a field come from, resolved when asked (plugins may add to them).
_CHOICES = {
    "losses": lambda: sorted(__import__("facecli.losses", fromlist=["LOSSES"]).LOSSES),
    "backbones": lambda: sorted(__import__("facecli.backbones", fromlist=["BACKBONES"]).BACKBONES),
    "optimizers": lambda: list(__import__("facecli.engine.optim", fromlist=["OPTIMIZERS"]).OPTIMIZERS),
    "schedulers": lambda: list(__import__("facecli.engine.optim", fromlist=["SCHEDULERS"]).SCHEDULERS),
}


def setting(default: Any, help: str, *, flag: str | None = None, choices: str | None = None, resume: bool = False, csv: bool = False, **limits) -> Any:
    """A field with its help text and command-line facts.

    ``flag``: the option name when it is not ``--field-name``; ``choices``: a registry name
    (see ``_CHOICES``); ``resume``: also a flag of ``facecli resume`` (settings of the run's
    environment, which may change when it continues); ``csv``: a list given as ``a,b,c``.
    """
    extra = {"flag": flag, "choices": choices, "resume": resume, "csv": csv}
    return Field(default, description=help, json_schema_extra=extra, **limits)


class TrainConfig(BaseModel):
    """Every choice of a training run."""

    model_config = ConfigDict(extra="allow", validate_assignment=False, allow_inf_nan=False)

    model: str = setting(..., "Loss: sphereface, cosface, arcface, curricularface, adaface, magface, elasticface or facenet (and registered plugins).", choices="losses")
    # data
    train_dir: str | None = setting(None, "Folder of identity folders, or of train.rec/train.idx (default: under the dataset root).", resume=True)
    identities_file: str | None = setting(None, "Train only on the identities listed in this file (e.g. LFW's peopleDevTrain.txt).", flag="identities")
    lfw_dir: str | None = setting(None, "LFW folder for evaluation (default: under the dataset root).", resume=True)
    image_size: int = setting(112, "Input size in pixels (square).", ge=16)
    crop_fraction: float | None = setting(None, "Centre crop before resizing (default: 0.6 for 250x250 images, else 1).", gt=0, le=1)
    images_per_identity: int = setting(4, "FaceNet: K images per identity in each P x K batch.", ge=2)
    workers: int | Literal["auto"] = setting(
        "auto", "DataLoader workers per training process, or auto: the CPUs this process may use (affinity, container quota) / processes on this machine, less one, at most 16.",
        resume=True, union_mode="left_to_right",
    )
    decode: Literal["cpu", "gpu"] = setting(
        "cpu", "Where JPEGs are decoded: cpu (DataLoader workers) or gpu (nvJPEG on the training GPU, workers only read files; non-JPEG, CMYK or corrupt files fall back to the CPU).",
        resume=True,
    )
    # network
    backbone: str = setting("resnet50", "Backbone network.", choices="backbones")
    pretrained: bool = setting(False, "Start the backbone from ImageNet weights.")
    embedding_dim: int | None = setting(None, "Embedding size (default: the loss's, 512; 128 for facenet).", ge=2)
    dropout: float = setting(0.0, "Dropout before the embedding layer.", ge=0, lt=1)
    init_from: str | None = setting(
        None, "Fine-tune: start the network from this facecli checkpoint (a run's latest.pt or best.pt) with a new head for this data's identities."
    )
    freeze_backbone_epochs: int = setting(0, "Fine-tune: train only the head and the embedding layer for the first N epochs (with --init-from).", ge=0)
    # optimisation
    epochs: int = setting(20, "Epochs to train (resume: the new total).", ge=1, resume=True)
    batch_size: int = setting(128, "Batch size per process (global batch = batch size x processes).", ge=1)
    lr: float | None = setting(None, "Peak learning rate (default: 0.1 for SGD, 1e-3 for AdamW).", gt=0)
    optimizer: str = setting("sgd", "Optimizer: sgd (with momentum) or adamw.", choices="optimizers")
    momentum: float = setting(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = setting(5e-4, "Weight decay (not applied to norms and biases).", ge=0)
    scheduler: str = setting("cosine", "Learning-rate schedule after the warm-up.", choices="schedulers")
    warmup_epochs: float = setting(1.0, "Linear learning-rate warm-up length in epochs.", ge=0)
    milestones: list[float] | None = setting(None, "Step schedule: comma-separated epochs where the lr drops x0.1 (default: 60% and 85% of the run).", csv=True)
    margin_warmup_epochs: float | None = setting(
        None, "Ramp the loss's margin in from plain softmax over this many epochs (default: the first 30% of the run; 0: off).", ge=0
    )
    clip_grad_norm: float | None = setting(
        None, "Clip the network's gradient to this total L2 norm before each step (arcface_torch: 5; the head is not clipped).", gt=0
    )
    scale_warmup: bool = setting(
        True, "During the margin warm-up, also ramp the logit scale from AdaCos's sqrt(2) ln(C-1) (C classes) up to s (--no-scale-warmup: s from the start)."
    )
    seed: int = setting(0, "Random seed (data order, flips, initialisation).", ge=0, le=2**32 - 1)
    # hardware
    device: str = setting("auto", f"{DEVICE_HELP}.", resume=True)
    amp: bool = setting(True, "Mixed precision on CUDA (bf16 where the GPU has it, else fp16 with loss scaling).", resume=True)
    amp_dtype: Literal["auto", "bf16", "fp16"] = setting("auto", "Mixed-precision type on CUDA: auto (bf16 where native, else fp16), bf16, or fp16 (with a GradScaler).")
    channels_last: bool | None = setting(None, "NHWC memory layout (default: on for CUDA).")
    compile: bool = setting(False, "torch.compile the model.")
    sync_bn: bool = setting(False, "Under DDP, BatchNorm statistics over the global batch (default: per process, as large-scale trainers run).")
    sharded_head: bool = setting(False, "Under DDP, split the class weights across processes (Partial FC style).")
    sample_rate: float = setting(
        1.0, "Partial FC: each step, compute logits for the batch's classes plus random others, ceil(R x classes) per process in all (1: every class).", gt=0, le=1
    )
    # run
    run_name: str | None = setting(None, "Run directory name (default: a timestamp).")
    checkpoints_dir: str = setting("checkpoints", "Where runs are written (default: CHECKPOINTS_DIR or ./checkpoints).", resume=True)
    checkpoint_every: int = setting(0, "Also save latest.pt every N steps (0: at epoch ends only).", ge=0)
    keep_epochs: int = setting(3, "How many epoch_NNN.pt files to keep.", ge=1)
    log_every: int = setting(10, "Read loss, lr and images/s back from the device and log them every N steps.", ge=1)
    # evaluation
    eval: bool = setting(True, "Tune the threshold on View 1 and report View 2 at the end.", resume=True)
    eval_every: int = setting(0, "Evaluate View 1 every N epochs and keep best.pt (0: never).", ge=0)
    flip: bool = setting(True, "Flip test-time augmentation in evaluation.")
    eval_batch_size: int | None = setting(None, "Evaluation batch size (default: as large as the device takes).", ge=1)
    val_bins: list[str] = setting([], "insightface .bin sets to evaluate (repeatable).", flag="val-bin")
    # tracking
    wandb: bool | None = setting(None, "Track in Weights & Biases (default: on when a key is set).", resume=True)
    wandb_artifacts: bool = setting(False, "Upload checkpoints as W&B artifacts.")

    # ------------------------------------------------------------------ validation
    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, values: Any) -> Any:
        """``epochs: true`` is a mistake, not 1: pydantic would read a bool as a number."""
        if isinstance(values, dict):
            for key, value in values.items():
                field = cls.model_fields.get(key)
                if field is not None and isinstance(value, bool) and bool not in _types(field.annotation) and {int, float} & set(_types(field.annotation)):
                    raise _FieldError(key, f"must be {_rule(field, field.annotation)}", got=value)
        return values

    @model_validator(mode="after")
    def _resolve(self) -> "TrainConfig":
        from facecli.losses import LOSSES

        for name in ("model", "backbone", "optimizer", "scheduler"):
            _check_choice(self, name)
        loss = LOSSES[self.model]
        if self.embedding_dim is None:
            self.embedding_dim = loss.default_embedding_dim
        if self.lr is None:
            from facecli.engine.optim import DEFAULT_LR

            self.lr = DEFAULT_LR[self.optimizer]
        if not math.isfinite(self.lr):
            raise _FieldError("lr", f"must be {_rule(TrainConfig.model_fields['lr'], float)}")
        if self.margin_warmup_epochs is None:
            self.margin_warmup_epochs = round(0.3 * self.epochs, 3) if loss.shardable else 0.0
        if self.workers != "auto" and self.workers < 0:
            raise _FieldError("workers", "must be a non-negative integer or auto")
        if self.milestones is not None and any(not (m > 0) for m in self.milestones):
            raise _FieldError("milestones", "epochs must be positive")
        if self.freeze_backbone_epochs and not self.init_from:
            raise _FieldError("freeze_backbone_epochs", "applies to fine-tuning: give --init-from CKPT too")
        if self.sharded_head and not loss.shardable:
            raise _FieldError("sharded_head", f"applies to margin heads, not {self.model}")
        if self.sample_rate < 1 and not loss.shardable:
            raise _FieldError("sample_rate", f"samples the classes of a margin head; {self.model} has no class weights")
        if not is_device_name(self.device):
            raise _FieldError("device", f": Unknown device {shorten(repr(self.device))}. Use {DEVICE_HELP}", got=None)
        self._resolve_loss_options(loss)
        return self

    def _resolve_loss_options(self, loss) -> None:
        """Extra keys must be hyper-parameters of the chosen loss; fill in its defaults."""
        extra = self.__pydantic_extra__
        mine = {h.option: h for h in loss.hyper_parameters()}
        for key in list(extra):
            if key not in mine:
                users = sorted(name for name, cls in _losses().items() if key in {h.option for h in cls.hyper_parameters()})
                if users:
                    raise _FieldError(key, f"applies to {', '.join(users)}, not {self.model}")
                raise _FieldError(key, "is not a setting", unknown=True)
            if extra[key] is None:
                del extra[key]
        for h in mine.values():
            value = extra.get(h.option)
            if value is None:
                extra[h.option] = h.default
            elif h.switch and isinstance(value, bool):
                extra[h.option] = float(value)
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise _FieldError(h.option, "must be a number", got=value)
            elif (problem := h.range_problem(float(value))) is not None:
                raise _FieldError(h.option, problem, owner=loss.label or self.model)
            else:
                extra[h.option] = float(value)

    # ------------------------------------------------------------------ access
    def loss_hparams(self) -> dict[str, float]:
        """The loss's constructor keywords and values (``curricular_momentum`` -> ``momentum``)."""
        from facecli.losses import LOSSES

        return {h.name: self.__pydantic_extra__[h.option] for h in LOSSES[self.model].hyper_parameters()}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, values: dict[str, Any], origins: dict[str, str] | None = None) -> "TrainConfig":
        """Validate ``values``; a problem is one UserError naming where the value came from
        (``origins``: key -> "--flag" or "file: key"; by default the flag)."""
        token = _ORIGINS.set(origins or {})
        try:
            return cls(**values)
        finally:
            _ORIGINS.reset(token)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "TrainConfig":
        """A saved configuration (checkpoint, config.json) with ``overrides`` (None: keep)."""
        data = {k: v for k, v in d.items() if k in cls.model_fields or k in _loss_option_names()}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(data)

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _user_error(e, values, _ORIGINS.get()) from None


# ---------------------------------------------------------------------- errors
_NOTHING = object()
_ORIGINS: ContextVar[dict[str, str]] = ContextVar("facecli_config_origins", default={})


def _show(value: Any) -> str:
    return shorten(repr(value) if isinstance(value, str) else str(value))


def _rule(field, annotation) -> str:
    """What a numeric field accepts, in words ("a positive integer", "a number in [0, 1)")."""
    limits = {a.title(): getattr(m, a) for m in field.metadata for a in ("gt", "ge", "lt", "le") if getattr(m, a, None) is not None}
    kind = "integer" if int in _types(annotation) else "number"
    lo, hi = limits.get("Gt", limits.get("Ge")), limits.get("Lt", limits.get("Le"))
    if hi is None and (limits.get("Gt") == 0 or (kind == "integer" and limits.get("Ge") == 1)):
        return f"a positive {kind}"
    if hi is None and limits.get("Ge") == 0:
        return f"a non-negative {kind}"
    if lo is not None and hi is not None:
        return f"{_a(kind)} {kind} in {'(' if 'Gt' in limits else '['}{lo}, {hi}{')' if 'Lt' in limits else ']'}"
    if lo is not None:
        return f"{_a(kind)} {kind} {'>' if 'Gt' in limits else '>='} {lo}"
    return f"a valid {kind}" if kind in ("integer", "number") else "valid"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _types(annotation) -> tuple:
    import typing

    return typing.get_args(annotation) or (annotation,)


class _FieldError(ValueError):
    """A problem found while resolving, tied to the key the user wrote."""

    def __init__(self, key: str, problem: str, unknown: bool = False, owner: str = "", got: Any = _NOTHING):
        super().__init__(problem)
        self.key, self.problem, self.unknown, self.owner, self.got = key, problem, unknown, owner, got

    def as_user_error(self, values: dict, origins: dict[str, str]) -> UserError:
        where = _where(self.key, origins)
        if self.unknown:
            return UserError(f"{where}: unknown setting.", hint=f"Known settings: {', '.join(sorted(all_keys()))}.")
        if not self.owner:
            text = f"{where}{'' if self.problem.startswith(':') else ' '}{self.problem}"
        elif where.startswith("--"):  # "arcface --margin must be ..."
            text = f"{self.owner} {where} {self.problem}"
        else:  # "a.yaml: margin (arcface) must be ..."
            text = f"{where} ({self.owner}) {self.problem}"
        got = values.get(self.key, _NOTHING) if self.got is _NOTHING else self.got
        if "; got" not in text and got is not _NOTHING and got is not None:
            text += f", got {_show(got)}"
        return UserError(text.rstrip(".") + ".")


def _where(key: str, origins: dict[str, str]) -> str:
    return origins.get(key) or flag_name(key)


def flag_name(key: str) -> str:
    """The command-line option of a setting (``identities_file`` -> ``--identities``)."""
    field = TrainConfig.model_fields.get(key)
    extra = (field.json_schema_extra or {}) if field is not None else {}
    return "--" + (extra.get("flag") or key).replace("_", "-")


def _user_error(e: ValidationError, values: dict, origins: dict[str, str]) -> UserError:
    err = e.errors()[0]
    err["msg"] = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    key = str(err["loc"][0]) if err.get("loc") else ""
    if err["type"] == "value_error" and isinstance((err.get("ctx") or {}).get("error"), _FieldError):
        return err["ctx"]["error"].as_user_error(values, origins)
    field = TrainConfig.model_fields.get(key)
    if field is None:
        return UserError(f"Invalid configuration: {err['msg']}.")
    got = values.get(key, err.get("input"))
    if key == "workers":
        return UserError(f"{_where(key, origins)} must be a non-negative integer or auto, got {_show(got)}.")
    numeric = {int, float} & set(_types(field.annotation))
    if numeric:
        return UserError(f"{_where(key, origins)} must be {_rule(field, field.annotation)}, got {_show(got)}.")
    return UserError(f"{_where(key, origins)}: {err['msg'][0].lower() + err['msg'][1:]}, got {_show(got)}.")


def _check_choice(cfg: TrainConfig, name: str) -> None:
    allowed = choices(name)
    value = getattr(cfg, name)
    if value not in allowed:
        raise _FieldError(name, f"must be one of {', '.join(allowed)}")


def choices(name: str) -> list[str]:
    """The allowed values of a setting with choices (from its registry), else []."""
    extra = TrainConfig.model_fields[name].json_schema_extra or {}
    return _CHOICES[extra["choices"]]() if extra.get("choices") else []


def _losses() -> dict:
    from facecli.losses import LOSSES

    return LOSSES


def _loss_option_names() -> set[str]:
    return {h.option for cls in _losses().values() for h in cls.hyper_parameters()}


def all_keys() -> set[str]:
    """Every key a config file may hold: the fields and every registered loss's options."""
    return set(TrainConfig.model_fields) | _loss_option_names()


# ---------------------------------------------------------------------- files
CONFIG_FILE = "config.yaml"  # the resolved configuration every run writes


MAX_CONFIG_BYTES = 1 << 20  # a settings file is a few KB; a larger one is not a config (or is a bomb)


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML, TOML or JSON mapping of settings; a malformed file is one UserError line.

    The run's ``config.json`` record is read too (its ``config`` entry). YAML aliases are
    refused and the size is capped: a few hundred bytes of nested aliases otherwise expand
    to gigabytes.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UserError(f"Config file {str(path)!r} is {size:,} bytes; a settings file is at most {MAX_CONFIG_BYTES:,}.")
        text = path.read_bytes()[: MAX_CONFIG_BYTES + 1].decode("utf-8")
    except OSError as e:
        raise UserError(f"Config file {str(path)!r} cannot be read ({e.strerror or e}).") from e
    except UnicodeDecodeError as e:
        raise UserError(f"Config file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}).") from None
    try:
        data = _parse(path, text)
    except _FileProblem as e:
        raise UserError(f"Config file {str(path)!r}: {e}") from None
    except Exception as e:  # each parser has its own error type; all mean "not a valid file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Config file {str(path)!r} is not valid {_kind(path)}: {shorten(first, 200)}.") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"Config file {str(path)!r} must hold a mapping of settings (key: value), not a {type(data).__name__}.")
    if "model" not in data and isinstance(data.get("config"), dict):  # a run's config.json record
        data = data["config"]
    for key in data:
        if not isinstance(key, str):
            raise UserError(f"Config file {str(path)!r}: key {shorten(repr(key))} is not a setting name (keys are names such as epochs).")
    _refuse_secrets(path, data)
    return data


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: values quoted in an error stay one short line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(path: Path) -> str:
    return {".toml": "TOML", ".json": "JSON"}.get(path.suffix.lower(), "YAML")


def _parse(path: Path, text: str):
    kind = _kind(path)
    if kind == "JSON":
        return json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(path, pairs))
    if kind == "TOML":
        import tomllib

        return tomllib.loads(text)
    import yaml

    return yaml.load(text, Loader=_config_loader())


class _FileProblem(ValueError):
    """Something a parser accepts that a config file must not hold (aliases, a key given twice)."""


def _no_duplicates(path: Path, pairs) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _FileProblem(f"key {shorten(repr(key))} is given twice; keep one.")
        out[key] = value
    return out


_LOADER = None


def _config_loader():
    """yaml's SafeLoader without aliases or duplicate keys, reading ``1e2`` as a number (YAML 1.2)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import re

    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise _FileProblem(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a config file; write the value out.")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise _FileProblem(f"line {key_node.start_mark.line + 1}: key {shorten(repr(key))} is given twice; keep one.")
                seen.add(key) if isinstance(key, (str, int, float, bool)) else None
            return super().construct_mapping(node, deep)

    ConfigLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    _LOADER = ConfigLoader
    return ConfigLoader


def _refuse_secrets(path: Path, data: dict) -> None:
    for key in data:
        if "api_key" in str(key).lower() or "secret" in str(key).lower() or "token" in str(key).lower():
            raise UserError(
                f"Config file {str(path)!r}: {key!r} looks like a secret; secrets are never read from config files.",
                hint="Set WANDB_API_KEY in the environment or .env instead.",
            )


PATH_KEYS = ("train_dir", "identities_file", "lfw_dir", "checkpoints_dir", "init_from")


def absolute(path) -> str | None:
    """``path`` as an absolute, normalised string (``~`` expanded); None stays None."""
    import os

    return None if path is None else os.path.abspath(os.path.expanduser(str(path)))


def with_absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """A configuration dict whose paths are absolute: a saved config works from any folder."""
    return {k: absolute(v) if k in PATH_KEYS else v for k, v in data.items()}


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML that :func:`read_config_file` reads back (paths absolute)."""
    import yaml

    data = with_absolute_paths(cfg.model_dump())
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
