"""Property-based tests: truncated, bit-flipped and random bytes fed to every file reader.

Whatever the bytes, a reader raises a clean input error (never a traceback
of another kind, never a hang) and the command line prints one line and
exits 2.
"""

import contextlib
import io

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import tiny_conv_model  # noqa: E402
from tf_backdoor_defense._errors import InputError  # noqa: E402
from tf_backdoor_defense.io._data import load_data  # noqa: E402
from tf_backdoor_defense.io._loading import load_model  # noqa: E402

_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
_SEEDS = {}


def _seed_files(folder):
    """Valid files of every kind, made once per session (the bytes the mutations start from)."""
    if not _SEEDS:
        model = tiny_conv_model(channels=2)
        model.save(folder / "m.h5")
        model.save(folder / "m.keras")
        import h5py

        with h5py.File(folder / "d.h5", "w") as handle:
            handle["data"] = np.zeros((2, 1, 4, 4), np.float32)
            handle["label"] = np.array([0, 1])
        np.savez(folder / "d.npz", x=np.zeros((2, 4, 4, 1)), y=[0, 1])
        from PIL import Image

        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "img_label=1.png")
        for name in ("m.h5", "m.keras", "d.h5", "d.npz", "img_label=1.png"):
            _SEEDS[name] = (folder / name).read_bytes()
    return _SEEDS


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return _seed_files(tmp_path_factory.mktemp("seeds"))


def _mutations(name):
    """Truncations, bit flips and random bytes derived from the seed file ``name``."""
    truncate = st.tuples(st.just("truncate"), st.floats(0, 1))
    flips = st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)),
                                                 min_size=1, max_size=8))
    random = st.tuples(st.just("random"), st.binary(max_size=600))
    return st.one_of(truncate, flips, random)


def _apply(data, mutation):
    kind, arg = mutation
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    if kind == "random":
        return arg
    out = bytearray(data)
    for where, bit in arg:
        out[min(int(where * len(out)), len(out) - 1)] ^= 1 << bit
    return bytes(out)


def _outcome(call):
    """``"ok"`` or ``"input error"``; anything else fails the test with its type."""
    try:
        call()
    except InputError as error:
        message = str(error)
        assert message and "\n" not in message and "\x1b" not in message
        return "input error"
    return "ok"


@pytest.mark.parametrize("name", ["m.h5", "m.keras"])
def test_mutated_model_files_give_a_clean_error_or_a_model(seeds, tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("models")

    @_SETTINGS
    @given(mutation=_mutations(name))
    def check(mutation):
        path = folder / name
        path.write_bytes(_apply(seeds[name], mutation))
        _outcome(lambda: load_model(path))

    check()


@pytest.mark.parametrize("name", ["d.h5", "d.npz", "img_label=1.png"])
def test_mutated_data_files_give_a_clean_error_or_data(seeds, tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("data")

    @_SETTINGS
    @given(mutation=_mutations(name))
    def check(mutation):
        path = folder / name
        path.write_bytes(_apply(seeds[name], mutation))
        _outcome(lambda: load_data(path if name.endswith("z") or name.endswith("5") else folder))

    check()


def test_cli_inspect_on_mutated_models_prints_one_line_and_exits_2(seeds, tmp_path_factory):
    from tf_backdoor_defense.cli._main import main

    folder = tmp_path_factory.mktemp("cli")

    @settings(max_examples=6, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutation=_mutations("m.h5"), name=st.sampled_from(["m.h5", "m.keras"]))
    def check(mutation, name):
        path = folder / name
        path.write_bytes(_apply(seeds[name], mutation))
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["inspect", str(path)])
        assert code in (0, 2), err.getvalue()
        if code == 2:
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in lines[0]

    check()


def test_empty_data_file_is_called_empty(tmp_path):
    (tmp_path / "d.h5").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        load_data(tmp_path / "d.h5")


def test_decompression_bomb_image_is_an_input_error(tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "bomb_label=0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels > 2 * 100: a "bomb"
    with pytest.raises(InputError, match="too large to decode safely"):
        load_data(tmp_path)


def test_huge_and_complex_labels_and_complex_inputs_are_refused(tmp_path):
    np.savez(tmp_path / "big.npz", x=np.zeros((2, 3)), y=[1e20, 0.0])
    with pytest.raises(InputError, match="out of range"):
        load_data(tmp_path / "big.npz")
    np.savez(tmp_path / "cy.npz", x=np.zeros((2, 3)), y=np.array([1, 0], complex))
    with pytest.raises(InputError, match="complex"):
        load_data(tmp_path / "cy.npz")
    np.savez(tmp_path / "cx.npz", x=np.zeros((2, 3), complex), y=[1, 0])
    with pytest.raises(InputError, match="complex"):
        load_data(tmp_path / "cx.npz")


def test_a_repeating_dataset_is_refused_instead_of_hanging():
    from tf_backdoor_defense._keras import tf
    from tf_backdoor_defense._validation import check_data

    dataset = tf.data.Dataset.from_tensor_slices((np.zeros((2, 3)), [0, 1])).repeat()
    with pytest.raises(InputError, match="repeats forever"):
        check_data(dataset, "validation_data")
