"""Bytes <-> objects: data files, atomic writes, and the safe model loader."""

from tf_backdoor_defense._errors import OutputExistsError  # noqa: F401
from tf_backdoor_defense.io._data import (  # noqa: F401
    DataFileError,
    load_data,
    match_input_shape,
    atomic_write,
    atomic_path,
    write_text,
    write_json,
    to_json,
    check_outputs_free,
)
from tf_backdoor_defense.io._loading import (  # noqa: F401
    ModelFileError,
    UnsafeModelError,
    load_model,
    read_model_config,
    scan_model_config,
)

__all__ = [
    "OutputExistsError",
    "DataFileError",
    "load_data",
    "match_input_shape",
    "atomic_write",
    "atomic_path",
    "write_text",
    "write_json",
    "to_json",
    "check_outputs_free",
    "ModelFileError",
    "UnsafeModelError",
    "load_model",
    "read_model_config",
    "scan_model_config",
]
