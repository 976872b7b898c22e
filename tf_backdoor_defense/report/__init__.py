"""Tables, JSON and plots of sweep results and channel activations."""

from tf_backdoor_defense.report._analysis import (  # noqa: F401
    CATEGORIES,
    channel_activation_table,
    plot_channel_activations,
)
from tf_backdoor_defense.report._report import (  # noqa: F401
    REPORT_FILES,
    package_versions,
    plot_sweep,
    sweep_csv,
    sweep_summary,
    write_sweep_report,
)

__all__ = [
    "CATEGORIES",
    "channel_activation_table",
    "plot_channel_activations",
    "REPORT_FILES",
    "package_versions",
    "plot_sweep",
    "sweep_csv",
    "sweep_summary",
    "write_sweep_report",
]
