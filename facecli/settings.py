"""Settings from the environment and ``.env`` (pydantic-settings); CLI flags override them.

Keys (see ``.env.example``): ``DATASET_PATH``, ``CHECKPOINTS_DIR``, ``WANDB_API_KEY``,
``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_MODE``, ``FACECLI_CACHE_DIR``. The W&B key is a ``SecretStr``: its
repr is masked and it is never written to a run directory or a checkpoint.

A ``.env`` line that is malformed or names an unknown key is *warned about*, not fatal:
a typo in ``.env`` must not stop a training run, but it must not pass silently either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Callable, Literal

from pydantic import SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from facecli.errors import UserError

ENV_FILE = ".env"
_KEY_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")


class Settings(BaseSettings):
    """Where data and runs live, and how to reach Weights & Biases."""

    model_config = SettingsConfigDict(env_file=ENV_FILE, env_file_encoding="utf-8", extra="ignore")

    dataset_path: Path | None = None
    checkpoints_dir: Path = Path("checkpoints")
    wandb_api_key: SecretStr | None = None
    wandb_project: str = "facecli"
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    facecli_cache_dir: Path | None = None  # where folder indexes are cached (facecli.data.index)

    @field_validator("wandb_api_key", "wandb_entity", "wandb_mode", "dataset_path", "facecli_cache_dir", mode="before")
    @classmethod
    def _blank_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v


KNOWN_KEYS = {name.upper() for name in Settings.model_fields}


def check_env_file(path: str | os.PathLike = ENV_FILE) -> list[str]:
    """Problems in a ``.env`` file as warning lines (malformed lines, unknown keys)."""
    p = Path(path)
    if not p.is_file():
        return []
    warnings: list[str] = []
    try:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        return [f"{p}: cannot be read ({e.strerror}); its settings are ignored."]
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _KEY_LINE.match(line)
        if not m:
            warnings.append(f"{p}:{n}: malformed line (expected KEY=value); it is ignored.")
            continue
        key = m.group(1).upper()
        if key not in KNOWN_KEYS:
            warnings.append(
                f"{p}:{n}: unknown key {m.group(1)!r}; known keys: {', '.join(sorted(KNOWN_KEYS))}."
            )
    return warnings


def load_settings(warn: Callable[[str], None] | None = None) -> Settings:
    """Read settings; report ``.env`` problems through ``warn`` instead of failing."""
    for line in check_env_file():
        if warn:
            warn(line)
    try:
        with _dotenv_quiet():  # python-dotenv warns about the lines warned about above, again
            settings = Settings()
    except ValidationError as e:  # a user's value, one line
        err = e.errors()[0]
        key = str(err["loc"][0]).upper() if err.get("loc") else "a setting"
        msg = err["msg"].removeprefix("Value error, ")
        got = str(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        raise UserError(f"Invalid setting {key} in the environment or {ENV_FILE}: {msg[0].lower() + msg[1:]}, got {got!r}.") from None
    _export_cache_dir(settings)
    return settings


@contextlib.contextmanager
def _dotenv_quiet():
    logger = logging.getLogger("dotenv.main")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_cache_dir(settings: Settings) -> None:
    """FACECLI_CACHE_DIR from ``.env`` reaches the folder index, which reads the environment
    (the environment's own value wins, as for every setting)."""
    from facecli.data.index import CACHE_ENV

    if settings.facecli_cache_dir is not None and not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = str(settings.facecli_cache_dir)

