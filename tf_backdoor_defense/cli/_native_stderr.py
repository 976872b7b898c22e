"""Keep TensorFlow's native log lines off the stderr of the ``tf-backdoor-defense`` command.

TensorFlow's C++ code writes lines such as ``I0000 ... port.cc:153] oneDNN
custom operations are on`` straight to file descriptor 2 while it loads,
before absl logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` does not hide
them all. The cure is to point fd 2 at ``/dev/null`` before TensorFlow is
imported, while Python's ``sys.stderr`` keeps writing to the real stream
(so notes, progress bars, warnings and tracebacks still show).

Only the command does this, inside its ``main()``
(:func:`tf_backdoor_defense.cli._console.session`), and it puts fd 2 and
``sys.stderr`` back when ``main()`` returns. Importing the package never
touches them. Only the standard library is imported here.
"""

import os
import sys

__all__ = ["NativeStderr"]


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
        """Put fd 2 and ``sys.stderr`` back.

        The stream that stood in for ``sys.stderr`` stays open (it writes to
        the real stderr): a logging handler created meanwhile, such as the
        one TensorFlow adds to its logger when it loads, may still hold it.
        """
        if not self.active:
            return
        saved, self.saved = self.saved, None
        try:
            self.stream.flush()
        finally:
            if sys.stderr is self.stream:
                sys.stderr = self.python_stderr
            os.dup2(saved, 2)
            os.close(saved)
