"""The pruning repairs under tf.distribute, against one device: ANP's masks and prune-search.

The slow tests learn the tiny conv model's ANP masks and run ``search_pruning_level`` on it
(the training of every level and its validation passes on the replicas) in fresh processes,
with the harness of
tests/scoring/test_distributed.py: MirroredStrategy on 2 logical CPUs (the model built in
``strategy.scope()``, no ``strategy=`` argument) and MultiWorkerMirroredStrategy with 2 workers
on 127.0.0.1 (``strategy=`` passed). The batches and noise draws are those of one device; the
gradients are summed over the replicas in another order, so the masks agree within float32
rounding, and the channels ANP prunes are the same. The search must try the same levels, with
the same validation accuracies, and choose the same one. The quick test checks that the default
strategy is the one-device code.
"""

import textwrap

import numpy as np
import pytest

from conftest import distributed_harness, tiny_conv_model
from tf_backdoor_defense._keras import tf
from tf_backdoor_defense.defenses._search import search_pruning_level
from tf_backdoor_defense.scoring._anp import anp_mask_scores, anp_masks

BATCH = 10  # 5 rows per replica
OPTIONS = dict(iterations=60, batch_size=BATCH, seed=3)


def _data():
    model = tiny_conv_model()
    x = np.random.default_rng(0).random((52, 8, 8, 1), dtype=np.float32)
    return x, np.argmax(model.predict(x, verbose=0), axis=1)


def _summary(model, **options):
    scores = anp_mask_scores(model, _data(), **OPTIONS, **options)
    pruned = anp_masks(scores, 0.2)
    x, y = _data()
    search = search_pruning_level(model, (x[:36], y[:36]), (x[36:], y[36:]), layers="conv_b",
                                  max_accuracy_drop=0.1, batch_size=BATCH,
                                  fine_tune=dict(epochs=2, batch_size=BATCH),
                                  distribute_strategy=options.get("strategy"))
    return {"scores": {name: values.tolist() for name, values in scores.items()},
            "pruned": {name: mask.tolist() for name, mask in pruned.items()},
            "search": search.table[["fraction", "validation_accuracy", "within_budget"]]
            .to_dict(orient="list"), "search_fraction": search.fraction}


WORKER = textwrap.dedent("""
    import json, sys
    sys.path[:0] = {paths!r}
    mode, out = sys.argv[1:3]
""") + distributed_harness().STRATEGY + textwrap.dedent("""
    from conftest import tiny_conv_model
    from test_pruning_repairs_distributed import _summary
    build = lambda: tiny_conv_model()  # noqa: E731
""") + distributed_harness().MODEL + textwrap.dedent("""
    result = _summary(model, **options)
    result["replicas"] = strategy.num_replicas_in_sync
    with open(out, "w") as handle:
        json.dump(result, handle)
""")


@pytest.fixture(scope="module")
def reference():
    return _summary(tiny_conv_model())


def _check(result, reference):
    assert result["replicas"] == 2
    assert result["pruned"] == reference["pruned"]
    assert result["search"] == reference["search"] and len(reference["search"]["fraction"]) > 2
    assert result["search_fraction"] == reference["search_fraction"] > 0
    assert any(0 in mask for mask in reference["pruned"].values())  # ANP prunes something
    for name, values in reference["scores"].items():
        np.testing.assert_allclose(result["scores"][name], values, rtol=0, atol=1e-6)


def _script(tmp_path):
    return distributed_harness().worker_script(WORKER, tmp_path, 'defenses')


@pytest.mark.slow
def test_mirrored_strategy_learns_the_masks_of_one_device(reference, tmp_path):
    _check(distributed_harness().run_mirrored(_script(tmp_path), [], tmp_path), reference)


@pytest.mark.slow
def test_two_workers_learn_the_masks_of_one_device_and_each_other(reference, tmp_path):
    results = distributed_harness().run_two_workers(_script(tmp_path), [], tmp_path)
    for result in results:
        _check(result, reference)
    assert results[0] == results[1]


def test_the_default_strategy_learns_as_one_device():
    model = tiny_conv_model()
    first = anp_mask_scores(model, _data(), **OPTIONS)
    second = anp_mask_scores(model, _data(), **OPTIONS, strategy=tf.distribute.get_strategy())
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
