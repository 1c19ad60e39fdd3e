"""Stopping a run on request: `ray job stop`, `kill PID`, a scheduler taking the driver's node.

Ray's job server stops a job by sending SIGTERM to its driver (`fjordtune run`) and every process
below it, and SIGKILL RAY_JOB_STOP_WAIT_TIME_S later (3 s unless the head's environment says
otherwise: Ray 2.60's `JobSupervisor.run`). The Ray Train workers are not below the driver: they are
actors, which Ray ends when the job that owns them ends. `ray.init` answers SIGTERM with
`sys.exit(15)`; the driver then hung in its exit until the SIGKILL, and said nothing a reader of the
job's log could act on.

Under `stop_on_sigterm()` the driver answers the first SIGTERM with one `stop requested` line, asks Ray
Train to abort the worker group while training runs (what Ray Train does for Ctrl-C in `fit()`), leaves
Ray (whatever else the job started ends with it) and unwinds with `StopRequested`, which `fjordtune run`
turns into one `stopped` line naming the checkpoint a resubmission resumes from, and exit status 143.
A second SIGTERM unwinds at once.

A checkpoint whose upload is in flight when the workers go is never committed: rank 0 flips the pointer
only after every rank's upload finished (`train/checkpointing.py`). What the upload left is listed as
uncommitted by `fjordtune checkpoints ls`, never used for resume, and deleted by `prune`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

ABORT_WAIT_S = 1.0
"""How long the driver waits for Ray Train's abort of the worker group (it gives the workers up to 5 s for
their shutdown hooks) before it leaves the workers to Ray, which ends them with the job: Ray's SIGKILL
follows the SIGTERM after 3 s by default, and the `stopped` line should come before it."""
LISTING_WAIT_S = 1.0
"""How long the `stopped` line waits for storage to say which checkpoint is the newest committed."""


class StopRequested(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so that no `except Exception` on the way out takes a
    requested stop for a failure, and so that Ray lets it out of a blocking `ray.get` (its signal check
    turns a KeyboardInterrupt into an interrupted get, and any other exception into a SystemError). The
    get raises a plain KeyboardInterrupt: `stop_on_sigterm` turns that back into this, with `resume_note`
    saying where a rerun of the same job resumes."""

    def __init__(self, signum: int, resume_note: str | None = None) -> None:
        super().__init__(signum)
        self.signum, self.resume_note = signum, resume_note

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def line(self) -> str:
        """The last line of a stopped run."""
        note = self.resume_note or "rerun the same job to resume from its newest committed checkpoint"
        return f"stopped ({self.signal_name}) on request: {note}"


class _State:
    requested: int | None = None
    training = False
    abort: threading.Thread | None = None


def _say(line: str) -> None:
    """One line on stdout, straight to the file descriptor: a signal handler may run while the main
    thread is inside a `print`, and the buffered stream refuses to be entered twice."""
    data = (line + "\n").encode()
    try:
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), data)
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test's capture)
        print(line, flush=True)


def _handler(signum: int, frame: Any) -> None:
    if _State.requested is not None:  # the second one: stop waiting for the abort
        raise StopRequested(signum)
    _State.requested = signum
    name = signal.Signals(signum).name
    if _State.training:
        _say(f"stop requested ({name}): aborting the training workers; a checkpoint upload in flight is "
             "abandoned, never committed")
        _abort_ray_train()
    else:
        _say(f"stop requested ({name}): stopping")
    raise StopRequested(signum)


def _abort_ray_train() -> None:
    """Ray Train's own graceful abort, the one it installs as the SIGINT handler of `fit()` (the
    controller stops the worker group, then itself), waited for at most ABORT_WAIT_S; nothing while no
    `fit()` has installed it."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler) or not getattr(handler, "__module__", "").startswith("ray.train"):
        return

    def abort() -> None:
        quiet = logging.getLogger(handler.__module__)
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # it would log "Received SIGINT", which it was not
        try:
            handler(signal.SIGINT, None)
        except SystemExit:  # its way of saying that the controller is gone already
            pass
        except Exception as e:  # noqa: BLE001 - the actors end with the driver anyway
            log.warning("Ray Train's abort failed (%s); the workers end with this job", e)
        finally:
            quiet.setLevel(level)

    _State.abort = threading.Thread(target=abort, name="fjordtune-train-abort", daemon=True)
    _State.abort.start()
    _State.abort.join(ABORT_WAIT_S)
    if _State.abort.is_alive():
        _say(f"Ray Train's abort takes longer than {ABORT_WAIT_S:g} s: the workers end with this job")


@contextlib.contextmanager
def stop_on_sigterm(*, run_uri: str, store: Any) -> Iterator[None]:
    """Turn SIGTERM into `StopRequested` in the main thread for the block; its `resume_note` names the
    newest committed checkpoint of `run_uri` in `store` (a store already used: its client is ready).
    Enter it after `ray.init`, which installs a SIGTERM handler of its own; the previous handler comes
    back at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    _State.requested, _State.abort = None, None
    try:
        yield
    except KeyboardInterrupt:
        if _State.requested is None:
            raise
        note = _resume_note(run_uri, store)
        if _State.abort is None or not _State.abort.is_alive():  # not while Ray Train's abort waits in a get
            _leave_ray()
        raise StopRequested(_State.requested, note) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _leave_ray() -> None:
    """Disconnect from Ray now: the job's remaining actors end with it. Left to the interpreter's exit,
    `ray.shutdown` first sleeps 0.5 s for log lines, time that Ray's SIGKILL may not leave."""
    import ray

    try:
        ray.shutdown()
    except Exception as e:  # noqa: BLE001 - exiting anyway
        log.warning("leaving Ray after the stop request: %s", e)


def stop_was_requested() -> bool:
    """Whether a stop signal arrived in this process (under `stop_on_sigterm`)."""
    return _State.requested is not None


@contextlib.contextmanager
def training() -> Iterator[None]:
    """Mark the block as training: a stop request then aborts Ray Train's worker group first."""
    _State.training = True
    try:
        yield
    finally:
        _State.training = False


def _resume_note(run_uri: str, store: Any) -> str | None:
    """Where a rerun resumes, if storage says within LISTING_WAIT_S; None otherwise."""
    from fjordtune.storage import checkpoints as ckpts
    from fjordtune.train.checkpointing import resume_note

    found: list[int] = []

    def newest() -> None:
        try:
            last = ckpts.latest(store, ckpts.checkpoints_uri(run_uri))
        except Exception as e:  # noqa: BLE001 - the line then says to list them later
            log.warning("listing the checkpoints of %s after the stop request: %s", run_uri, e)
            return
        found.append(last.step if last else 0)

    lister = threading.Thread(target=newest, name="fjordtune-stop-listing", daemon=True)
    lister.start()
    lister.join(LISTING_WAIT_S)
    return resume_note(run_uri, found[0]) if found else None
