"""Ctrl-C / SIGTERM during training: stop at a step boundary with ``last.pt`` saved, and say how to resume."""

from __future__ import annotations

import shlex
import signal
import sys
import threading

from tpsvit.train import distributed
from tpsvit.train.checkpoint import STATE_FILE


class _StopRequest:
    """SIGINT / SIGTERM during :meth:`Run.fit`: finish the current optimiser step (DDP: run on to the next logging
    point, where the ranks agree to stop at the same step), save ``last.pt`` there, then stop
    (:meth:`Run._interrupted`). A second signal stops at once, without saving. Handlers are installed only in the
    main thread and restored on exit."""

    def __init__(self, when: str = "after this step"):
        self.signum, self.previous, self.when = None, {}, when

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\ntpsvit train: {signal.Signals(signum).name}: saving last.pt {self.when} (send it again to stop "
              "without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        return False


class InterruptMixin:
    """The :class:`tpsvit.train.engine.Run` side of a :class:`_StopRequest`: has a signal arrived, do the ranks agree
    to stop, and the stop itself."""

    def _stop_signalled(self) -> bool:
        """Whether a SIGINT/SIGTERM arrived in this process."""
        return getattr(self, "_stop", None) is not None and self._stop.signum is not None

    def _stop_requested(self) -> bool:
        """Whether a SIGINT/SIGTERM arrived (on any rank: every rank stops at the same step)."""
        return distributed.all_reduce_sum([float(self._stop_signalled())], self.info)[0] > 0

    def _interrupted(self, epoch: int, step: int) -> None:
        """After the state was saved at (epoch, step): say how to resume, then stop with KeyboardInterrupt."""
        if self.info.is_main:
            try:
                words = shlex.split(self.command)
            except ValueError:
                words = [self.command]
            again = self.command if "--resume" in words else f"{self.command} --resume"
            print(f"tpsvit train: stopped at epoch {epoch + 1} step {step}/{self.steps_per_epoch} (global step "
                  f"{self.global_step}); saved {self.out / STATE_FILE}; continue with: {again}", file=sys.stderr,
                  flush=True)
        raise KeyboardInterrupt
