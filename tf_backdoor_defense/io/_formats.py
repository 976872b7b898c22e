"""Decide a model file's format once, from its bytes, and refuse ambiguous files.

A file is read into memory once; the format is decided from those bytes
and the same bytes are scanned and then deserialized, so the file cannot
change between the check and the load, and a reader chosen by the file's
name can never see something other than what was checked.

Formats
    ``"h5"``    HDF5 signature at offset 0, no other HDF5 signature at the
                offsets the HDF5 library searches (512, 1024, 2048, ...), and
                not readable as a zip archive;
    ``"keras"`` a zip archive whose first local header is at offset 0, whose
                end record closes the file (no comment, nothing appended),
                with unique member names and no HDF5 signature at a searched
                offset;
    ``"json"``  UTF-8 text starting with ``{``.

A file that two readers would accept (an HDF5 file with a user block, an
HDF5 file with a zip appended, a zip with a prefix) is refused as ambiguous.
"""

import io
import re
import unicodedata
import zipfile

__all__ = ["HDF5_SIGNATURE", "sniff_model_bytes", "escape", "one_line"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_ZIP_END_SIZE = 22
_UTF8_BOM = b"\xef\xbb\xbf"
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|.)?")
_MAX_SHOWN = 80


class AmbiguousFormat(Exception):
    """Raised by :func:`sniff_model_bytes`; the loader turns it into a ``ModelFileError``."""


def escape(text, limit=_MAX_SHOWN):
    """``text`` made safe for a terminal and one line: control characters are escaped.

    ANSI escape sequences, C0/C1 control characters, line breaks and
    bidirectional overrides are written as ``\\xNN``/``\\uNNNN``; text
    longer than ``limit`` characters is cut in the middle with ``...``, so
    that both ends stay (a path keeps its file name).

    Examples
    --------
    >>> escape("conv\\x1b[2K\\rOK")
    'conv\\\\x1b[2K\\\\x0dOK'
    >>> escape("/" + "d" * 100 + "/model.h5", limit=20)
    '/ddddddddd...d/model.h5'
    """
    if not isinstance(text, str):
        text = str(text)
    out = []
    for char in text:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif unicodedata.category(char) in ("Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    shown = "".join(out)
    if limit is not None and len(shown) > limit:
        tail = limit // 2
        shown = shown[:limit - tail] + "..." + shown[len(shown) - tail:] if tail else \
            shown[:limit] + "..."
    return shown


def one_line(error, limit=200):
    """The first line of ``error``'s message, escaped and at most ``limit`` characters.

    Examples
    --------
    >>> one_line(ValueError("first\\nsecond"))
    'first'
    >>> len(one_line(ValueError("x" * 900)))
    200
    """
    text = str(error).strip()
    first = text.splitlines()[0].strip() if text else type(error).__name__
    shown = escape(first, limit=None)
    if len(shown) > limit:
        shown = shown[: limit - 3] + "..."
    return shown


def _hdf5_offsets(data):
    offsets, offset = [], 0
    while offset + len(HDF5_SIGNATURE) <= len(data):
        if data[offset:offset + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE:
            offsets.append(offset)
        offset = 512 if offset == 0 else offset * 2
    return offsets


def _looks_like_zip(data):
    return _ZIP_END in data[-(65536 + _ZIP_END_SIZE):] and \
        zipfile.is_zipfile(io.BytesIO(data))


def _check_zip_layout(data):
    """Raise AmbiguousFormat unless ``data`` is one plain zip archive and nothing else."""
    if not data.startswith(_ZIP_LOCAL):
        raise AmbiguousFormat("it holds a zip archive that does not start at byte 0 "
                              "(something is prepended to it)")
    end = len(data) - _ZIP_END_SIZE
    if end < 0 or data[end:end + 4] != _ZIP_END:
        raise AmbiguousFormat("its zip end record is not at the end of the file (a comment "
                              "or other data follows the archive)")
    if data.count(_ZIP_END) != 1:
        raise AmbiguousFormat("it holds more than one zip end record (archives joined "
                              "together)")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise AmbiguousFormat("it holds two zip members with the same name")
        if infos and min(info.header_offset for info in infos) != 0:
            raise AmbiguousFormat("its first zip member does not start at byte 0")


def sniff_model_bytes(data):
    """The format of a model file's bytes: ``"h5"``, ``"keras"``, ``"json"`` or ``None``.

    Raises :class:`AmbiguousFormat` (with the reason) for a file that more
    than one reader would accept, or whose layout tf-keras never writes.

    Examples
    --------
    >>> sniff_model_bytes(HDF5_SIGNATURE + bytes(100))
    'h5'
    >>> sniff_model_bytes(b'  {"class_name": "Sequential"}')
    'json'
    >>> try:
    ...     sniff_model_bytes(bytes(512) + HDF5_SIGNATURE + bytes(100))
    ... except AmbiguousFormat as error:
    ...     print(error)
    it has an HDF5 user block (HDF5 signature at byte 512, not 0)
    """
    hdf5 = _hdf5_offsets(data)
    is_zip = _looks_like_zip(data)
    if hdf5 and is_zip:
        raise AmbiguousFormat("it is both an HDF5 file and a zip archive")
    if hdf5 and hdf5[0] != 0:
        raise AmbiguousFormat(f"it has an HDF5 user block (HDF5 signature at byte {hdf5[0]}, "
                              "not 0)")
    if len(hdf5) > 1:
        raise AmbiguousFormat(f"it holds more than one HDF5 signature (at bytes {hdf5[:4]})")
    if hdf5:
        return "h5"
    if is_zip or data.startswith(_ZIP_LOCAL):
        if is_zip:
            _check_zip_layout(data)
        return "keras"
    text = data[len(_UTF8_BOM):] if data.startswith(_UTF8_BOM) else data
    if text.lstrip()[:1] == b"{":
        return "json"
    return None
