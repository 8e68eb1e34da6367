"""Run tracking: ``metrics.jsonl`` in the run directory, and Weights & Biases.

``wandb`` is optional: it is imported only on the W&B worker thread, when tracking is on, so
facecli imports and trains without it (a run that asks for W&B without it gets one notice).

Every W&B call runs on a background thread fed by a bounded queue. The training loop only
enqueues (and drops when the queue is full), so an unreachable, slow, rate-limiting or
misconfigured W&B can neither stop nor slow training: the worst case is a warning and a
run that is only tracked locally. The API key is handed to the ``wandb`` library through
its own environment variable and never put in a config, a log line or a file.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

SECRET_KEYS = {"wandb_api_key", "WANDB_API_KEY", "api_key"}
CLOSE_TIMEOUT = 5.0  # seconds the end of a run waits for a W&B that never started (unreachable)
FINISH_TIMEOUT = 120.0  # seconds it waits for a W&B that started and is uploading its last data
_LEFT_RUNNING: list[threading.Thread] = []  # W&B workers close() stopped waiting for


def wandb_left_running() -> bool:
    """True when a W&B worker was given up on and is still busy (see ``facecli.cli.main``)."""
    return any(t.is_alive() for t in _LEFT_RUNNING)


def scrub(config: dict) -> dict:
    """A copy of ``config`` without secrets, JSON-friendly."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if k in SECRET_KEYS or "api_key" in k.lower() or "secret" in k.lower():
            continue
        if isinstance(v, dict):
            out[k] = scrub(v)
        elif isinstance(v, Path):
            out[k] = str(v)
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [str(x) if isinstance(x, Path) else x for x in v]
        else:
            out[k] = str(v)
    return out


class MetricsFile:
    """Appends one JSON object per line; survives being killed (line-buffered, flushed)."""

    def __init__(self, path: Path):
        self.path = Path(path)  # the run directory is created by the trainer, which reports failures

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError:
            pass  # metrics are a convenience; checkpoints report disk problems loudly


