"""The exceptions raised for bad input (standard library only, so they import without TensorFlow).

Every public function raises :class:`InputError` (a ``ValueError``) for an
input value it cannot use and :class:`InputTypeError` (a ``TypeError``) for
an input of the wrong type. Anything else that escapes the library is a
bug, not a problem with the input. The file errors derive from
:class:`InputError`: ``DataFileError``, ``ModelFileError``,
``UnsafeModelError`` and :class:`OutputExistsError`.

Examples
--------
>>> try:
...     raise InputError("The 'epochs' parameter must be > 0. Got 0.")
... except ValueError as error:
...     print(type(error).__name__, isinstance(error, InputError))
InputError True
"""

__all__ = ["InputError", "InputTypeError", "OutputExistsError", "INPUT_ERRORS"]


class InputError(ValueError):
    """An input value that cannot be used: out of range, inconsistent, or an unusable file."""


class InputTypeError(TypeError):
    """An input of the wrong type."""


class OutputExistsError(InputError, FileExistsError):
    """An output path that already exists where overwriting was not allowed.

    Attributes
    ----------
    paths : tuple of str
        The outputs that exist.

    Examples
    --------
    >>> error = OutputExistsError(["report/sweep.csv"])
    >>> error.paths, isinstance(error, FileExistsError)
    (('report/sweep.csv',), True)
    >>> str(error)
    'Output already exists: report/sweep.csv. Pass overwrite=True to replace it.'
    """

    def __init__(self, paths):
        self.paths = tuple(str(p) for p in paths)
        shown = ", ".join(self.paths[:5]) + (" ..." if len(self.paths) > 5 else "")
        super().__init__(f"Output already exists: {shown}. Pass overwrite=True to replace it.")

    def __reduce__(self):
        return type(self), (self.paths,)


#: What ``except`` needs to catch every input error the library raises.
INPUT_ERRORS = (InputError, InputTypeError)
