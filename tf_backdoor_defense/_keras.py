"""The one place that decides which Keras the package uses.

tensorflow-model-optimization (tfmot) only works with Keras 2, which ships as
the ``tf_keras`` package. ``TF_USE_LEGACY_KERAS=1`` must be set before
TensorFlow is first imported so that ``tf.keras`` and tfmot agree with us.
Every other module imports ``keras``, ``tf`` and ``tfmot`` from here.
Nothing else about the process is changed: TensorFlow's log level, warning
filters and stderr are left to the application (the command line sets its own).
"""

import os
import sys
import warnings

_TF_ALREADY_IMPORTED = "tensorflow" in sys.modules
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if _TF_ALREADY_IMPORTED and os.environ.get("TF_USE_LEGACY_KERAS") != "1":  # pragma: no cover
    warnings.warn(
        "TensorFlow was imported before tf_backdoor_defense without "
        "TF_USE_LEGACY_KERAS=1; `tf.keras` is Keras 3 in this process. "
        "tf_backdoor_defense uses tf-keras (Keras 2): build and load your "
        "models with `import tf_keras as keras`.",
        stacklevel=2,
    )

import tensorflow_model_optimization as tfmot  # noqa: E402

from tf_backdoor_defense._errors import InputTypeError  # noqa: E402

__all__ = ["tf", "keras", "tfmot", "check_keras2_model"]


def check_keras2_model(model, name="model"):
    """Return ``model`` if it is a tf-keras (Keras 2) model, else raise.

    A Keras 3 model fails inside tfmot with an obscure error, so it is caught
    here with a message that says how to load the model instead.
    """
    if isinstance(model, keras.Model):
        return model
    module = type(model).__module__ or ""
    if module.startswith("keras") or module.startswith("tensorflow.keras"):
        raise InputTypeError(
            f"The `{name}` argument is a Keras 3 model ({type(model).__module__}."
            f"{type(model).__name__}), but tf_backdoor_defense and "
            "tensorflow-model-optimization need a tf-keras (Keras 2) model. "
            "The public functions convert Keras 3 models themselves; here, convert it with "
            "`tf_backdoor_defense.keras3.to_tf_keras(model)`, or load its file with "
            "`tf_backdoor_defense.load_model(path)` (which checks it before building it)."
        )
    raise InputTypeError(
        f"Expected `{name}` to be a tf_keras.Model. Received: {name}={model!r} "
        f"of type {type(model).__name__}."
    )
