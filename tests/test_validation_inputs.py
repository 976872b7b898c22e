"""Input checks at the public boundary: dict inputs, label widths, unbatched datasets, tiny
defender data, data files with ambiguous keys, and the warnings about the defender's data."""

import warnings

import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import tf


def _data(n=12, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1)).astype("float32"), np.arange(n) % classes


@pytest.mark.parametrize("batched", [False, True])
def test_defend_with_one_example_is_an_input_error(batched):
    from tf_backdoor_defense import defend

    x, y = _data(1)
    data = (x, y) if not batched else tf.data.Dataset.from_tensor_slices((x, y)).batch(1)
    with pytest.raises(InputError, match="`train_data` holds 1 example.*at least 2"):
        defend(tiny_conv_model(), data, methods=["ft-cosine"], epochs=1, scan=False)


def test_npz_with_both_x_y_and_data_label_is_refused(tmp_path):
    from tf_backdoor_defense import load_data
    from tf_backdoor_defense.io._data import DataFileError

    x, y = _data(6)
    path = tmp_path / "both.npz"
    np.savez(path, x=x, y=y, data=x[:2], label=y[:2])
    with pytest.raises(DataFileError, match=r"several input arrays \(data, x\)"):
        load_data(str(path))
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    assert load_data(str(tmp_path / "xy.npz"))[0].shape == x.shape


def test_dict_inputs_are_refused_with_advice():
    from tf_backdoor_defense import clean_accuracy

    model = tiny_conv_model()
    x, y = _data()
    name = model.input_names[0]
    advice = rf"dict inputs are not supported.*\(x\['{name}'\], y\)"
    with pytest.raises(InputTypeError, match=advice):
        clean_accuracy(model, ({name: x}, y))
    dataset = tf.data.Dataset.from_tensor_slices(({name: x}, y)).batch(4)
    with pytest.raises(InputTypeError, match=r"dict inputs are not supported.*dataset\.map"):
        clean_accuracy(model, dataset)
