"""The progress of a training run: a widget in Jupyter, a tqdm bar on a terminal, plain lines in a log."""

from __future__ import annotations

import os
import sys

from .history import History

__all__ = ["Progress"]


class Progress:
    """Training progress: a widget in a Jupyter kernel, a tqdm bar on a terminal, a few plain lines in a log.

    ``update(done, loss, history)`` after each step, ``close()`` at the end. Without a TTY (or
    with ``enabled="lines"``: several processes writing to one terminal) a
    redrawn bar would write one line per step into the log, so instead a line is printed at
    25 %, 50 %, 75 % and 100 % of the steps: step, loss, tokens per second. In a kernel without
    ipywidgets a text bar would print TqdmWarning and store every redraw in the notebook, so
    there is no bar (``TQDM_DISABLE=1`` turns every bar off; tqdm.notebook ignores it itself).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.marks = sorted({max(1, (total * q) // 4) for q in (1, 2, 3, 4)}) if total > 0 else []
        if enabled and os.environ.get("TQDM_DISABLE", "").strip() not in ("", "0"):
            self.enabled = False
        kwargs = dict(total=total, initial=initial, desc=desc, unit="step", leave=False)
        if self.enabled is True and _in_kernel():  # enabled="lines": plain lines, never a bar
            self.marks = []  # a notebook: the widget or nothing, never printed lines
            try:
                import ipywidgets  # noqa: F401  (tqdm.notebook needs it)
                from tqdm.notebook import tqdm as notebook_tqdm
            except ImportError:
                return
            self.bar = notebook_tqdm(**kwargs)
        elif self.enabled is True and _is_tty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(dynamic_ncols=True, file=self.stream, **kwargs)

    def update(self, done: int, loss: float, history: History) -> None:
        if not self.enabled:
            return
        tok_s = history.tokens / max(history.seconds, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
        elif done in self.marks:
            print(f"  {self.desc}: step {done}/{self.total}, loss {loss:.4f}, {tok_s:,.0f} tok/s, "
                  f"{history.seconds:.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (IPython exists only where Jupyter is installed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None
