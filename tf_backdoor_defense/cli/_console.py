"""The command's console: notes, progress bars and library log lines on stderr.

Only the standard library is imported here, so that ``--help`` stays fast.
:func:`session` is where the command takes the console over for the
duration of one ``main()`` call (and gives it back unchanged): TensorFlow's
native start-up lines, the Python loggers of TensorFlow and of this package,
and the warning filters and their display.
"""

import contextlib
import logging
import os
import sys
import time
import warnings

from tf_backdoor_defense.cli._native_stderr import NativeStderr

__all__ = ["Console", "ConsoleLogHandler", "ProgressBatches", "progress_data", "session"]

PACKAGE_LOGGER = "tf_backdoor_defense"


class Console:
    """Notes and progress bars on stderr, results on stdout.

    Examples
    --------
    >>> import io
    >>> stream = io.StringIO()
    >>> console = Console(stream=stream)
    >>> console.bars  # a StringIO is not a terminal: no bars
    False
    >>> console.note("loading")
    >>> stream.getvalue()
    'loading\\n'
    """

    def __init__(self, quiet=False, json_mode=False, stream=None):
        self.quiet = quiet
        self.json_mode = json_mode
        self._stream = stream
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.bars = tty and not quiet

    @property
    def stream(self):
        """The stream given, else ``sys.stderr`` as it is now (:func:`session` may replace it)."""
        return self._stream if self._stream is not None else sys.stderr

    def note(self, text):
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def bar(self, label, total):
        bar = _Bar(label, total, self.stream) if self.bars else _NoBar()
        try:
            yield bar
        finally:
            bar.close()

    @contextlib.contextmanager
    def step(self, label):
        """A step without a count: a line when it starts and its time when it ends."""
        started = time.perf_counter()
        if self.bars:
            self.stream.write(f"{label} ...")
            self.stream.flush()
        yield
        if self.bars:
            self.stream.write(f"\r{label} ... done in {time.perf_counter() - started:.1f} s\n")
            self.stream.flush()


class _NoBar:
    def update(self, n=1, info=None, force=False):
        pass

    def close(self):
        pass


class _Bar:
    """A one-line text progress bar (no dependency)."""

    def __init__(self, label, total, stream, width=28):
        self.label, self.total, self.stream, self.width = label, max(int(total), 1), stream, width
        self.done = 0
        self.info = ""
        self.started = time.perf_counter()
        self.last = 0.0
        self.closed = False
        self.draw()

    def draw(self):
        filled = int(self.width * self.done / self.total)
        elapsed = time.perf_counter() - self.started
        self.stream.write(f"\r{self.label:<22} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{self.done}/{self.total} {elapsed:5.1f} s"
                          + (f"  {self.info}" if self.info else ""))
        self.stream.flush()

    def update(self, n=1, info=None, force=False):
        """Advance by ``n``; ``info`` is shown after the count; redrawn at most every 0.1 s."""
        self.done = min(self.done + n, self.total)
        if info is not None:
            self.info = info
        now = time.perf_counter()
        if force or now - self.last > 0.1:
            self.last = now
            self.draw()

    def close(self):
        if not self.closed:
            self.closed = True
            self.draw()
            self.stream.write("\n")
            self.stream.flush()


class ProgressBatches:
    """Re-iterable (x, y) batches that move a progress bar; pass number ``i`` uses ``labels[i]``."""

    def __init__(self, x, y, batch_size, console, labels):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.console, self.labels, self.passes = console, list(labels), 0

    def __iter__(self):
        label = self.labels[min(self.passes, len(self.labels) - 1)]
        self.passes += 1
        total = -(-len(self.x) // self.batch_size)
        with self.console.bar(label, total) as bar:
            for start in range(0, len(self.x), self.batch_size):
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
                bar.update(1)


def progress_data(data, batch_size, console, labels):
    """Arrays as they are, or (on a terminal) a stream of batches with a progress bar."""
    if not console.bars:
        return data
    from tf_backdoor_defense._validation import LabeledData

    return LabeledData(str(labels[0]), dataset=ProgressBatches(data[0], data[1], batch_size,
                                                                 console, labels))


class ConsoleLogHandler(logging.Handler):
    """Shows the package's log records as plain lines among the console's notes.

    Examples
    --------
    >>> import io, logging
    >>> stream = io.StringIO()
    >>> record = logging.LogRecord("tf_backdoor_defense.x", logging.INFO, __file__, 1,
    ...                            "fine-tuning  accuracy %.4f", (0.5,), None)
    >>> ConsoleLogHandler(Console(stream=stream)).handle(record)
    True
    >>> stream.getvalue()
    'fine-tuning  accuracy 0.5000\\n'
    """

    def __init__(self, console):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record):
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            print(text, file=self.console.stream, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def _show_warning(prog):
    def show(message, category, filename, lineno, file=None, line=None):
        stream = file if file is not None else sys.stderr
        text = str(message)
        if category.__name__ == "LowAccuracyWarning" and "divided by 255 too" in text:
            text = text.replace("divided by 255 too", "divided by 255 too (--scale 255)", 1)
        try:
            print(f"{prog}: warning: {text} ({category.__name__})", file=stream, flush=True)
        except (OSError, ValueError):
            pass
    return show


@contextlib.contextmanager
def _logger_state(name, level=None, propagate=None, handler=None):
    """Set a logger's level, propagation and an extra handler; put them back afterwards."""
    logger = logging.getLogger(name)
    saved = logger.level, logger.propagate
    if level is not None:
        logger.setLevel(level)
    if propagate is not None:
        logger.propagate = propagate
    if handler is not None:
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextlib.contextmanager
def _environment(name, value):
    """``os.environ[name]`` defaults to ``value`` inside the block; restored afterwards."""
    had, old = name in os.environ, os.environ.get(name)
    os.environ.setdefault(name, value)
    try:
        yield
    finally:
        if had:
            os.environ[name] = old
        else:
            os.environ.pop(name, None)


@contextlib.contextmanager
def session(console, *, prog, quiet_native=True, debug=False):
    """The command's hold on the process, for one run; everything is put back when it ends.

    - ``quiet_native``: TensorFlow's native log lines go nowhere. While
      TensorFlow loads, ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2, and file
      descriptor 2 points at ``/dev/null`` (TensorFlow's C++ code writes some
      lines there before its logging is set up); ``sys.stderr`` keeps writing
      to the real stream, so notes, warnings and tracebacks still show. This
      only works when TensorFlow has not been imported yet.
    - The package's log records (progress of the library's long steps) are
      shown on the console at INFO level unless ``console.quiet``; the
      ``tensorflow`` logger shows errors only.
    - Warnings are shown as one ``PROG: warning: ...`` line; the two that
      TensorFlow and tf-keras emit on every run of the command (deprecations,
      "saving your model as an HDF5 file") are hidden.

    With ``debug`` nothing is hidden and warnings show as Python prints them.
    """
    with contextlib.ExitStack() as stack:
        if quiet_native and not debug and "tensorflow" not in sys.modules:
            stack.enter_context(_environment("TF_CPP_MIN_LOG_LEVEL", "2"))
            redirect = NativeStderr()
            if redirect.start():
                stack.callback(redirect.stop)
        stack.enter_context(warnings.catch_warnings())
        if not debug:
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
            warnings.showwarning = _show_warning(prog)
            stack.enter_context(_logger_state("tensorflow", level=logging.ERROR))
        handler = None if console.quiet else ConsoleLogHandler(console)
        stack.enter_context(_logger_state(
            PACKAGE_LOGGER, level=logging.INFO,
            propagate=False if handler is not None else None, handler=handler))
        yield
