"""How the caption job meets Ray and the terminal: which Ray it runs on, one line when that Ray cannot be
reached or fails, and a console that shows the progress, the summary and real warnings only.

Which Ray: `--ray-address`, else `RAY_ADDRESS` (what `ray job submit` sets), else a private local
instance (`address="local"`). Never a bare `ray.init()`: it joins any Ray already running on the machine
(a stale one, someone else's) and the job then dies with it.

The console (`--log-level`, default WARNING): raylens' own loggers get one handler, installed by
`configure_logging` when the job runs (never at import), in the driver and in the job's Ray workers.
Known noise that raylens triggers knowingly is filtered where it is triggered, each with the Ray
version at which to look again (`quiet_ray_data_deprecations`, `quiet_actor_restart_notice`); Ray's
own warnings otherwise reach the console as Ray prints them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import warnings
from typing import Iterator, Mapping

LOCAL = "local"
CONNECT_TIMEOUT_S = 10.0
logger = logging.getLogger("raylens.caption")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_HANDLER_NAME = "raylens-console"
# raylens' loggers: the package's modules and the job's ("raylens.caption", "jobs.caption_stages").
_OWN_LOGGERS = ("raylens", "jobs")


class RayUnavailable(Exception):
    """The Ray the job was told to use cannot be reached or failed: one line for the user."""


def ray_address(flag: str | None, env: Mapping[str, str]) -> str:
    """--ray-address, else RAY_ADDRESS, else "local" (a private instance); see the module docstring."""
    return (flag or env.get("RAY_ADDRESS") or LOCAL).strip()


def connect(flag: str | None, *, log_level: str = "WARNING", env: Mapping[str, str] | None = None) -> str:
    """Start or join Ray as the module docstring says; the address used. Raises RayUnavailable."""
    import ray

    address = ray_address(flag, os.environ if env is None else env)
    if ray.is_initialized():
        return address
    quiet = logging.getLevelName(log_level) >= logging.WARNING
    check_reachable(address)
    try:
        with _quiet_token_notice(quiet and address == LOCAL):
            # Workers' output reaches this console only with --log-level INFO or DEBUG: at WARNING their
            # failures arrive as error rows or as one line from this driver instead of Ray's forwarded
            # tracebacks (the full logs stay in the Ray session's log folder). On the private instance,
            # "task failed, will be retried" notices (a traceback each) are off too: a retry that
            # succeeds changes nothing, one that fails for good is reported by the job. A cluster keeps
            # its operator's settings.
            options = {"_system_config": {"enable_output_error_log_if_still_retry": False}} if (
                quiet and address == LOCAL) else {}
            ray.init(address=address, logging_level=log_level, log_to_driver=not quiet, **options)
    except Exception as exc:  # noqa: BLE001 - every way of not getting a Ray ends in one line
        raise RayUnavailable(unavailable_message(address, exc)) from exc
    logger.info("Ray: %s", "a private local instance" if address == LOCAL else f"the cluster at {address}")
    if quiet:
        quiet_actor_restart_notice()
    return address


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, in one line, when nothing answers at a host:port address: Ray 2.60's
    `ray.init` retries an unreachable GCS for minutes, printing a warning every few seconds."""
    host, sep, port = address.rpartition("://")[2].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # "local", "auto": nothing to dial
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayUnavailable(unavailable_message(address, ConnectionError(
            f"nothing answers at {host}:{port} within {timeout_s:.0f} s: {exc}"))) from None


def unavailable_message(address: str, exc: BaseException) -> str:
    cause = _first_line(exc)
    if address == LOCAL:
        return f"could not start a local Ray instance: {cause}"
    return (f"could not connect to the Ray cluster at {address!r} ({cause}); to run on a private Ray instance on "
            "this machine instead, pass --ray-address local (or unset RAY_ADDRESS)")


