"""Plugins: modules that register their own losses and backbones before any command is built.

Named by the ``facecli.plugins`` entry points or ``FACECLI_PLUGINS=mod1,mod2``; the command
group (:mod:`facecli.cli`) loads them once per run, inside the one-line error guard.
"""

from __future__ import annotations

import os
from importlib import import_module
from importlib.metadata import entry_points

from facecli.errors import UserError

PLUGIN_GROUP = "facecli.plugins"
PLUGIN_ENV = "FACECLI_PLUGINS"
_loaded: set[str] = set()


_failures: dict[tuple[str, ...], UserError] = {}  # plugin list -> the error it gave


def load_plugins() -> None:
    """Import plugin modules (entry points in ``facecli.plugins``, or ``FACECLI_PLUGINS=mod1,mod2``):
    importing one registers its losses and backbones.

    A plugin that cannot be imported, raises, or calls ``sys.exit`` while being imported is
    one UserError naming it (remembered: every later call raises the same error without
    importing it again).
    """
    names = [ep.value for ep in entry_points(group=PLUGIN_GROUP)]
    names += [n.strip() for n in os.environ.get(PLUGIN_ENV, "").split(",") if n.strip()]
    if tuple(names) in _failures:
        raise _failures[tuple(names)]
    for name in names:
        if name in _loaded:
            continue
        try:
            _import_plugin(name.split(":")[0])
        except UserError as e:
            _failures[tuple(names)] = e
            raise
        _loaded.add(name)


def _import_plugin(module: str) -> None:
    where = f"Plugin module {module!r} (from {PLUGIN_ENV} or the {PLUGIN_GROUP} entry points)"
    try:
        import_module(module)
    except ImportError as e:
        raise UserError(f"{where} cannot be imported: {e}.") from e
    except SyntaxError as e:
        raise UserError(f"{where} has a syntax error: {e.filename}, line {e.lineno}: {e.msg}.") from e
    except UserError as e:  # e.g. a registration facecli refuses
        raise UserError(f"{where}: {e}") from e
    except SystemExit as e:
        raise UserError(f"{where} called sys.exit({e.code!r}) while being imported; a plugin must only register its losses and backbones.") from None
    except Exception as e:
        raise UserError(f"{where} failed while being imported: {_plugin_line(e)}{type(e).__name__}: {e}.") from e


def _plugin_line(e: BaseException) -> str:
    """``file.py, line N: `` of the plugin's own frame that raised (the last one in its traceback)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename}, line {frames[-1].lineno}: " if frames else ""
