"""Ctrl-C during training: finish the step, write a checkpoint, then stop; a second Ctrl-C stops at once.

A KeyboardInterrupt raised wherever Python happens to be (in the middle of an optimizer step, half-way through
the gradients of an accumulated step) leaves nothing worth saving. So while the loop runs, SIGINT only sets a
flag; the loop looks at it between steps, where the model, optimizer and data position agree, saves there
and raises `TrainingInterrupted` (a KeyboardInterrupt: code that catches Ctrl-C still does). The first
Ctrl-C also puts the usual handler back, so a second one interrupts at once (a checkpoint being written is
then abandoned; writes are atomic, so the previous one stays whole).

Only the main thread can receive signals: elsewhere (and when disabled) `deferred_interrupt` changes nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C between two steps. step: the steps done; checkpoint: the folder holding them
    (None if none could be written)."""

    def __init__(self, step: int, checkpoint: Path | None):
        saved = f"; checkpoint {checkpoint}" if checkpoint is not None else "; no checkpoint written"
        super().__init__(f"interrupted at step {step}{saved}")
        self.step, self.checkpoint = step, checkpoint


class InterruptFlag:
    """Set by the first SIGINT while `deferred_interrupt` is active."""

    requested = False


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True):
    """Within the block, the first SIGINT sets `flag.requested` (and restores the previous handler) instead of
    raising; yields the flag."""
    flag = InterruptFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: Python's own is the closest we can put back
        previous = signal.default_int_handler

    def note(signum, frame):
        flag.requested = True
        signal.signal(signal.SIGINT, previous)  # the next Ctrl-C interrupts at once

    signal.signal(signal.SIGINT, note)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
