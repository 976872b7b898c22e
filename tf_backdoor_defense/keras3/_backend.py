"""The one place that imports Keras 3 (``import keras``), and how to tell its models apart.

Keras 3 is imported only when a Keras 3 object is actually handled: importing
:mod:`tf_backdoor_defense` never imports it. Detection looks at the caller's
own ``keras`` module in ``sys.modules``, so a process that never imported Keras
3 pays nothing.
"""

import sys

__all__ = ["keras3", "is_keras3_loaded", "is_keras3_object", "is_keras3_model"]


def keras3():
    """The Keras 3 module (``import keras``), imported on first use."""
    import keras  # noqa: PLC0415 - Keras 3 is optional for tf-keras users

    if not str(getattr(keras, "__version__", "")).startswith("3"):  # pragma: no cover
        raise ImportError(f"`import keras` gave Keras {keras.__version__}; Keras 3 is needed.")
    return keras


def is_keras3_loaded():
    """Whether the process has imported Keras 3 as ``keras``."""
    module = sys.modules.get("keras")
    return module is not None and str(getattr(module, "__version__", "")).startswith("3")


def is_keras3_object(obj, kind="Model"):
    """Whether ``obj`` is an instance of Keras 3's ``keras.<kind>``.

    ``kind`` is ``"Model"``, a layer class name (``"Dense"``, ``"Layer"``) or a
    dotted path from the ``keras`` module (``"optimizers.Optimizer"``).

    >>> is_keras3_object(object(), "optimizers.Optimizer")
    False
    """
    if not is_keras3_loaded():
        return False
    module = sys.modules["keras"]
    if kind == "Model":
        return isinstance(obj, module.Model)
    if "." not in kind:
        return isinstance(obj, getattr(module.layers, kind))
    cls = module
    for part in kind.split("."):
        cls = getattr(cls, part)
    return isinstance(obj, cls)


def is_keras3_model(obj):
    """Whether ``obj`` is a Keras 3 model (``keras.Model`` of Keras 3.x).

    >>> is_keras3_model(object())
    False
    """
    return is_keras3_object(obj, "Model")
