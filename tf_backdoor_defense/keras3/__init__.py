"""Keras 3 support: conversion, the Keras 3 ``PruneByActivation`` and ``FinePruning``.

The package computes with tf-keras (Keras 2). Public functions accept Keras 3
Sequential and Functional models of the built-in layers and give Keras 3
models back; this subpackage holds the conversion and the two objects a Keras
3 training script uses directly. Importing it imports Keras 3 (``import keras``).
tfmot composition (``prune_low_magnitude`` around ``PruneByActivation``) stays
tf-keras only, because tfmot itself is.
"""

import importlib

_WHERE = {
    "is_keras3_model": "_backend",
    "SUPPORTED_LAYERS": "_convert",
    "Keras3ConversionError": "_convert",
    "scan_keras3_config": "_convert",
    "to_keras3": "_convert",
    "to_tf_keras": "_convert",
    "with_caller_keras": "_caller",
    "PruneByActivation": "_wrapper",
    "FinePruning": "_callbacks",
}

__all__ = [
    "FinePruning",
    "Keras3ConversionError",
    "PruneByActivation",
    "SUPPORTED_LAYERS",
    "is_keras3_model",
    "scan_keras3_config",
    "to_keras3",
    "to_tf_keras",
    "with_caller_keras",
]


def __getattr__(name):
    # Resolved on first use: the package's own modules import the private ones, and
    # importing this subpackage must not import Keras 3 or the training code.
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
