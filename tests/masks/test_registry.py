"""The one layer-kind registry: every module reads its layer classes from it."""

import ast
import pathlib

import pytest

import tf_backdoor_defense
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.masks import _registry as registry
from tf_backdoor_defense.masks._registry import is_conv, is_prunable

L = keras.layers
PACKAGE = pathlib.Path(tf_backdoor_defense.__file__).parent


@pytest.mark.parametrize("layer, conv, prunable", [
    (L.Conv1D(2, 3), True, True),
    (L.Conv2D(2, 3), True, True),
    (L.Conv3D(2, 3), True, True),
    (L.Dense(2), False, True),
    (L.Conv2DTranspose(2, 3), False, False),   # a Conv2D subclass, but not prunable by row
    (L.Conv3DTranspose(2, 3), False, False),
    (L.SeparableConv2D(2, 3), False, False),
    (L.DepthwiseConv2D(3), False, False),
    (L.MaxPooling2D(), False, False),
])
def test_is_conv_and_is_prunable(layer, conv, prunable):
    assert is_conv(layer) is conv
    assert is_prunable(layer) is prunable


def test_groups_are_consistent():
    assert registry.PRUNABLE_LAYER_TYPES == registry.CONV_TYPES + (L.Dense,)
    assert set(registry.IDENTITY_AT_INFERENCE) <= set(registry.CHANNELWISE_TYPES)
    assert set(registry.POOLING_TYPES) <= set(registry.CHANNELWISE_TYPES)
    assert registry.ZERO_PRESERVING_ACTIVATIONS <= registry.ELEMENTWISE_ACTIVATIONS
    assert "softmax" not in registry.ELEMENTWISE_ACTIVATIONS
    # the activations this Keras knows that are listed as zero-preserving map 0 to 0
    known = 0
    for name in registry.ZERO_PRESERVING_ACTIVATIONS:
        try:
            activation = keras.activations.get(name)
        except ValueError:  # a name of another Keras version
            continue
        known += 1
        assert float(activation(tf.zeros([1, 1]))[0, 0]) == 0.0, name
    assert known >= 8


def _layer_class_tuples(path):
    """Tuples of two or more ``keras.layers.X`` / ``L.X`` classes written in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Tuple) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Attribute) and e.attr[:1].isupper()
                and isinstance(e.value, (ast.Attribute, ast.Name))
                and (getattr(e.value, "attr", None) == "layers"
                     or getattr(e.value, "id", None) in ("L", "_L"))
                for e in node.elts):
            found.append((path.relative_to(PACKAGE).as_posix(), node.lineno))
    return found


def test_layer_kind_tuples_are_defined_only_in_the_registry():
    copies = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name != "_registry.py"
              for hit in _layer_class_tuples(path)]
    assert copies == [], f"layer-class tuples outside masks/_registry.py: {copies}"
