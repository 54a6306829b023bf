"""One convention for mistakes a user can fix, at every entry point.

A mistake the user can fix (a path that does not exist, no shard matching a pattern, a vocabulary
that does not fit the shards, a checkpoint of another vocabulary, a truncated checkpoint, a bad
config value or argument) raises ``UserError``; the entry points (``train.py``, ``evaluate.py``,
``python -m im2vec.<command>``) print it as one line on stderr,

    im2vec: error: <what> — <what to do>

and exit with status 2. Anything else is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1``
(the Hydra scripts) or ``--debug`` (the module commands) shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

PREFIX = "im2vec: error: "
_USER_FULL_ERROR = "IM2VEC_USER_FULL_ERROR"  # HYDRA_FULL_ERROR as the user set it (we set it to 1 for Hydra)


class UserError(Exception):
    """A mistake the user can fix: ``what`` went wrong and ``fix``, what to do about it."""

    def __init__(self, what: str, fix: str = ""):
        super().__init__(f"{what} — {fix}" if fix else what)


class NotFound(UserError, FileNotFoundError):
    """A file, folder or shard pattern that names nothing."""


class BadValue(UserError, ValueError):
    """A config value, argument or input file that cannot be used."""


def one_line(exc: BaseException) -> str:
    """The error's message on one line. A user error re-raised from a DataLoader worker carries the
    worker's traceback in its message; its own message is the traceback's last line."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = re.sub(r"^[\w.]*(UserError|NotFound|BadValue): ", "", last)
    lines = [ln.strip() for ln in text.splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith(("full_key:", "object_type=")))


# a path the user gave that cannot be used: a user error wherever it is raised
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def as_user_error(exc: BaseException) -> UserError | None:
    """``exc`` as a user error (itself, or a path error with what to do), or None for a bug."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, PATH_ERRORS):
        return UserError(one_line(exc), "check the path")
    return None


def error_line(exc: BaseException) -> str:
    """``im2vec: error: …`` on a line of its own: a progress bar still drawn (tqdm's, Lightning's) ends without a
    newline, and the message would otherwise land on the bar's line."""
    tqdm = sys.modules.get("tqdm")  # bars exist only where tqdm was imported
    bars = getattr(getattr(tqdm, "tqdm", None), "_instances", None)
    return ("\n" if bars else "") + PREFIX + one_line(exc)


def fail(exc: BaseException) -> NoReturn:
    sys.stdout.flush()  # a bar drawn on stdout is on the screen before the message
    print(error_line(exc), file=sys.stderr, flush=True)
    sys.exit(2)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _user_full_error() -> bool:
    return _truthy(_USER_FULL_ERROR) if _USER_FULL_ERROR in os.environ else _truthy("HYDRA_FULL_ERROR")


# ---------------------------------------------------------------- the Hydra scripts
# Recorded settings name their classes (``_target_``), and modules moved into subpackages (data/, wide/, deep/,
# eval/, train/, use/) after checkpoints recorded theirs: an older checkpoint's data settings name
# im2vec.datamodule.ShardDataModule where it is now im2vec.data.datamodule.ShardDataModule. ``make`` reads them
# where they are now.
MOVED = {"datamodule": "data.datamodule", "corpus": "data.corpus", "data": "data.loader", "features": "train.features"}


def current_targets(node):
    """``node`` (a checkpoint's recorded settings) with every ``_target_`` of a moved module renamed to where it is
    now; a target that imports as it is, or whose new place does not hold it either, is left as it was."""
    if isinstance(node, list):
        return [current_targets(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: current_targets(v) for k, v in node.items()}
    target = out.get("_target_")
    if isinstance(target, str) and target.count(".") >= 2 and not _importable(target):
        _, mod, rest = target.split(".", 2)
        if mod in MOVED and _importable(renamed := f"im2vec.{MOVED[mod]}.{rest}"):
            out["_target_"] = renamed
    return out


def _importable(target: str) -> bool:
    import importlib

    module, _, name = target.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def make(node, **kwargs):
    """instantiate(node), its constructor's own user error shown as it is; a constructor that refuses its
    arguments (TypeError, ValueError) is a bad config value."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(current_targets(node), **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if as_user_error(cause) is not None:  # the constructor's own one-line message, not Hydra's wrapper
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)):
            raise BadValue(f"{node.get('_target_')}: {type(cause).__name__}: {cause}",
                           "check that group's settings (--cfg job prints them)") from e
        raise


def reported(task: Callable) -> Callable:
    """For a ``@hydra.main`` task: a UserError ends the process with one line and status 2 (inside
    the job, so Hydra adds no "Error executing job" line; in a ``-m`` sweep the line names the job)."""

    @functools.wraps(task)
    def run(cfg):
        try:
            return task(cfg)
        except Exception as e:
            user = as_user_error(e)
            if user is None or _user_full_error():
                raise
            fail(UserError(_with_job(one_line(user))))

    return run


def _with_job(message: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"{message} (sweep job {hc.job.num}: {' '.join(hc.overrides.task)})"
    except Exception:  # noqa: BLE001 -- not inside a Hydra job: the message as it is
        pass
    return message


def run_hydra(main: Callable[[], object], script: str) -> None:
    """Call a ``@hydra.main`` function so that Hydra's own mistakes (an override of a key that does not
    exist, a config group option that does not exist, an unparsable override) are one line too.

    Hydra prints those itself unless HYDRA_FULL_ERROR is set; it is set here (remembering the user's
    own value, also for processes started from this one) so that they reach this function."""
    os.environ.setdefault(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", ""))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from hydra.errors import CompactHydraException

    try:
        main()
    except (UserError, CompactHydraException) as e:
        if _user_full_error():
            raise
        fix = "" if isinstance(e, UserError) else (
            f"see `python {script} --help` for the config groups and `python {script} --cfg job` for the composed config")
        what = str(e).split("Config search path:")[0]  # Hydra's search path says nothing the user can act on
        fail(UserError(one_line(UserError(what)), fix))


# ---------------------------------------------------------------- the module commands
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors follow the convention (one line, status 2) and that documents --debug."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", "Errors you can fix print one line and exit with status 2; --debug shows "
                                    "their traceback.")
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(UserError(f"{self.prog}: {message}", f"see {self.prog} --help"))


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes: a whole number ≥ 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {n}")
    return n


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None, exit: bool = True) -> int:
    """Run a module command's ``main(argv)``: a user error (``as_user_error``) is one line and status 2
    unless ``--debug`` is among the arguments (anywhere; it is taken out before ``main`` sees them).
    Exits with the status, or (``exit=False``) returns it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        result = main(argv)
        code = result if isinstance(result, int) and not isinstance(result, bool) else 0
    except SystemExit as e:  # argparse's --help (0) and usage errors (2, already printed)
        if isinstance(e.code, str):
            print(PREFIX + e.code, file=sys.stderr, flush=True)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except Exception as e:
        user = as_user_error(e)
        if user is None or debug:
            raise
        sys.stdout.flush()
        print(error_line(user), file=sys.stderr, flush=True)
        code = 2
    if exit:
        sys.exit(code)
    return code