class WandbTracker:
    """Weights & Biases on a worker thread; ``enabled`` stays False if it cannot start."""

    def __init__(
        self,
        *,
        project: str,
        entity: str | None,
        mode: str,
        run_name: str,
        run_id: str,
        config: dict,
        directory: Path,
        api_key: str | None,
        warn: Callable[[str], None],
        init_timeout: float = 20.0,
    ):
        self.warn = warn
        self.enabled = True
        self._warned = False
        self._queue: queue.Queue = queue.Queue(maxsize=1000)
        self._init_args = dict(
            project=project,
            entity=entity,
            mode=mode,
            name=run_name,
            id=run_id,
            resume="allow",
            config=scrub(config),
            dir=str(directory),
            reinit=True,
        )
        self._api_key = api_key
        self._init_timeout = init_timeout
        self._run = None
        self._thread = threading.Thread(target=self._worker, name="facecli-wandb", daemon=True)
        self._thread.start()

    def _fail(self, what: str, e: BaseException) -> None:
        self.enabled = False
        if not self._warned:
            self._warned = True
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if self._api_key:
                msg = msg.replace(self._api_key, "***")
            self.warn(f"W&B {what} failed ({msg[:200]}); training goes on, tracked in metrics.jsonl only.")

    def _worker(self) -> None:
        try:
            if self._api_key:
                os.environ["WANDB_API_KEY"] = self._api_key
            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_CONSOLE", "off")
            import wandb

            settings = wandb.Settings(init_timeout=self._init_timeout, console="off", silent=True)
            self._run = wandb.init(settings=settings, **self._init_args)
        except BaseException as e:  # noqa: BLE001 - any W&B failure must stay contained
            self._fail("start", e)
            self._drain()
            return
        while True:
            item = self._queue.get()
            if item is None:
                break
            kind, payload = item
            if not self.enabled:
                continue
            try:
                if kind == "log":
                    data, step = payload
                    self._run.log(data, step=step)
                elif kind == "summary":
                    for k, v in payload.items():
                        self._run.summary[k] = v
                elif kind == "artifact":
                    import wandb

                    path, name, kind_ = payload
                    art = wandb.Artifact(name, type=kind_)
                    art.add_file(str(path))
                    self._run.log_artifact(art)
                elif kind == "line":
                    import wandb

                    key, xs, ys, x_name, y_name, step = payload
                    table = wandb.Table(data=[[float(x), float(y)] for x, y in zip(xs, ys)], columns=[x_name, y_name])
                    self._run.log({key: wandb.plot.line(table, x_name, y_name, title=key)}, step=step)
                elif kind == "image":
                    import wandb

                    key, path, step = payload
                    self._run.log({key: wandb.Image(str(path))}, step=step)
            except BaseException as e:  # noqa: BLE001
                self._fail("logging", e)
        try:
            self._run.finish()
        except BaseException as e:  # noqa: BLE001
            self._fail("finish", e)

    def _drain(self) -> None:
        while True:
            try:
                if self._queue.get_nowait() is None:
                    return
            except queue.Empty:
                return

    def _put(self, item) -> None:
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            pass  # W&B is behind; dropping a point beats stalling a GPU

    def log(self, data: dict, step: int) -> None:
        self._put(("log", (dict(data), int(step))))

    def summary(self, data: dict) -> None:
        self._put(("summary", dict(data)))

    def artifact(self, path: Path, name: str, kind: str = "model") -> None:
        self._put(("artifact", (Path(path), name, kind)))

    def image(self, key: str, path: Path, step: int) -> None:
        self._put(("image", (key, Path(path), int(step))))

    def line(self, key: str, xs, ys, x_name: str, y_name: str, step: int) -> None:
        self._put(("line", (key, list(xs), list(ys), x_name, y_name, int(step))))

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Let W&B finish for at most ``timeout`` seconds; the end of a run never waits longer.

        A W&B that is still starting (unreachable host: its init retries for a while) or
        still uploading is left behind with one warning; ``metrics.jsonl`` has everything.
        """
        if self._run is not None and self.enabled:
            timeout = max(timeout, FINISH_TIMEOUT)  # healthy: let it upload the end of the run
        deadline = time.monotonic() + timeout
        while True:  # the stop marker must get in even if the queue is full
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()  # drop the oldest point instead of waiting
                except queue.Empty:
                    pass
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.enabled = False
            _LEFT_RUNNING.append(self._thread)
            if not self._warned:
                self._warned = True
                self.warn(
                    f"W&B did not finish within {timeout:g} s (unreachable or slow); not waiting for it. "
                    f"The run is complete and tracked in metrics.jsonl; upload the local W&B files later with "
                    f"`wandb sync {self._init_args['dir']}/wandb/latest-run` if you need them online."
                )


class Tracker:
    """What the training loop talks to: local metrics always, W&B when it is on."""

    def __init__(self, metrics: MetricsFile | None, wandb_tracker: WandbTracker | None = None):
        self.metrics = metrics
        self.wandb = wandb_tracker

    def log(self, data: dict, step: int) -> None:
        if self.metrics is not None:
            self.metrics.write({"step": int(step), **data})
        if self.wandb is not None:
            self.wandb.log(data, step)

    def summary(self, data: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary(data)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.wandb is not None:
            self.wandb.image(key, path, step)

    def line(self, key: str, xs, ys, x_name: str, y_name: str, step: int, max_points: int = 500) -> None:
        """A W&B line plot (e.g. accuracy versus threshold), thinned to ``max_points``."""
        if self.wandb is not None:
            stride = max(1, len(xs) // max_points)
            self.wandb.line(key, xs[::stride], ys[::stride], x_name, y_name, step)

    def artifact(self, path: Path, name: str) -> None:
        if self.wandb is not None:
            self.wandb.artifact(path, name)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.close()


def wandb_mode(flag: bool | None, settings_mode: str | None, has_key: bool) -> tuple[str, str | None]:
    """Decide the W&B mode: (mode, notice). ``flag`` is --wandb/--no-wandb (None: not given)."""
    env_mode = os.environ.get("WANDB_MODE") or settings_mode
    if flag is False:
        return "disabled", None
    if env_mode in ("offline", "disabled", "dryrun"):
        return ("offline" if env_mode == "dryrun" else env_mode), None
    if has_key:
        return "online", None
    if flag is True:
        return "disabled", "W&B: --wandb was given but no WANDB_API_KEY is set; tracking locally only (set WANDB_MODE=offline to log offline)."
    return "disabled", "W&B is off: no WANDB_API_KEY set (metrics still go to metrics.jsonl)."


def wandb_installed() -> bool:
    """Whether the optional ``wandb`` package can be imported (looked up, not imported: it is slow)."""
    import importlib.util

    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


def tracker_factory(settings, wandb_flag: bool | None, log: Callable[[str], None] = print, warn: Callable[[str], None] = print):
    """What the trainer calls on rank 0 to get its tracker: metrics.jsonl, plus W&B per settings."""

    def factory(cfg, run_dir: Path, run_name: str, world) -> Tracker:
        key = settings.wandb_api_key.get_secret_value() if settings.wandb_api_key else None
        mode, notice = wandb_mode(wandb_flag, settings.wandb_mode, key is not None)
        if mode != "disabled" and not wandb_installed():
            mode, notice = "disabled", "W&B is off: the wandb package is not installed (pip install wandb); metrics still go to metrics.jsonl."
        if notice:
            log(notice)
        wb = None
        if mode != "disabled":
            wb = WandbTracker(
                project=settings.wandb_project,
                entity=settings.wandb_entity,
                mode=mode,
                run_name=f"{cfg.model}-{run_name}",
                run_id=f"{cfg.model}-{run_name}".replace("/", "-"),
                config=cfg.to_dict(),
                directory=run_dir,
                api_key=key,
                warn=warn,
            )
        return Tracker(MetricsFile(run_dir / "metrics.jsonl"), wb)

    return factory
