"""The sweep report: sweep.csv, summary.json, sweep.png, activations.png (report._report)."""

import inspect
import json

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense import prune_to_threshold, wrap_layers
from tf_backdoor_defense.metrics import predict_labels
from tf_backdoor_defense.report import _analysis, _report
from tf_backdoor_defense.report._analysis import activation_frame, plot_channel_activations
from tf_backdoor_defense.report._report import (
    REPORT_FILES,
    plot_sweep,
    sweep_csv,
    sweep_summary,
    write_sweep_report,
)


def _data(seed, n=48):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, n)


@pytest.fixture(scope="module")
def sweeps():
    """One-layer and two-layer sweeps of the tiny model, with poisoned data."""
    model = tiny_conv_model()
    x, y = _data(1)
    xp = _data(2, 30)[0]
    poisoned = (xp, np.zeros(30, int))
    one = prune_to_threshold(model, (x, y), layers="conv_b", poisoned_validation_data=poisoned,
                             max_accuracy_drop=[0.05, 0.5])
    two = prune_to_threshold(model, (x, y), layers=["conv_b", "fc"], poisoned_validation_data=poisoned,
                             max_accuracy_drop=[0.05, 0.5], steps=4)
    return one, two


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_sweep_plot_labels_its_axis_and_every_line(sweeps):
    one, _ = sweeps
    ax = plot_sweep(one).axes[0]
    assert ax.get_ylabel() == "clean accuracy / attack success rate"
    texts = _legend_texts(ax)
    baseline = one.baseline_accuracy
    for threshold in (0.05, 0.5):
        assert f"max drop {threshold * 100:g}%: accuracy floor {baseline - threshold:.3f}" in texts
        level = one.levels[threshold]
        assert any(t.startswith(f"max drop {threshold * 100:g}%: level {level} ") for t in texts)
    assert "attack success rate (poisoned validation data)" in texts


def test_thresholds_choosing_the_same_level_both_stay_visible(tiny_model, tiny_data):
    result = prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=[0.0, 0.001, 1.0])
    assert result.levels[0.0] == result.levels[0.001]
    ax = plot_sweep(result).axes[0]
    x = result.history["fraction_pruned"].iloc[result.levels[0.0]]
    shared = [line for line in ax.get_lines()
              if len(line.get_xdata()) and set(line.get_xdata()) == {x}]
    assert len(shared) == 2
    offsets = {line._unscaled_dash_pattern[0] for line in shared}
    assert len(offsets) == 2  # alternating dashes, not one line over the other
    assert len({line.get_color() for line in shared}) == 2


def test_accuracy_and_asr_both_at_one_stay_visible(tiny_model, tiny_data):
    x = tiny_data[0]
    y = predict_labels(tiny_model, x)
    result = prune_to_threshold(tiny_model, (x, y), poisoned_validation_data=(x, y))
    assert result.history["clean_accuracy"].iloc[0] == result.history["attack_success_rate"].iloc[0] == 1.0
    lines = {line.get_label(): line for line in plot_sweep(result).axes[0].get_lines()}
    accuracy = lines["clean accuracy (validation data)"]
    asr = lines["attack success rate (poisoned validation data)"]
    assert accuracy.get_linestyle() == "-" and asr.get_linestyle() == "--"
    assert asr.get_zorder() > accuracy.get_zorder()
    assert accuracy.get_linewidth() > asr.get_linewidth()  # the wider line shows around the dashes


def test_without_poisoned_data_asr_reads_n_a_everywhere(tiny_model, tiny_data, tmp_path):
    result = prune_to_threshold(tiny_model, tiny_data)
    assert "attack success rate: n/a (no poisoned data)" in _legend_texts(plot_sweep(result).axes[0])
    summary = sweep_summary(result)
    assert summary["before"]["attack_success_rate"] is None
    assert all(entry["attack_success_rate"] is None for entry in summary["thresholds"])
    write_sweep_report(result, tmp_path)
    history = pd.read_csv(tmp_path / "sweep.csv")
    assert history["attack_success_rate"].isna().all()
    assert ",," in (tmp_path / "sweep.csv").read_text()  # an empty field, not "nan"


def test_sweep_csv_has_no_float_noise():
    class Result:
        history = pd.DataFrame({"accuracy_drop": [0.958 - 0.933], "utility": [0.1 + 0.2],
                                "fraction_pruned": [1 / 3]})

    assert repr(0.958 - 0.933) != "0.025"  # the noise a subtraction leaves
    assert sweep_csv(Result()).splitlines()[1] == "0.025,0.3,0.333333"


