"""Files in and out: labelled data from the lab's formats, and atomic writes.

Reading (:func:`load_data`)
    - HDF5 with datasets ``data`` and ``label`` (the lab's files; ``x``/``y``
      also work), channels-first ``(N, C, H, W)`` or channels-last;
    - ``.npz`` with arrays ``x`` and ``y`` (or ``data`` and ``label``; a file holding
      both pairs is refused as ambiguous);
    - a folder of images, or a glob pattern of image files (``faces/cl_*.png``),
      labelled by ``label=N`` in the file name (``cl_0_label=43.png``) or by
      an integer subfolder name (``3/img.png``).

Every problem raises :class:`DataFileError` naming the file.

Writing (:func:`atomic_write`, :func:`atomic_path`)
    The output is written to a temporary name in the same folder and renamed
    into place only when complete, so an interrupted run never leaves a
    half-written file or folder behind.

Outputs of the package (:func:`output_directory`, :func:`output_file`)
    The same writer, plus a mark (:data:`OUTPUT_MARKER`): a file in a folder,
    a member of a ``.keras`` zip, an attribute of an HDF5 file. ``overwrite``
    replaces only a marked output, never a folder or file the package did not
    write.
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError, OutputExistsError
from tf_backdoor_defense._labels import class_indices
from tf_backdoor_defense.io._formats import HDF5_SIGNATURE, escape

__all__ = [
    "DataFileError",
    "load_data",
    "match_input_shape",
    "atomic_write",
    "atomic_path",
    "write_text",
    "write_json",
    "to_json",
    "check_outputs_free",
    "OUTPUT_MARKER",
    "check_output_dir",
    "output_directory",
    "check_output_file",
    "output_file",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_LABEL_IN_NAME = re.compile(r"label[=_-]?(\d+)", re.IGNORECASE)
_X_KEYS = ("data", "x", "images", "X")
_Y_KEYS = ("label", "labels", "y", "Y")


class DataFileError(InputError):
    """A data file that cannot be used: unreadable, empty, mislabelled or the wrong shape."""


# -- reading ---------------------------------------------------------------------------
def _pick(keys, wanted, path, what):
    found = [key for key in wanted if key in keys]
    if len(found) > 1:  # e.g. both x/y and data/label: which pair is meant is a guess
        raise DataFileError(f"'{path}' holds several {what} arrays ({', '.join(found)}); it is "
                            f"not clear which to read. Keep one {what} array (x and y, or data "
                            "and label) in the file.")
    if found:
        return found[0]
    raise DataFileError(f"'{path}' has no {what} array: expected one of {list(wanted)}, found "
                        f"{sorted(keys)}.")


def _read_hdf5(path):
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            keys = list(handle.keys())
            x_key = _pick(keys, _X_KEYS, path, "input")
            y_key = _pick(keys, _Y_KEYS, path, "label")
            return np.asarray(handle[x_key]), np.asarray(handle[y_key])
    except DataFileError:
        raise
    except Exception as error:  # noqa: BLE001 - h5py raises many kinds on malformed bytes
        raise DataFileError(f"'{path}' is not a readable HDF5 data file ({_short(error)}).") \
            from None


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            x_key = _pick(keys, _X_KEYS, path, "input")
            y_key = _pick(keys, _Y_KEYS, path, "label")
            return np.asarray(archive[x_key]), np.asarray(archive[y_key])
    except DataFileError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile/zlib/numpy raise many kinds on bad bytes
        raise DataFileError(f"'{path}' is not a readable .npz data file ({_short(error)}).") \
            from None


def _image_label(file, root):
    found = _LABEL_IN_NAME.findall(file.stem)
    if found:
        return int(found[-1])
    parent = file.parent
    if (root is None or parent != root) and parent.name.isdigit():
        return int(parent.name)
    raise DataFileError(f"Cannot tell the label of image '{file}': name it like "
                        "'img_label=3.png' or put it in a subfolder named after its class "
                        "('3/img.png').")


def _image_files(path):
    """``(files, root)`` of a folder of images or a glob pattern such as ``faces/cl_*.png``."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataFileError(f"Folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        return files, path
    root = pathlib.Path(path.anchor) if path.is_absolute() else pathlib.Path(".")
    pattern = str(path.relative_to(root)) if path.is_absolute() else str(path)
    files = sorted(p for p in root.glob(pattern)
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataFileError(f"No image file matches '{path}'.")
    return files, None


def _read_images(files, folder, channels=None):
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError("Reading image folders needs Pillow: `pip install pillow`.") from None

    images, labels = [], []
    for file in files:
        try:
            with Image.open(file) as image:
                if channels == 1:
                    image = image.convert("L")
                elif channels == 3 or image.mode not in ("L", "RGB"):
                    image = image.convert("RGB")
                array = np.asarray(image, dtype=np.float32)
        except Image.DecompressionBombError as error:
            raise DataFileError(f"Image '{file}' is too large to decode safely (a decompression "
                                f"bomb? {_short(error)}).") from None
        except (UnidentifiedImageError, Exception) as error:  # noqa: BLE001 - any decoder error
            raise DataFileError(f"Image '{file}' cannot be read ({_short(error)}).") from None
        if array.ndim == 2:
            array = array[..., None]
        if images and array.shape != images[0].shape:
            raise DataFileError(f"Image '{file}' has shape {array.shape}, but '{files[0]}' has "
                                f"{images[0].shape}; all images must have the same size.")
        images.append(array)
        labels.append(_image_label(file, folder))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _short(error):
    from tf_backdoor_defense.io._formats import one_line

    return one_line(error)


def _check_labels(y, path):
    if np.iscomplexobj(y):
        raise DataFileError(f"The labels in '{path}' must be real integers; got complex "
                            f"values (dtype {y.dtype}).")
    if np.issubdtype(y.dtype, np.floating) and y.size and \
            not np.all(np.abs(y[np.isfinite(y)]) < 2.0 ** 62):
        raise DataFileError(f"The labels in '{path}' are out of range: the largest is "
                            f"{np.nanmax(np.abs(y)):g}; labels are class indices.")
    try:
        return class_indices(y, f"The labels in '{path}'")
    except (ValueError, TypeError) as error:
        raise DataFileError(str(error)) from None


def _to_channels_last(x):
    """Move a channels-first image axis last when the data clearly is channels-first."""
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        return np.transpose(x, (0, 2, 3, 1))
    return x


def match_input_shape(x, input_shape, path="data"):
    """Return ``x`` in the layout the model expects, or raise :class:`DataFileError`.

    Channels-first images ``(N, C, H, W)`` are transposed when the model
    expects ``(H, W, C)``.

    Examples
    --------
    >>> import numpy as np
    >>> match_input_shape(np.zeros((2, 3, 5, 4)), (5, 4, 3)).shape
    (2, 5, 4, 3)
    """
    expected = tuple(input_shape)

    def fits(shape):
        return len(shape) == len(expected) and all(e is None or e == s
                                                   for e, s in zip(expected, shape))

    if fits(x.shape[1:]):
        return x
    if x.ndim == 4 and fits((x.shape[2], x.shape[3], x.shape[1])):
        return np.transpose(x, (0, 2, 3, 1))
    if x.ndim == 4 and fits((x.shape[3], x.shape[1], x.shape[2])):
        return np.transpose(x, (0, 3, 1, 2))
    if x.ndim == len(expected) and fits(tuple(x.shape[1:]) + (1,)):
        return x[..., None]
    shown = tuple("?" if e is None else e for e in expected)
    raise DataFileError(f"'{path}' has inputs of shape {tuple(x.shape[1:])}, but the model "
                        f"expects {shown} (batch dimension excluded).")


def load_data(path, *, scale=None, input_shape=None):
    """Read labelled data from an HDF5 file, an ``.npz`` file or a folder of images.

    Parameters
    ----------
    path : str or os.PathLike
    scale : float, default=None
        Divide the inputs by this number (``255`` for models trained on
        ``x / 255``); ``None`` keeps the stored values.
    input_shape : tuple, default=None
        The model's input shape without the batch axis. Channels-first data
        is transposed to match it, and any other shape is an error. Without
        it, 4-D data whose axis 1 has 1 or 3 entries (and whose last axis
        does not) is taken as channels-first.

    Returns
    -------
    x : float32 numpy array
    y : int64 numpy array of class indices

    Raises
    ------
    DataFileError
        Naming the file: unreadable, no inputs/labels, different numbers of
        inputs and labels, no examples, NaN or Inf values, negative or
        non-integer labels, or a shape the model cannot take.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     np.savez(folder + "/set.npz", x=np.full((2, 3, 4, 4), 255.0), y=[0, 1])
    ...     x, y = load_data(folder + "/set.npz", scale=255)
    >>> x.shape, float(x.max()), y.tolist()
    ((2, 4, 4, 3), 1.0, [0, 1])
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"The 'path' parameter must be a path. Got {path!r} instead.")
    path = pathlib.Path(path)
    is_glob = any(c in str(path) for c in "*?[")
    if not path.exists() and not is_glob:
        raise DataFileError(f"Data file '{path}' does not exist.")
    channels = None
    if input_shape is not None and len(input_shape) == 3:
        channels = input_shape[-1]
    if path.is_dir() or (is_glob and not path.exists()):
        x, y = _read_images(*_image_files(path), channels)
    else:
        with open(path, "rb") as handle:
            head = handle.read(8)
        if not head:
            raise DataFileError(f"Data file '{path}' is empty.")
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            x, y = _read_hdf5(path)
        elif head.startswith(b"PK") or path.suffix.lower() == ".npz":
            x, y = _read_npz(path)
        else:
            raise DataFileError(f"'{path}' is not a data file: expected HDF5 (data/label), "
                                ".npz (x/y) or a folder of images.")
    if np.iscomplexobj(x):
        raise DataFileError(f"The inputs in '{path}' must be real numbers; got complex values "
                            f"(dtype {x.dtype}).")
    if not np.issubdtype(x.dtype, np.number):
        raise DataFileError(f"The inputs in '{path}' must be numbers; got dtype {x.dtype}.")
    if x.ndim < 2:
        raise DataFileError(f"The inputs in '{path}' must have a batch axis and at least one "
                            f"feature axis; got shape {x.shape}.")
    y = _check_labels(y, path)
    if x.shape[0] != y.shape[0]:
        raise DataFileError(f"'{path}' has {x.shape[0]} inputs but {y.shape[0]} labels; they "
                            "must have the same length.")
    if x.shape[0] == 0:
        raise DataFileError(f"'{path}' is empty: it has no examples.")
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)))
        raise DataFileError(f"'{path}' contains NaN or Inf values (in {bad} of {len(x)} inputs).")
    x = _to_channels_last(x) if input_shape is None else match_input_shape(x, input_shape, path)
    if scale is not None:
        scale = float(scale)
        if not np.isfinite(scale) or scale <= 0:
            raise InputError(f"The 'scale' parameter must be a positive number. Got {scale}.")
        x = x / np.float32(scale)
    return np.ascontiguousarray(x, dtype=np.float32), y


# -- writing ---------------------------------------------------------------------------
# Temporaries beside an output are named ".<name>.tmp-<pid>-<random>" (".old-" for an earlier
# output being swapped out), so that those of a process killed outright (SIGKILL, a power
# cut) are recognised and removed by the next write of the same output.
def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid we can ask about: keep
    return True


def remove_stale_temporaries(target):
    """Remove the temporaries that a killed writer of ``target`` left beside it.

    Only names this module makes (``.<name>.tmp-<pid>-...``, ``.<name>.old-<pid>-...``,
    and ``.<stem>.tmp-<pid>-...<suffix>`` for files) whose process no longer runs. An
    earlier output that a writer killed in the middle of the final swap had moved aside
    is put back first when nothing took its place. Returns the paths removed.

    >>> import os, pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = pathlib.Path(tmp)
    ...     (folder / ".report.tmp-999999999-abc").mkdir()
    ...     (folder / f".report.tmp-{os.getpid()}-xyz").mkdir()   # a live writer: kept
    ...     [p.name for p in remove_stale_temporaries(folder / "report")]
    ['.report.tmp-999999999-abc']
    """
    target = pathlib.Path(target)
    if not target.parent.is_dir():
        return []
    patterns = [re.escape(f".{target.name}.") + r"(?:tmp|old)-(\d+)-.+"]
    if target.suffix:
        patterns.append(re.escape(f".{target.stem}.tmp-") + r"(\d+)-.+" + re.escape(target.suffix))
    removed = []
    for sibling in sorted(target.parent.iterdir()):
        match = next((m for m in (re.fullmatch(p, sibling.name) for p in patterns) if m), None)
        if match is None or sibling.is_symlink() or _pid_alive(int(match.group(1))):
            continue
        if (sibling.name.startswith(f".{target.name}.old-") and (sibling / "old").exists()
                and not target.exists() and not target.is_symlink()):
            os.replace(sibling / "old", target)  # killed mid-swap: the earlier output returns
        _remove(sibling)
        removed.append(sibling)
    return removed


def _temp_name(target, directory=False, kind="tmp"):
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "tmp":  # once per write: the trash of the final swap needs no second look
        remove_stale_temporaries(target)
    if directory:
        return pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-",
                                             dir=folder))
    handle, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp-{os.getpid()}-",
                                    suffix=target.suffix, dir=folder)
    os.close(handle)
    return pathlib.Path(name)


def _replace(temp, target):
    if target.is_dir() and not target.is_symlink():
        trash = _temp_name(target, directory=True, kind="old")
        os.replace(target, trash / "old")
        os.replace(temp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(temp, target)


def _remove(temp):
    if temp.is_dir() and not temp.is_symlink():
        shutil.rmtree(temp, ignore_errors=True)
    elif temp.exists():
        temp.unlink()


@contextlib.contextmanager
def atomic_path(path, *, directory=False, overwrite=True):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    For writers that take a file name (``model.save``, ``figure.savefig``,
    ``tf.saved_model.save``). The temporary name keeps ``path``'s suffix. With
    ``directory=True`` the yielded folder exists and is empty (writers that
    insist on creating it themselves can delete it first). On an exception
    the temporary file or folder is removed and ``path`` is untouched.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     target = pathlib.Path(folder) / "out.txt"
    ...     with atomic_path(target) as temp:
    ...         _ = temp.write_text("done")
    ...     target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('done', ['out.txt'])
    """
    target = pathlib.Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError([target])
    temp = _temp_name(target, directory)
    if not directory:
        temp.unlink()
    try:
        yield temp
        if not temp.exists():
            raise RuntimeError(f"Nothing was written to the temporary path for '{target}'.")
        _replace(temp, target)
    except BaseException:
        _remove(temp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="w", *, encoding="utf-8", overwrite=True):
    """Open a temporary file next to ``path``; rename it onto ``path`` when the block ends.

    Parameters
    ----------
    path : str or os.PathLike
    mode : {"w", "wb"}, default="w"
    encoding : str, default="utf-8"
        For text mode.
    overwrite : bool, default=True
        ``False`` raises :class:`~tf_backdoor_defense.OutputExistsError` (a
        ``FileExistsError``) when ``path`` exists.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     target = pathlib.Path(tmp) / "table.csv"
    ...     with atomic_write(target) as handle:
    ...         _ = handle.write("a,b\\n")
    ...     target.read_text()
    'a,b\\n'
    """
    if mode not in ("w", "wb"):
        raise InputError(f"The 'mode' parameter must be 'w' or 'wb'. Got {mode!r} instead.")
    with atomic_path(path, overwrite=overwrite) as temp:
        kwargs = {} if mode == "wb" else {"encoding": encoding, "newline": ""}
        with open(temp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text(path, text, *, overwrite=True):
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, overwrite=overwrite) as handle:
        handle.write(text)
    return pathlib.Path(path)


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _clean_floats(value):
    if isinstance(value, dict):
        return {str(k): _clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_floats(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def to_json(value, indent=2):
    """JSON text with NaN/Inf as ``null`` and numpy values as Python numbers."""
    return json.dumps(_clean_floats(value), indent=indent, default=_json_default,
                      allow_nan=False) + "\n"


def write_json(path, value, *, overwrite=True):
    """Write ``value`` as JSON (NaN as ``null``) to ``path`` atomically."""
    return write_text(path, to_json(value), overwrite=overwrite)


def check_outputs_free(paths, overwrite=False, *, force=None):
    """Raise :class:`~tf_backdoor_defense.OutputExistsError` listing the ``paths`` that exist.

    Parameters
    ----------
    paths : iterable of str or os.PathLike
    overwrite : bool, default=False
        Existing outputs may be replaced: nothing is checked.
    force : bool, default=None
        The former name of ``overwrite``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = pathlib.Path(tmp)
    ...     _ = (folder / "a.csv").write_text("kept")
    ...     try:
    ...         check_outputs_free([folder / "a.csv", folder / "b.csv"])
    ...     except FileExistsError as error:
    ...         print([pathlib.Path(p).name for p in error.paths])
    ['a.csv']
    """
    if force is not None:
        overwrite = force
    existing = [str(p) for p in paths if pathlib.Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(existing)


#: The file that marks a folder as an output of this package (``overwrite`` may replace it).
OUTPUT_MARKER = ".tf-backdoor-defense-output"


def _check_parents(target):
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"The output '{escape(target)}' is inside '{escape(parent)}', "
                                 "which is a file, not a folder. Choose another path.")
            return


def check_output_dir(path, *, overwrite=False):
    """Raise unless ``path`` can become (or be replaced by) an output folder of this package.

    Call it before any work starts. Refused: an existing file; the current
    folder or a folder that holds it; a non-empty folder without
    ``overwrite``; with ``overwrite``, a non-empty folder this package did
    not write (no :data:`OUTPUT_MARKER` file in it). Paths in the messages
    are escaped (:func:`~tf_backdoor_defense.io._formats.escape`).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = pathlib.Path(tmp)
    ...     _ = (folder / "notes.txt").write_text("mine")
    ...     try:
    ...         check_output_dir(folder, overwrite=True)
    ...     except ValueError as error:
    ...         print("refused")
    refused
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"The output path must be a path. Got {type(path).__name__}.")
    target = pathlib.Path(path)
    if target.exists() and not target.is_dir():
        raise InputError(f"The output '{escape(target)}' is a file, but a folder is expected "
                         "there. Choose another name or remove the file.")
    _check_parents(target)
    resolved, cwd = target.resolve(), pathlib.Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise InputError(f"The output folder '{escape(target)}' is the current folder or holds "
                         "it; it cannot be replaced. Choose a new folder.")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OutputExistsError([target])
        if not (target / OUTPUT_MARKER).is_file():
            raise InputError(f"The output folder '{escape(target)}' holds files this package "
                             f"did not write (no {OUTPUT_MARKER} file), so it is not replaced. "
                             "Choose a new folder or empty it.")
    return target


@contextlib.contextmanager
def output_directory(path, *, overwrite=False):
    """Build an output folder aside and swap it in whole when the block ends.

    Yields an empty staging folder next to ``path`` (holding only
    :data:`OUTPUT_MARKER`). On success the staging folder replaces
    ``path`` with renames (an earlier output there is removed entirely);
    on an exception it is deleted and ``path`` is untouched. See
    :func:`check_output_dir` for what ``overwrite`` may replace.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     target = pathlib.Path(tmp) / "report"
    ...     with output_directory(target) as staging:
    ...         _ = (staging / "summary.json").write_text("{}")
    ...     sorted(p.name for p in target.iterdir())
    ['.tf-backdoor-defense-output', 'summary.json']
    """
    target = check_output_dir(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_name(target, directory=True)
    try:
        (staging / OUTPUT_MARKER).write_text("written by tf_backdoor_defense\n", encoding="utf-8")
        yield staging
        check_output_dir(target, overwrite=overwrite)  # nothing foreign appeared meanwhile
        if target.exists():
            trash = _temp_name(target, directory=True, kind="old")
            os.replace(target, trash / "old")
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(trash / "old", target)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_MARK_TEXT = "written by tf_backdoor_defense\n"


def _mark_file(path):
    """Mark the model file ``path`` as an output of this package (HDF5 attribute or zip member)."""
    import zipfile  # noqa: PLC0415

    with open(path, "rb") as handle:
        head = handle.read(len(HDF5_SIGNATURE))
    if head == HDF5_SIGNATURE:
        import h5py  # noqa: PLC0415

        with h5py.File(path, "r+") as handle:
            handle.attrs[OUTPUT_MARKER] = _MARK_TEXT
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(OUTPUT_MARKER, _MARK_TEXT)
    else:
        raise InputError(f"'{escape(path)}' is neither an HDF5 nor a zip file; it cannot be "
                         "marked as an output.")


def _is_marked_file(path):
    import zipfile  # noqa: PLC0415

    try:
        with open(path, "rb") as handle:
            head = handle.read(len(HDF5_SIGNATURE))
        if head == HDF5_SIGNATURE:
            import h5py  # noqa: PLC0415

            with h5py.File(path, "r") as handle:
                return OUTPUT_MARKER in handle.attrs
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return OUTPUT_MARKER in archive.namelist()
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False
    return False


def check_output_file(path, *, overwrite=False):
    """Raise unless ``path`` can become (or replace) a model file this package writes.

    Call it before any work starts. Refused: an existing folder; a path
    inside a file; an existing file without ``overwrite``; with
    ``overwrite``, a file this package did not write (an ``.h5`` without
    the :data:`OUTPUT_MARKER` attribute, a ``.keras`` without that member,
    anything else).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     target = pathlib.Path(tmp) / "model.h5"
    ...     _ = target.write_text("someone's notes")
    ...     try:
    ...         check_output_file(target, overwrite=True)
    ...     except ValueError as error:
    ...         print("refused")
    refused
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"The output path must be a path. Got {type(path).__name__}.")
    target = pathlib.Path(path)
    if target.is_dir():
        raise InputError(f"The output '{escape(target)}' is a folder, but a file is expected "
                         "there. Choose another name.")
    _check_parents(target)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputExistsError([target])
        if target.is_symlink() or not _is_marked_file(target):
            raise InputError(f"The output file '{escape(target)}' was not written by this "
                             "package (it carries no output mark), so it is not replaced. "
                             "Choose a new name or remove it.")
    return target


@contextlib.contextmanager
def output_file(path, *, overwrite=False):
    """Yield a temporary path next to ``path`` for a model file; mark it and rename it onto ``path``.

    :func:`atomic_path` with the checks of :func:`check_output_file` and
    the output mark added to the finished ``.h5`` or ``.keras`` file (an
    HDF5 attribute or a zip member; Keras ignores both). On an exception
    nothing is left behind and ``path`` is untouched.

    Examples
    --------
    >>> import tempfile, pathlib, zipfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     target = pathlib.Path(tmp) / "model.keras"
    ...     with output_file(target) as temp:
    ...         zipfile.ZipFile(temp, "w").close()
    ...     zipfile.ZipFile(target).namelist()
    ['.tf-backdoor-defense-output']
    """
    target = check_output_file(path, overwrite=overwrite)
    with atomic_path(target, overwrite=True) as temp:
        yield temp
        if temp.exists():
            _mark_file(temp)
        check_output_file(target, overwrite=overwrite)  # nothing foreign appeared meanwhile
