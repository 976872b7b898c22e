"""Masks -> plain model (fold or shrink) -> SavedModel, .h5/.keras, TFLite."""

from tf_backdoor_defense.export._export import (  # noqa: F401
    ShrinkFallbackWarning,
    LayerExport,
    ExportReport,
    strip_masks,
    export_saved_model,
    export_keras,
    convert_to_tflite,
    count_params,
)

__all__ = [
    "ShrinkFallbackWarning",
    "LayerExport",
    "ExportReport",
    "strip_masks",
    "export_saved_model",
    "export_keras",
    "convert_to_tflite",
    "count_params",
]
