"""The one node-by-node replay of a Sequential or Functional model's graph.

A model's graph is a list of *nodes*: calls of a layer on Keras tensors.
:func:`replay_nodes` walks such a list in execution order and, for each node,
feeds it the values computed so far for the tensors it read, and records the
values it returns for the tensors it wrote. What a node computes is up to the
caller:

- by default the node's own layer runs in inference mode, so replaying a
  model's nodes on tensors (eagerly or inside ``tf.function``) computes what
  the model computes, from any point of the graph (the incremental sweep
  runs only the part after the pruned layers this way);
- with ``call=`` the caller decides, e.g. calls a rewritten copy of the layer
  on new symbolic tensors, which rebuilds the graph with other layers
  (export, the repaired network).
"""

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import check_keras2_model, tf

__all__ = ["check_graph_model", "topological_nodes", "downstream_nodes", "replay_nodes",
           "run_layer", "is_keras_tensor"]


def check_graph_model(model, name="model"):
    """``model`` if it is a built Sequential or Functional tf-keras model, else a clear error.

    Only such models have a layer graph to read, rewrite or replay.

    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> check_graph_model(model) is model
    True
    """
    check_keras2_model(model, name)
    if not model.built or not getattr(model, "_is_graph_network", False):
        raise InputError(
            f"The `{name}` argument must be a built Sequential or Functional model (one that "
            "starts with keras.Input; a subclassed model has no layer graph). Received the "
            f"model '{model.name}' of type {type(model).__name__}."
        )
    return model


def topological_nodes(model):
    """The model's layer calls (Keras ``Node`` objects) in execution order.

    Input layers are left out. Each node has ``.layer``, ``.call_args``,
    ``.call_kwargs``, ``.keras_inputs`` and ``.outputs``.

    Examples
    --------
    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="a"),
    ...                           keras.layers.Dense(1, name="b")])
    >>> [node.layer.name for node in topological_nodes(model)]
    ['a', 'b']
    """
    check_graph_model(model)
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if not node.is_input:
                nodes.append(node)
    return nodes


def downstream_nodes(nodes, *, layers=(), tensors=()):
    """Split ``nodes`` at ``layers`` and ``tensors``: what runs after them, and what it reads.

    Parameters
    ----------
    nodes : list of keras Node
        In execution order.
    layers : sequence of Layer
        The nodes calling these layers start the downstream part.
    tensors : sequence of KerasTensor
        Tensors whose readers (and their readers, ...) are downstream.

    Returns
    -------
    (sides, suffix)
        ``suffix``: in order, the nodes of ``layers`` and every node that
        depends on them or on ``tensors``. ``sides``: the tensors ``suffix``
        reads from the rest of the graph, which does not depend on them, in
        order of first use (``tensors`` themselves are not sides).
        :func:`replay_nodes` runs ``suffix`` from the values of
        ``tensors + sides``.

    Examples
    --------
    >>> import tf_keras as keras
    >>> inputs = keras.Input((3,))
    >>> a = keras.layers.Dense(3, name="a")(inputs)
    >>> b = keras.layers.Dense(3, name="b")(a)
    >>> out = keras.layers.Add(name="add")([a, b])
    >>> model = keras.Model(inputs, out)
    >>> sides, suffix = downstream_nodes(topological_nodes(model), layers=[model.get_layer("b")])
    >>> [node.layer.name for node in suffix], [t is a for t in sides]
    (['b', 'add'], [True])
    """
    targets = {id(layer) for layer in layers}
    produced = {id(tensor) for tensor in tensors}
    suffix = []
    for node in nodes:
        if id(node.layer) in targets or any(id(t) in produced for t in node.keras_inputs):
            suffix.append(node)
            produced.update(id(t) for t in tf.nest.flatten(node.outputs))
    sides, seen = [], set()
    for node in suffix:
        for tensor in node.keras_inputs:
            if id(tensor) not in produced and id(tensor) not in seen:
                seen.add(id(tensor))
                sides.append(tensor)
    return sides, suffix


def is_keras_tensor(value):
    """True for a symbolic tensor of a Keras graph (what a node reads and writes)."""
    return hasattr(value, "_keras_history")


def run_layer(node, args, kwargs):
    """Call ``node``'s own layer on ``args``/``kwargs``, in inference mode where it has one."""
    if "training" in node.layer._call_spec.arg_names:
        kwargs["training"] = False
    return node.layer(*args, **kwargs)


def replay_nodes(nodes, tensors, values, outputs, *, call=run_layer):
    """Run the graph ``nodes`` in order, from known values of some of its tensors.

    Parameters
    ----------
    nodes : list of keras Node
        In execution order (see :func:`topological_nodes`); every tensor a
        node reads must be one of ``tensors`` or written by an earlier node.
    tensors : list of KerasTensor
        Symbolic tensors of the graph whose values are known...
    values : list
        ...and those values (tensors, or new symbolic tensors).
    outputs : KerasTensor or nested structure of them
        The symbolic tensors whose values are returned.
    call : callable, default=run_layer
        ``call(node, args, kwargs)`` computes one node: ``args`` and
        ``kwargs`` are the node's call arguments with every Keras tensor
        replaced by its value (``kwargs`` is a fresh dict). It returns the
        values of the node's outputs, in the structure of ``node.outputs``.

    Returns
    -------
    The values of ``outputs``, in their structure.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(2, kernel_initializer="identity", name="a"),
    ...     keras.layers.Dropout(0.5), keras.layers.Dense(1, kernel_initializer="ones")])
    >>> nodes = topological_nodes(model)
    >>> hidden = nodes[0].outputs          # start after the first layer
    >>> replay_nodes(nodes[1:], [hidden], [np.array([[1.0, 2.0]])], model.outputs[0]).numpy()
    array([[3.]], dtype=float32)
    """
    known = {id(tensor): value for tensor, value in zip(tensors, values)}

    def resolve(obj):
        return known[id(obj)] if is_keras_tensor(obj) else obj

    for node in nodes:
        args = tf.nest.map_structure(resolve, node.call_args)
        kwargs = dict(tf.nest.map_structure(resolve, node.call_kwargs))
        result = call(node, args, kwargs)
        for ref, value in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(result)):
            known[id(ref)] = value
    return tf.nest.map_structure(resolve, outputs)
