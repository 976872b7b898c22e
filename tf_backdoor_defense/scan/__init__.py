"""Find a backdoor without its trigger: reverse-engineered triggers and their anomaly tests."""

from tf_backdoor_defense.scan._reverse import infer_value_range, stamp  # noqa: F401
from tf_backdoor_defense.scan._scan import ScanResult, scan_model  # noqa: F401
from tf_backdoor_defense.scan._statistics import MAD_CONSISTENCY, anomaly_index  # noqa: F401

__all__ = [
    "scan_model",
    "ScanResult",
    "anomaly_index",
    "MAD_CONSISTENCY",
    "infer_value_range",
    "stamp",
]
