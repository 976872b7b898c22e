"""Keras 3 model files (``.keras``, and ``.h5`` written by Keras 3): scanned, then loaded by Keras 3.

:func:`tf_backdoor_defense.io.load_model` reads a file's configuration first;
when the file was written by Keras 3 it hands it here. The configuration is
checked with :func:`~tf_backdoor_defense.keras3.scan_keras3_config` before
Keras 3 builds anything (Keras 3's own ``safe_mode`` covers ``Lambda``
only), so only built-in layers are ever deserialized. The model comes back
as a Keras 3 model, in the Keras that wrote it.
"""

import pathlib
import tempfile

from tf_backdoor_defense.io._formats import escape
from tf_backdoor_defense.keras3._convert import Keras3ConversionError, scan_keras3_config

__all__ = ["is_keras3_file", "load_keras3_file"]


def is_keras3_file(info):
    """Whether ``info`` (from ``read_model_config``) describes a file written by Keras 3."""
    version = str(info.get("keras_version") or "")
    return info.get("format") in ("keras", "h5") and version.startswith("3")


def load_keras3_file(path, info, *, data=None, trust_model_code=False, unsafe_error=None):
    """Load a Keras 3 model file after checking its configuration.

    Parameters
    ----------
    path : pathlib.Path
        The ``.keras`` or ``.h5`` file.
    info : dict
        Its ``read_model_config`` result.
    data : bytes, default=None
        The file's bytes as read (and scanned) by the caller. Keras then
        loads a private copy of exactly these bytes, never ``path`` again: a
        file swapped after the scan is not what gets deserialized.
    trust_model_code : bool, default=False
        Skip the scan (the file's author is trusted).
    unsafe_error : callable, default=None
        Builds the error raised for a refused configuration from
        ``(message, layer, class_name)``; default :class:`Keras3ConversionError`.

    Returns
    -------
    keras.Model
        A Keras 3 model, not compiled.
    """
    from tf_backdoor_defense.keras3._backend import keras3  # noqa: PLC0415
    from tf_backdoor_defense.keras3._wrapper import PruneByActivation  # noqa: PLC0415

    if not trust_model_code:
        try:
            scan_keras3_config(info["config"])
        except Keras3ConversionError as error:
            message = (f"'{escape(path)}' (written by Keras "
                       f"{escape(info.get('keras_version'))}): {error}")
            if error.layer is None and error.class_name is None:  # malformed, not unsafe
                from tf_backdoor_defense.io._loading import ModelFileError  # noqa: PLC0415
                raise ModelFileError(message, path=path) from None
            if unsafe_error is None:
                raise
            raise unsafe_error(message, error.layer, error.class_name) from None
    keras = keras3()
    objects = {"PruneByActivation": PruneByActivation,
               "tf_backdoor_defense>PruneByActivation": PruneByActivation}
    if data is None:
        return keras.saving.load_model(str(path), compile=False, custom_objects=objects,
                                       safe_mode=not trust_model_code)
    with tempfile.TemporaryDirectory(prefix="tf-backdoor-defense-load-") as folder:
        copy = pathlib.Path(folder) / ("model" + pathlib.Path(path).suffix.lower())
        copy.write_bytes(data)
        return keras.saving.load_model(str(copy), compile=False, custom_objects=objects,
                                       safe_mode=not trust_model_code)
