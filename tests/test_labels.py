"""The one label normaliser, shared by the data checks, the data files and the poisoning."""

import numpy as np
import pytest

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._labels import class_indices
from tf_backdoor_defense._validation import check_data
from tf_backdoor_defense.attacks import poison_dataset, single_pixel
from tf_backdoor_defense.io._data import DataFileError, load_data


@pytest.mark.parametrize("y, expected", [
    ([2, 0, 1], [2, 0, 1]),
    ([[2], [0], [1]], [2, 0, 1]),                                # a column of indices
    ([[0, 0, 1], [1, 0, 0], [0, 1, 0]], [2, 0, 1]),              # one-hot rows
    ([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.3, 0.6, 0.1]], [2, 0, 1]),  # probabilities
    ([2.0, 0.0, 1.0], [2, 0, 1]),                                # whole floats
    (np.array([], np.int64), []),
])
def test_label_forms_become_int64_class_indices(y, expected):
    labels = class_indices(y, "y")
    assert labels.dtype == np.int64 and labels.tolist() == expected


@pytest.mark.parametrize("y, error, match", [
    (np.zeros((2, 2, 2)), InputError, r"The labels of `data` must be 1-D .* Got shape \(2, 2, 2\)"),
    ([0.5, 1.0], InputError, "whole class indices"),
    ([0.0, np.nan], InputError, "NaN or Inf"),
    ([0, -1], InputError, r"negative label \(-1\)"),
    (np.array(["a", "b"]), InputTypeError, "must be numbers"),
])
def test_bad_labels_say_what_is_wrong(y, error, match):
    with pytest.raises(error, match=match):
        class_indices(y, "The labels of `data`")


def test_every_reader_of_labels_agrees(tmp_path):
    """check_data, load_data and poison_dataset read the same forms the same way."""
    x = np.zeros((3, 4, 4, 1), np.float32)
    one_hot = np.eye(3)[[2, 0, 1]]
    assert check_data((x, one_hot), "data").arrays()[1].tolist() == [2, 0, 1]
    np.savez(tmp_path / "set.npz", x=x, y=one_hot)
    assert load_data(tmp_path / "set.npz")[1].tolist() == [2, 0, 1]
    _, poisoned, _ = poison_dataset(x, one_hot, single_pixel(), rate=0.0)
    assert poisoned.argmax(axis=1).tolist() == [2, 0, 1]   # one-hot in, one-hot out
    # and refuse the same bad labels, each in its own words
    bad = np.array([0, -1, 1])
    with pytest.raises(ValueError, match="negative label"):
        check_data((x, bad), "data")
    np.savez(tmp_path / "bad.npz", x=x, y=bad)
    with pytest.raises(DataFileError, match="bad.npz.*negative label"):
        load_data(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="negative label"):
        poison_dataset(x, bad, single_pixel())


def test_huge_and_complex_labels_are_refused_clearly():
    import numpy as np
    import pytest

    from tf_backdoor_defense._errors import InputError, InputTypeError
    from tf_backdoor_defense._labels import class_indices

    with pytest.raises(InputError, match="out of range"):
        class_indices(np.array([0.0, 1e20]), "y")
    with pytest.raises(InputTypeError, match="real numbers"):
        class_indices(np.array([0, 1j]), "y")