def failure_message(address: str, exc: BaseException) -> str:
    """One line for a Ray failure during the run (a cluster that died, a lost node or object)."""
    where = "the local Ray instance" if address == LOCAL else f"the Ray cluster at {address!r}"
    hint = "" if address == LOCAL else "; --ray-address local runs on a private instance instead"
    return (f"{where} failed during the run ({_first_line(exc)}); finished shards are kept and a rerun resumes"
            f"{hint} (--log-level DEBUG shows the traceback)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


# ------------------------------------------------------------------------------------- logging
def configure_logging(level: str = "WARNING") -> None:
    """One console handler on raylens' loggers at `level`.

    Called by the job's `run()` and by its stages in Ray workers (the stages are given the level; a
    worker's stderr reaches the driver's console through Ray); idempotent."""
    level = level.upper()
    for name in _OWN_LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(level)
        if not any(getattr(h, "name", None) == _HANDLER_NAME for h in log.handlers):
            handler = _StderrHandler()
            handler.name = _HANDLER_NAME
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record arrives (a test's capture, a redirected stream),
    not the stream that was current when the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@contextlib.contextmanager
def quiet_ray_data_deprecations() -> Iterator[None]:
    """Ray 2.60 deprecates `ray_remote_args_fn` and `**ray_remote_args` in `map_batches` ("removed in
    Ray 2.64"), but has no named replacement yet for what the job passes through them (a SPREAD
    scheduling strategy that also keeps the CPU stage out of the engine actors, a placement group per
    tensor-parallel engine, `max_task_retries`). Revisit when upgrading past Ray 2.60: the replacement
    must exist before 2.64."""
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RayDeprecationWarning,
                                message=r"`ray_remote_args(_fn)?` is deprecated and will be removed in Ray 2\.64")
        yield


def quiet_actor_restart_notice() -> None:
    """Ray 2.60's core worker logs one `E ... core_worker.cc` line per process when it creates an actor
    that may restart and whose constructor arguments sit in the object store (ray-project/ray#53727).
    Ray Data creates every actor pool that way (its map transformer and context are object refs it keeps
    alive for the whole run, so restarts do work); to a newcomer the line reads like a failure. The
    notice is printed once per process, so it is spent here, with the driver's stderr pointed at
    /dev/null for the one actor creation, on an actor that is killed at once. Revisit when upgrading
    past Ray 2.60 (the notice, or Ray Data's way of passing constructor arguments, may change)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Spent:
        def __init__(self, _arg) -> None:
            pass

    arg = ray.put(b"")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        actor = _Spent.remote(arg)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(actor, no_restart=True)


@contextlib.contextmanager
def _quiet_token_notice(enabled: bool) -> Iterator[None]:
    """Ray 2.60 warns "Token authentication is enabled for this Ray cluster" whenever it starts a local
    instance with its default (secure) setting. For the job's private instance that is the expected
    state, not a warning; its opposite ("... is disabled") is kept. Revisit past Ray 2.60."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")

    if enabled:
        log.addFilter(drop)
    try:
        yield
    finally:
        if enabled:
            log.removeFilter(drop)


# ------------------------------------------------------------------------------------- engine start
def engine_start_failure(exc: BaseException) -> str | None:
    """The error that kept every engine actor from being built, or None for any other failure.

    An engine whose constructor raises (a bad --engine-args key, a model lmdeploy refuses) kills its actor
    before it takes a batch; Ray Data then gives up with ActorDiedError, whose text ends with the original
    exception. That is a setup error, so the job reports that one line instead of Ray's traceback.
    """
    from ray.exceptions import ActorDiedError

    if not isinstance(exc, ActorDiedError) or "creation task" not in str(exc):
        return None
    errors = re.findall(r"^\s*((?:\w+\.)*\w+(?:Error|Exception): .+)$", str(exc), flags=re.MULTILINE)
    causes = [e for e in errors if not e.split(":", 1)[0].endswith("ActorDiedError")]
    return causes[-1].strip() if causes else str(exc).splitlines()[0]


@contextlib.contextmanager
def engine_start_failures_reported_once(enabled: bool = True) -> Iterator[None]:
    """Ray Data 2.60 logs a failed execution's whole stack on the console (calling it a Ray bug to
    report) before it re-raises. When the failure is an engine that could not be built, the job says so
    in one line (`engine_start_failure`), so Ray Data's console copy is hidden; its log file keeps it
    (Ray Data's own `hide` record attribute). Revisit past Ray 2.60."""
    log = logging.getLogger("ray.data.exceptions")

    def mark(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if exc is not None and engine_start_failure(exc) is not None:
            record.hide = True
        return True

    if enabled:
        log.addFilter(mark)
    try:
        yield
    finally:
        if enabled:
            log.removeFilter(mark)
