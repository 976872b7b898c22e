"""The check_* helpers raise the package's input errors, naming the argument."""

import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._validation import (check_data, check_fraction, check_model, check_number,
                                             check_target, check_thresholds)


@pytest.mark.parametrize("call, error, match", [
    (lambda: check_number(0, "epochs", integer=True, positive=True), InputError, "'epochs'.*> 0"),
    (lambda: check_number(1.5, "epochs", integer=True), InputTypeError, "'epochs'.*an int"),
    (lambda: check_fraction(1.5, "max_accuracy_drop"), InputError, "max_accuracy_drop"),
    (lambda: check_fraction("0.1", "max_accuracy_drop"), InputTypeError, "max_accuracy_drop"),
    (lambda: check_thresholds([0.1, 0.1]), InputError, "duplicates"),
    (lambda: check_target(7, 3), InputError, r"'target'.*\[0, 2\]"),
    (lambda: check_model("model.h5"), InputTypeError, "model"),
    (lambda: check_data((np.zeros((2, 8, 8, 1)), [0]), "clean", model=tiny_conv_model()),
     InputError, "`clean` has 2 inputs but 1 labels"),
    (lambda: check_data([np.zeros((2, 9, 9, 1)), [0, 1]], "clean", model=tiny_conv_model()),
     InputError, r"`clean` has inputs of shape \(9, 9, 1\)"),
    (lambda: check_data("x.npz", "clean"), InputTypeError, "`clean` must be an"),
])
def test_bad_input_raises_an_input_error_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
    assert issubclass(InputError, ValueError) and issubclass(InputTypeError, TypeError)


def test_all_finite_checks_every_slice():
    import numpy as np
    from tf_backdoor_defense._validation import all_finite

    x = np.zeros((100, 4, 4), np.float32)
    assert all_finite(x, chunk_bytes=64)
    x[99, 3, 3] = np.nan  # in the last slice
    assert not all_finite(x, chunk_bytes=64)
    x[99, 3, 3] = -np.inf
    assert not all_finite(x, chunk_bytes=1)
    assert all_finite(np.zeros((0, 3))) and not all_finite(np.array(np.nan))
