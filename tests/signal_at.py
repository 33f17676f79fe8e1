"""train.py with a signal raised in its training loop just before a given step, so that a
test's preemption or kill lands at a known step instead of wherever a timer put it:

    python tests/signal_at.py NAME:EPOCH:STEP[:PROCESS] [train.py's arguments]

EPOCH counts from 1 and STEP from 0; with PROCESS, only that process of a multi-process run
raises it. A SIGKILL first waits for the checkpoint being written (it models a kill after that
checkpoint landed). The hook goes in through the loop's `BEFORE_STEP`, from outside the
package."""

import importlib
import signal
import sys

from pand_jax import cli


def hook_for(spec: str):
    """The `loop.BEFORE_STEP` hook of NAME:EPOCH:STEP[:PROCESS]."""
    import jax

    name, epoch, step, *process = spec.split(":")
    signum, at = signal.Signals[name], (int(epoch), int(step))

    def hook(epoch: int, step: int, checkpointer) -> None:
        if (epoch, step) != at or (process and int(process[0]) != jax.process_index()):
            return
        if signum == signal.SIGKILL:
            checkpointer.wait()
        signal.raise_signal(signum)

    return hook


if __name__ == "__main__":
    spec = sys.argv.pop(1)
    cli.start()  # may restart this script (huge pages), with the same arguments
    from pand_jax.train import loop

    loop.BEFORE_STEP.append(hook_for(spec))
    sys.exit(importlib.import_module("pand_jax.cli.train").main())
