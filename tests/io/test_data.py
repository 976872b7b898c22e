"""Reading the lab's data formats, clear errors for bad data, and atomic writes."""

import json

import h5py
import numpy as np
import pytest

from tf_backdoor_defense._errors import InputError, OutputExistsError
from tf_backdoor_defense.io._data import (
    DataFileError,
    atomic_path,
    atomic_write,
    check_outputs_free,
    load_data,
    write_json,
)


def _h5(path, data, label):
    with h5py.File(path, "w") as handle:
        handle["data"] = data
        handle["label"] = label
    return path


def test_lab_hdf5_channels_first_is_transposed_to_channels_last(tmp_path):
    x = np.arange(2 * 3 * 5 * 4, dtype=np.float64).reshape(2, 3, 5, 4)
    path = _h5(tmp_path / "valid.h5", x, np.array([1.0, 2.0]))
    got, y = load_data(path)
    assert got.shape == (2, 5, 4, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.transpose(x, (0, 2, 3, 1)))
    assert y.dtype == np.int64 and y.tolist() == [1, 2]


def test_channels_last_data_is_kept_and_input_shape_is_matched(tmp_path):
    x = np.random.default_rng(0).random((3, 5, 4, 3))
    path = _h5(tmp_path / "last.h5", x, [0, 1, 2])
    got, _ = load_data(path, input_shape=(5, 4, 3))
    np.testing.assert_allclose(got, x.astype(np.float32))
    # a 3-channel 3x3 image is ambiguous without the model; with it, the layout is exact
    square = np.random.default_rng(1).random((2, 3, 3, 3))
    path = _h5(tmp_path / "square.h5", square, [0, 1])
    got, _ = load_data(path, input_shape=(3, 3, 3))
    np.testing.assert_allclose(got, square.astype(np.float32))


def test_npz_with_x_y_and_scale_divides(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, x=np.full((4, 6), 255.0), y=np.array([[0, 1], [1, 0], [0, 1], [0, 1]]))
    x, y = load_data(path, scale=255)
    assert float(x.max()) == 1.0
    assert y.tolist() == [1, 0, 1, 1]  # one-hot rows become class indices


def test_image_folder_with_labels_in_file_names_and_subfolders(tmp_path):
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    Image.new("RGB", (4, 5), (10, 20, 30)).save(folder / "cl_0_label=43.png")
    Image.new("RGBA", (4, 5), (255, 0, 0, 128)).save(folder / "sun_0_label=0.png")
    x, y = load_data(folder)
    assert x.shape == (2, 5, 4, 3)
    assert sorted(y.tolist()) == [0, 43]
    x, y = load_data(folder / "cl_*.png")  # a glob pattern picks a subset
    assert y.tolist() == [43] and x[0, 0, 0].tolist() == [10.0, 20.0, 30.0]

    classes = tmp_path / "classes"
    for label in (2, 7):
        (classes / str(label)).mkdir(parents=True)
        Image.new("L", (3, 3), label).save(classes / str(label) / "img.png")
    x, y = load_data(classes, input_shape=(3, 3, 1))
    assert x.shape == (2, 3, 3, 1) and y.tolist() == [2, 7]


def test_image_without_a_label_is_an_error_naming_it(tmp_path):
    from PIL import Image

    Image.new("RGB", (2, 2)).save(tmp_path / "mystery.png")
    with pytest.raises(DataFileError, match="mystery.png"):
        load_data(tmp_path)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((3, 4)), [0, 1], "3 inputs but 2 labels"),
    (np.zeros((0, 4)), np.zeros(0), "empty"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), [0, 1], "NaN or Inf"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), [0, 1], "NaN or Inf"),
    (np.zeros((2, 4)), [0, -1], "negative label"),
    (np.zeros((2, 4)), [0.5, 1.0], "whole class indices"),
])
def test_bad_data_raises_an_error_naming_the_file(tmp_path, x, y, message):
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.asarray(y))
    with pytest.raises(DataFileError, match=message) as error:
        load_data(path)
    assert "bad.npz" in str(error.value)


def test_wrong_shape_for_the_model_names_file_and_shapes(tmp_path):
    path = _h5(tmp_path / "valid.h5", np.zeros((2, 3, 5, 4)), [0, 1])
    with pytest.raises(DataFileError, match=r"valid.h5.*\(3, 5, 4\).*\(8, 8, 1\)"):
        load_data(path, input_shape=(8, 8, 1))


def test_unreadable_or_foreign_files_give_clear_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataFileError, match="not a data file"):
        load_data(text)
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["pixels"] = np.zeros((2, 2))
    with pytest.raises(DataFileError, match="no input array"):
        load_data(tmp_path / "other.h5")
    good = _h5(tmp_path / "good.h5", np.zeros((50, 30)), np.zeros(50))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:1200])
    with pytest.raises(DataFileError, match="truncated.h5"):
        load_data(truncated)
    with pytest.raises(DataFileError, match="does not exist"):
        load_data(tmp_path / "missing.h5")


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "sweep.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as handle:
            handle.write("half a ta")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv"]
    with pytest.raises(OutputExistsError, match="overwrite=True") as error:
        with atomic_write(target, overwrite=False) as handle:
            handle.write("new")
    assert isinstance(error.value, FileExistsError) and error.value.paths == (str(target),)
    assert target.read_text() == "old\n"


def test_atomic_path_replaces_a_folder_in_one_step(tmp_path):
    target = tmp_path / "saved"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_path(target, directory=True) as temp:
        assert temp.is_dir() and temp.parent == tmp_path
        (temp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    with pytest.raises(RuntimeError):
        with atomic_path(target, directory=True) as temp:
            (temp / "partial.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_write_json_turns_nan_and_numpy_values_into_json(tmp_path):
    path = write_json(tmp_path / "summary.json",
                      {"asr": float("nan"), "n": np.int64(3), "v": np.array([0.5])})
    assert json.loads(path.read_text()) == {"asr": None, "n": 3, "v": [0.5]}


def test_check_outputs_free_lists_existing_outputs(tmp_path):
    (tmp_path / "a").write_text("")
    with pytest.raises(FileExistsError, match="a. Pass overwrite=True") as error:
        check_outputs_free([tmp_path / "a", tmp_path / "b"])
    assert isinstance(error.value, InputError) and error.value.paths == (str(tmp_path / "a"),)
    assert "--" not in str(error.value)  # the library names no command-line flag
    check_outputs_free([tmp_path / "a"], overwrite=True)
    check_outputs_free([tmp_path / "a"], force=True)  # the former name still works


def test_file_errors_are_input_errors(tmp_path):
    from tf_backdoor_defense.io._loading import ModelFileError, UnsafeModelError

    for kind in (DataFileError, ModelFileError, UnsafeModelError, OutputExistsError):
        assert issubclass(kind, InputError) and issubclass(kind, ValueError)
    with pytest.raises(InputError, match="scale"):
        load_data(_h5(tmp_path / "d.h5", np.zeros((2, 4)), np.array([0, 1])), scale=-1)