def test_the_sweep_computes_accuracy_drops_without_float_noise(sweeps):
    one, _ = sweeps
    correct = np.round(one.history["clean_accuracy"].to_numpy() * 48).astype(int)
    np.testing.assert_array_equal(one.history["accuracy_drop"], (correct[0] - correct) / 48)


@pytest.mark.parametrize("which", [0, 1])
def test_report_files_are_keyed_by_layer_for_one_layer_and_several(sweeps, tmp_path, which):
    result = sweeps[which]
    means = {name: np.linspace(0, 1, result.channels[name]) for name in result.layers}
    written = write_sweep_report(result, tmp_path, poisoned_means=means)
    assert sorted(written) == sorted(REPORT_FILES)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layers"] == list(result.layers)
    assert summary["channels"] == result.channels
    assert set(summary["rankings"]) == set(result.layers)
    for entry in summary["thresholds"]:
        assert set(entry["pruned_channels"]) == set(result.layers)
        assert sum(len(v) for v in entry["pruned_channels"].values()) == entry["channels_pruned"]
        row = result.history.iloc[entry["level"]]
        assert entry["channels_pruned"] == row["channels_pruned"]
    history = pd.read_csv(tmp_path / "sweep.csv")
    assert list(history.columns[:2]) == ["channels_pruned", "fraction_pruned"]
    assert [f"pruned_{name}" for name in result.layers] == list(history.columns[2:2 + len(result.layers)])
    from PIL import Image

    with Image.open(tmp_path / "activations.png") as image:
        assert image.size[0] <= 1200 and image.size[1] >= 300 * len(result.layers)


def test_report_refuses_poisoned_means_that_do_not_match_the_layers(sweeps, tmp_path):
    one, two = sweeps
    with pytest.raises(TypeError, match="poisoned_means"):
        write_sweep_report(one, tmp_path, poisoned_means=np.zeros(6))
    with pytest.raises(ValueError, match="poisoned_means"):
        write_sweep_report(two, tmp_path, poisoned_means={"conv_b": np.zeros(6)})
    assert list(tmp_path.iterdir()) == []


def test_a_prepruned_layer_reports_its_channel_in_every_file(tmp_path):
    model = wrap_layers(tiny_conv_model(), "conv_b", masks={"conv_b": [0, 1, 1, 1, 1, 1]})
    result = prune_to_threshold(model, _data(3), max_accuracy_drop=0.0)
    summary = sweep_summary(result)
    assert summary["thresholds"][0]["pruned_channels"]["conv_b"][0] == 0
    assert summary["thresholds"][0]["channels_pruned"] >= 1


@pytest.mark.parametrize("channels, stride", [(60, 1), (80, 1), (160, 2)])
def test_activation_panels_stay_readable_at_any_width(channels, stride):
    rng = np.random.default_rng(channels)
    table = activation_frame(rng.random(channels), rng.random(channels))
    figure = plot_channel_activations(table)
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == len(range(0, channels, stride))
    order = table.sort_values("rank")["channel"].tolist()
    assert labels == [str(c) for c in order[::stride]]
    assert figure.get_size_inches()[0] == pytest.approx(9.6)  # not a strip as wide as the layer
    assert ("every 2nd id" in ax.get_xlabel()) == (stride == 2)


def test_panels_of_layers_of_different_widths_share_the_x_axis_semantics():
    rng = np.random.default_rng(0)
    table = pd.concat([activation_frame(rng.random(6), rng.random(6)).assign(layer="a"),
                       activation_frame(rng.random(40), None).assign(layer="b")])
    figure = plot_channel_activations(table)
    data_axes = [ax for ax in figure.axes if ax.get_ylabel() == "mean activation"]
    assert len(data_axes) == 2
    for ax in data_axes:
        assert ax.get_xlim() == (0.0, 1.0)
        assert ax.get_xlabel().startswith("channel id, in pruning order")
    # channel i of a layer of C channels sits at (i + 0.5) / C in every panel
    assert data_axes[0].get_xticks()[0] == pytest.approx(0.5 / 6)
    assert data_axes[1].get_xticks()[-1] == pytest.approx(39.5 / 40)
    assert "no poisoned inputs measured" in data_axes[1].get_title()
    assert "6 channels" in data_axes[0].get_title()


def test_the_library_names_no_command_line_flags():
    for module in (_report, _analysis):
        source = inspect.getsource(module)
        assert "--no-plots" not in source and "[plot]" not in source
