"""Keep TensorFlow's native log lines off the stderr of the ``tf-backdoor-defense`` command.

TensorFlow's C++ code writes lines such as ``I0000 ... port.cc:153] oneDNN
custom operations are on`` straight to file descriptor 2 while it loads,
before absl logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` does not hide
them. The only cure is to point fd 2 at ``/dev/null`` before TensorFlow is
imported, while Python's ``sys.stderr`` keeps writing to the real stream
(so notes, progress bars, warnings and tracebacks still show).

The package's ``__init__`` calls :func:`quiet_native_startup` before it
imports TensorFlow: it acts only when this process is the command
(``tf-backdoor-defense ...`` or ``python -m tf_backdoor_defense ...``) without
``--debug``; imported as a library, nothing changes. The command's ``main``
then keeps the redirection (:func:`silenced`) until it returns.

Only the standard library is imported here.
"""

import atexit
import contextlib
import os
import sys

__all__ = ["NativeStderr", "quiet_native_startup", "running_as_command", "silenced"]

SCRIPT_NAMES = ("tf-backdoor-defense", "tf-backdoor-defense.exe")
MODULE_NAMES = ("tf_backdoor_defense", "tf_backdoor_defense.__main__", "tf_backdoor_defense.cli._main")


class NativeStderr:
    """Send fd 2 to ``/dev/null``; ``sys.stderr`` is re-opened on the original stream.

    Examples
    --------
    >>> redirect = NativeStderr()
    >>> redirect.active
    False
    >>> redirect.stop()  # stopping a redirection that never started does nothing
    """

    def __init__(self):
        self.saved = None
        self.stream = None
        self.python_stderr = None

    @property
    def active(self):
        return self.saved is not None

    def start(self):
        """Redirect; returns False (and changes nothing) where fd 2 cannot be duplicated."""
        if self.active:
            return True
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return False
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            stream = os.fdopen(os.dup(saved), "w", buffering=1,
                               encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                               errors="backslashreplace")
        except (OSError, ValueError):
            os.close(saved)
            return False
        self.saved, self.stream, self.python_stderr = saved, stream, sys.stderr
        sys.stderr = stream
        os.dup2(devnull, 2)
        os.close(devnull)
        return True

    def stop(self):
        """Put fd 2 and ``sys.stderr`` back."""
        if not self.active:
            return
        saved, self.saved = self.saved, None
        try:
            self.stream.flush()
            self.stream.close()
        finally:
            if sys.stderr is self.stream:
                sys.stderr = self.python_stderr
            os.dup2(saved, 2)
            os.close(saved)


_STARTUP = NativeStderr()


def running_as_command(argv=None, orig_argv=None):
    """True when this process is ``tf-backdoor-defense`` or ``python -m tf_backdoor_defense``.

    Examples
    --------
    >>> running_as_command(["/usr/bin/tf-backdoor-defense", "inspect"], ["python", "x"])
    True
    >>> running_as_command(["-m"], ["python", "-m", "tf_backdoor_defense", "inspect"])
    True
    >>> running_as_command(["-m"], ["python", "-m", "pytest"])
    False
    """
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv and os.path.basename(str(argv[0])) in SCRIPT_NAMES:
        return True
    if list(argv[:1]) != ["-m"]:  # runpy's sys.argv[0] while it imports the -m module's package
        return False
    for index, word in enumerate(orig_argv[1:], start=1):
        if word == "-m":
            return index + 1 < len(orig_argv) and orig_argv[index + 1] in MODULE_NAMES
        if word.startswith("-m"):
            return word[2:] in MODULE_NAMES
    return False


def quiet_native_startup():
    """Silence fd 2 until the command's ``main`` takes over (only when run as the command).

    Returns True when it redirected. It does nothing when TensorFlow is
    already imported, with ``--debug`` on the command line, or when the
    package is imported as a library.
    """
    if "tensorflow" in sys.modules or "--debug" in sys.argv[1:] or not running_as_command():
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not _STARTUP.start():
        return False
    atexit.register(_STARTUP.stop)
    return True


@contextlib.contextmanager
def silenced(enabled):
    """fd 2 to ``/dev/null`` for the block when ``enabled`` (it adopts the start-up redirection).

    With ``enabled=False`` a start-up redirection is undone first, so the
    block writes to the real stderr.
    """
    if not enabled:
        _STARTUP.stop()
        yield
        return
    redirect = _STARTUP if _STARTUP.active else NativeStderr()
    redirect.start()
    try:
        yield
    finally:
        redirect.stop()
