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


@pytest.mark.parametrize("labels, match", [
    (lambda y: np.eye(5)[y], "rows of 5 columns, but the model has 3 classes"),
    (lambda y: np.eye(3)[y][:, :2], "rows of 2 columns, but the model has 3 classes"),
    (lambda y: np.stack([y, np.ones_like(y)], 1), "rows of 2 columns"),
    (lambda y: np.zeros((len(y), 3)), "12 of 12 rows are not.*all-zero row"),
    (lambda y: np.eye(3)[y] * 2, "must be non-negative and sum to 1"),
])
def test_label_rows_that_argmax_would_misread_are_refused(labels, match):
    from tf_backdoor_defense._validation import check_data

    x, y = _data()
    with pytest.raises(InputError, match=match):
        check_data((x, labels(y)), model=tiny_conv_model())


def test_one_hot_and_probability_rows_are_read_by_argmax():
    from tf_backdoor_defense._validation import check_data

    x, y = _data()
    soft = np.full((len(y), 3), 0.1) + 0.7 * np.eye(3)[y]  # label smoothing: rows sum to 1
    for rows in (np.eye(3)[y], np.eye(3, dtype="float32")[y], soft):
        assert check_data((x, rows), model=tiny_conv_model()).y.tolist() == y.tolist()


@pytest.mark.parametrize("labels", [lambda y: np.eye(3, dtype="float32")[y],
                                    lambda y: y[:, None]])
def test_unbatched_dataset_with_one_hot_or_column_labels_is_read(labels):
    from tf_backdoor_defense import clean_accuracy

    model = tiny_conv_model()
    x, y = _data()
    expected = clean_accuracy(model, (x, y))
    dataset = tf.data.Dataset.from_tensor_slices((x, labels(y)))  # not batched
    assert clean_accuracy(model, dataset) == expected


def test_batched_dataset_of_the_wrong_rank_still_names_the_shape():
    from tf_backdoor_defense import clean_accuracy

    x, y = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x[..., 0], y)).batch(12)  # (12, 8, 8)
    with pytest.raises(InputError, match=r"inputs of shape \(8, 8\)"):
        clean_accuracy(tiny_conv_model(), dataset)


def _predicted(model, x):
    from tf_backdoor_defense.metrics import predict_labels

    return predict_labels(model, x)


def test_scan_warns_when_the_model_gets_most_labels_wrong():
    from tf_backdoor_defense import LowAccuracyWarning, scan_model

    model = tiny_conv_model()
    x, _ = _data(24)
    shifted = (_predicted(model, x) + 1) % 3  # labels in another class order: 0% right
    with pytest.warns(LowAccuracyWarning, match=r"only 0\.0% of the clean data right"):
        result = scan_model(model, (x, shifted), steps=2)
    assert "verdict says little" in result.warnings[0]


def _two_of_three_classes(n=24):
    x, y = _data(n)
    return x[y < 2], y[y < 2]


def test_scan_warns_when_the_data_lack_some_classes():
    from tf_backdoor_defense import MissingClassesWarning, scan_model

    with pytest.warns(MissingClassesWarning, match=r"no example of 1 of the model's 3 classes "
                                                   r"\(2\).*on those 2 classes only"):
        result = scan_model(tiny_conv_model(), _two_of_three_classes(), steps=2)
    assert any("no example of 1 of the model's 3 classes" in w for w in result.warnings)


def test_defend_warns_once_when_the_data_lack_some_classes():
    from tf_backdoor_defense import MissingClassesWarning, defend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = defend(tiny_conv_model(), _two_of_three_classes(), methods=["ft-cosine"],
                        epochs=1, scan_options={"steps": 2}, repair_if_clean=True)
    missing = [w for w in caught if issubclass(w.category, MissingClassesWarning)]
    assert len(missing) == 1 and "(2)" in str(missing[0].message)
    assert any(w.startswith("the clean data hold no example of 1") for w in result.warnings)


def test_data_files_refuse_label_rows_that_are_not_one_hot(tmp_path):
    """The one label reader: a file's 2-D label rows get the same check as check_data's."""
    from tf_backdoor_defense import load_data

    x, y = _data(6)
    rows = np.eye(3)[y]
    np.savez(tmp_path / "ok.npz", x=x, y=rows)
    np.testing.assert_array_equal(load_data(str(tmp_path / "ok.npz"))[1], y)
    rows[2] = 0.0
    np.savez(tmp_path / "zero.npz", x=x, y=rows)
    with pytest.raises(InputError, match=r"1 of 6 rows are not \(row 2"):
        load_data(str(tmp_path / "zero.npz"))
