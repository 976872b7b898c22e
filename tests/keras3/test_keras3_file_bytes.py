"""A Keras 3 file is loaded from the bytes that were scanned, never from its path again."""

import pytest

from tf_backdoor_defense.io import _loading


def _keras3():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    return keras3


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_the_scanned_bytes_are_what_keras_loads(tmp_path, monkeypatch, suffix):
    keras3 = _keras3()
    scanned, swapped = tmp_path / f"scanned{suffix}", tmp_path / f"swapped{suffix}"
    for path, units in ((scanned, 2), (swapped, 3)):
        keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(units, name="fc")]).save(path)
    read = _loading._read
    # the file at `swapped` changes between the scan and the load: the loader must not notice
    monkeypatch.setattr(_loading, "_read", lambda path: read(scanned))
    model = _loading.load_model(swapped)
    assert isinstance(model, keras3.Model) and model.output_shape == (None, 2)


def test_names_in_refusals_are_escaped(tmp_path):
    keras3 = _keras3()
    path = tmp_path / "evil\x1b[2K.keras"
    inputs = keras3.Input((4,))
    keras3.Model(inputs, keras3.layers.Lambda(lambda t: t * 2)(inputs)).save(path)
    with pytest.raises(_loading.UnsafeModelError) as caught:
        _loading.load_model(path)
    assert "\x1b" not in str(caught.value) and "\\x1b" in str(caught.value)
