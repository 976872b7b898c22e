"""Fixtures of the scan tests: the planted-backdoor classifiers of :mod:`planted`."""

import pytest

from planted import planted_data, planted_model  # tests/scan/planted.py


@pytest.fixture(scope="module")
def planted():
    """``{"clean": model, "all-to-one": model (target 2), "all-to-all": model, "data": (x, y)}``."""
    return {"clean": planted_model("clean"), "all-to-one": planted_model("all-to-one"),
            "all-to-all": planted_model("all-to-all"), "data": planted_data()}
