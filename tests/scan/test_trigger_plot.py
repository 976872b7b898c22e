"""plot_triggers: the grid of reversed triggers, suspected target first, saved atomically."""

import numpy as np
import pytest

from tf_backdoor_defense.report._triggers import plot_triggers
from tf_backdoor_defense.scan import scan_model


@pytest.fixture(scope="module")
def result(planted):
    return scan_model(planted["all-to-one"], planted["data"], steps=150, init_cost=1e-2, seed=1)


def _labels(figure):
    return [text.get_text() for ax in figure.axes for text in ax.texts]


def test_suspected_target_comes_first(result):
    figure = plot_triggers(result, top=3)
    labels = _labels(figure)
    assert len(labels) == 4  # three classes and the untargeted trigger
    assert labels[0].startswith("class 2 (suspected)")
    assert "L1 " in labels[0] and "index " in labels[0] and "success " in labels[0]
    assert labels[-1].startswith("untargeted")
    assert len(figure.axes) == 4 * 4
    assert "backdoor found" in figure._suptitle.get_text()


def test_panels_show_mask_pattern_and_product(result):
    figure = plot_triggers(result, top=1, untargeted=False)
    images = [ax.images[0].get_array() for ax in figure.axes if ax.images]
    mask, pattern = result.trigger(2)
    np.testing.assert_allclose(images[0], mask[..., 0], rtol=1e-6)
    np.testing.assert_allclose(images[1], pattern[..., 0], rtol=1e-6)
    np.testing.assert_allclose(images[2], (mask * pattern)[..., 0], rtol=1e-5)
    assert [ax.get_title() for ax in figure.axes if ax.images] == ["mask", "pattern",
                                                                  "mask x pattern"]


def test_saved_atomically_as_png(result, tmp_path):
    path = tmp_path / "triggers.png"
    plot_triggers(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["triggers.png"]  # no temporary file left


def test_colour_patterns_are_scaled_to_the_value_range(planted):
    x, y = planted["data"]
    colour = np.repeat(x, 3, axis=-1) * 255.0
    from tf_backdoor_defense._keras import keras

    inputs = keras.Input((8, 8, 3))
    gray = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones")(inputs)
    scaled = keras.layers.Rescaling(1.0 / 765.0)(gray)
    model = keras.Model(inputs, planted["clean"](scaled))
    figure = plot_triggers(scan_model(model, (colour, y), steps=5), top=1, untargeted=False)
    image = figure.axes[2].images[0].get_array()
    assert image.shape == (8, 8, 3) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0


@pytest.mark.parametrize("kwargs, error", [
    (dict(top=-1), ValueError), (dict(top=1.5), ValueError),
    (dict(top=0, untargeted=False), ValueError)])
def test_bad_arguments(result, kwargs, error):
    with pytest.raises(error):
        plot_triggers(result, **kwargs)


def test_needs_a_scan_result():
    with pytest.raises(TypeError, match="ScanResult"):
        plot_triggers({"verdict": "no"})


def test_untargeted_row_first_when_all_to_all_is_suspected(planted):
    result = scan_model(planted["all-to-all"], planted["data"], steps=150, init_cost=1e-2, seed=1)
    assert result.all_to_all_suspected
    labels = _labels(plot_triggers(result, top=2))
    assert labels[0].startswith("untargeted (all-to-all suspected)") and len(labels) == 3
