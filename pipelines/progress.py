"""Progress lines for the pipelines' long phases: counts and rates on stderr, throttled.

Reading and cleaning corpora, learning a vocabulary, decoding a validation
set or running the final beam search can each take minutes; a user who sees
nothing for that long cannot tell a slow run from a stuck one. `Progress`
prints what a phase has done so far, with its rates, at most once every
`every` seconds, and a last line with the totals and the time taken:

```
[read train pairs] 1,200,000 pairs (240,000 pairs/s) 5.0 s
[read train pairs] done: 4,508,785 pairs in 18.8 s (239,829 pairs/s)
```

Lines go to stderr, so that a command's JSON on stdout stays clean. They
are off while `set_enabled(False)` is in force (the CLI's `--quiet`, or
`train.verbose: 0`), or when `KERAS_MOE_QUIET=1` is in the environment.
This module imports nothing heavy: the CLI uses it before TensorFlow loads.

Example:

>>> import io
>>> out = io.StringIO()
>>> with Progress("count", "lines", stream=out, min_seconds=0) as p:
...     p.update(3, words=12)
>>> out.getvalue().startswith("[count] done: 3 lines, 12 words in ")
True
"""

import os
import sys
import time

QUIET_ENV = "KERAS_MOE_QUIET"
_ENABLED = [True]


def set_enabled(enabled):
    """Turn every progress line of this process on or off (returns the previous setting)."""
    previous = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    return previous


def enabled():
    """Whether progress lines are printed now."""
    return _ENABLED[0] and os.environ.get(QUIET_ENV, "") not in ("1", "true")


def emit(text, stream=None):
    """Print one progress line (when enabled) to `stream` (default: stderr; False: nowhere)."""
    if enabled() and stream is not False:
        stream = sys.stderr if stream is None else stream
        print(text, file=stream, flush=True)


def _number(value):
    return f"{value:,.0f}" if float(value).is_integer() or value >= 100 else f"{value:,.1f}"


class Progress:
    """Counts of one phase, printed with their rates at most every `every` seconds.

    Args:
        phase: the phase's name, printed in brackets.
        unit: what `update`'s first argument counts ("lines", "pairs",
            "sentences", ...).
        total: the expected count of `unit`, when known (adds a percentage).
        every: the fewest seconds between two lines.
        min_seconds: `done` prints its line only when the phase took at
            least this long (short phases stay silent).
        stream: where lines go (default: stderr); False: nowhere.
        clock: the time source (`time.monotonic`; tests pass their own).
    """

    def __init__(self, phase, unit="lines", total=None, every=5.0, min_seconds=2.0,
                 stream=None, clock=time.monotonic):
        self.phase = phase
        self.unit = unit
        self.total = total
        self.every = every
        self.min_seconds = min_seconds
        self.stream = stream
        self.clock = clock
        self.count = 0
        self.extra = {}
        self.start = clock()
        self.last = self.start
        self.lines = 0

    def update(self, n=1, **extra):
        """Add `n` to the count (and the named extra counts); print when a line is due."""
        self.count += n
        for name, value in extra.items():
            self.extra[name] = self.extra.get(name, 0) + value
        now = self.clock()
        # A finished count waits for `done`'s line.
        finished = self.total is not None and self.count >= self.total
        if now - self.last >= self.every and not finished:
            self.last = now
            self.lines += 1
            emit(self._line(now - self.start), self.stream)

    def _counts(self, seconds):
        head = f"{_number(self.count)} {self.unit}"
        if self.total:
            head = f"{_number(self.count)}/{_number(self.total)} {self.unit} " \
                f"({100.0 * self.count / self.total:.0f}%)"
        text = ", ".join([head, *(f"{_number(v)} {name}" for name, v in self.extra.items())])
        counts = [(self.unit, self.count), *self.extra.items()]
        rates = ", ".join(f"{_number(v / seconds)} {name}/s" for name, v in counts) \
            if seconds > 0 else ""
        return text, rates

    def _line(self, seconds):
        text, rates = self._counts(seconds)
        return f"[{self.phase}] {text} ({rates}) {seconds:.1f} s"

    def done(self, note=""):
        """The last line: totals, time and rates (when the phase took `min_seconds` or more)."""
        seconds = self.clock() - self.start
        if seconds < self.min_seconds and not self.lines:
            return seconds
        text, rates = self._counts(seconds)
        rates = f" ({rates})" if rates else ""
        emit(f"[{self.phase}] done: {text} in {seconds:.1f} s{rates}{note}", self.stream)
        return seconds

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.done()
        return False


def iterate(items, phase, unit="lines", total=None, count=None, **kwargs):
    """Yield `items` unchanged, counting them in a `Progress` (done when exhausted).

    `count(item)` may return a dict of extra counts for the item (e.g.
    `{"words": len(line.split())}`).
    """
    progress = Progress(phase, unit, total=total, **kwargs)
    for item in items:
        progress.update(1, **(count(item) if count else {}))
        yield item
    progress.done()


def tensorboard_command(log_dir):
    """A `tensorboard --logdir` command that works as typed from this Python.

    Inside a virtualenv that is not activated, a bare `tensorboard` is not
    on the PATH; the script next to `sys.executable` is.
    """
    import shlex
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if os.path.exists(beside) and shutil.which("tensorboard") != beside:
        program = beside
    else:
        program = "tensorboard"
    return f"{shlex.quote(program)} --logdir {shlex.quote(str(log_dir))}"
