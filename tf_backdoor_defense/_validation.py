"""Checks at the public boundary: models, labelled data and attack targets.

Every public function validates its inputs here, once, and gets back
converted objects. Messages say what was expected, what was received and,
where it helps, how to fix it. A bad value raises :class:`InputError` (a
``ValueError``), a bad type :class:`InputTypeError` (a ``TypeError``): the
errors an application may show to its user as they are.
"""

import numbers
import warnings
from collections.abc import Mapping

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import check_keras2_model, tf
from tf_backdoor_defense._labels import class_indices

__all__ = [
    "InputError",
    "InputTypeError",
    "LabeledData",
    "LowAccuracyWarning",
    "MissingClassesWarning",
    "check_model",
    "check_data",
    "check_fraction",
    "check_number",
    "check_thresholds",
    "check_target",
    "num_classes_of",
]


def check_model(model, name="model"):
    """A built tf-keras or Keras 3 model, or a clear ``TypeError``/``ValueError``."""
    from tf_backdoor_defense.keras3._backend import is_keras3_model
    if not is_keras3_model(model):  # Keras 3 models are converted by the public entry points
        check_keras2_model(model, name)
    if not model.built or not model.inputs:
        raise InputError(
            f"The `{name}` argument must be a built model with known inputs "
            "(a Sequential or Functional model that starts with keras.Input)."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InputError(
            f"The `{name}` argument must have one input and one output. Received a model "
            f"with {len(model.inputs)} inputs and {len(model.outputs)} outputs."
        )
    return model


def num_classes_of(model):
    """Number of classes the model predicts (2 for a single sigmoid unit)."""
    units = model.outputs[0].shape[-1]
    if units is None:
        raise InputError("The model's output has an unknown number of classes.")
    return 2 if int(units) == 1 else int(units)


def check_number(value, name, minimum=0.0, *, integer=False, positive=False, maximum=None,
                 below=None, allow_none=False):
    """``value`` itself, when it is a finite number (an int with ``integer``) in range.

    The range is ``>= minimum`` (``> 0`` with ``positive``, unbounded with None), and ``<= maximum`` or
    ``< below`` when those are given. ``None`` passes with ``allow_none``. A value
    of the wrong type is a TypeError, one out of range a ValueError; both name
    ``name`` and the rule.

    >>> check_number(3, "epochs", integer=True, positive=True)
    3
    >>> check_number(0.9, "momentum", below=1.0)
    0.9
    """
    if value is None and allow_none:
        return None
    rule = " and ".join(part for part in (
        "> 0" if positive else f">= {minimum}" if minimum is not None else "",
        f"<= {maximum}" if maximum is not None else "",
        f"< {below}" if below is not None else "") if part)
    rule = f"{'an int' if integer else 'a finite number'}{' ' + rule if rule else ''}" \
        f"{' or None' if allow_none else ''}"
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InputTypeError(f"The '{name}' parameter must be {rule}. Got {value!r}.")
    if not np.isfinite(value) or (value <= 0 if positive else minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum) or (below is not None and value >= below):
        raise InputError(f"The '{name}' parameter must be {rule}. Got {value!r}.")
    return value


def check_fraction(value, name, *, allow_one=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"The '{name}' parameter must be a number in [0, 1]. Got {value!r} instead.")
    value = float(value)
    if not (0.0 <= value <= 1.0) or (not allow_one and value == 1.0) or np.isnan(value):
        raise InputError(f"The '{name}' parameter must be in [0, 1]. Got {value!r} instead.")
    return value


def check_thresholds(max_accuracy_drop):
    """Normalise ``max_accuracy_drop`` (a number or a list) to a tuple of floats."""
    values = max_accuracy_drop if isinstance(max_accuracy_drop, (list, tuple)) else [max_accuracy_drop]
    if len(values) == 0:
        raise InputError("The 'max_accuracy_drop' parameter must not be an empty list.")
    checked = tuple(check_fraction(v, "max_accuracy_drop") for v in values)
    if len(set(checked)) != len(checked):
        raise InputError(f"The 'max_accuracy_drop' parameter has duplicates: {list(checked)}.")
    return checked


def check_target(target, num_classes):
    """Validate the ``target`` argument of the attack metrics.

    Returns ``None`` (labels are the attacker's targets), ``"untargeted"``, an
    ``int`` (all-to-one) or an int array of length ``num_classes`` (all-to-all:
    ``mapping[true_label]`` is the attacker's label).
    """
    if target is None or (isinstance(target, str) and target == "untargeted"):
        return target
    if isinstance(target, str):
        raise InputError(
            f"The 'target' parameter must be None, an int, 'untargeted', a mapping or a callable. "
            f"Got {target!r} instead."
        )
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        if not 0 <= int(target) < num_classes:
            raise InputError(
                f"The 'target' parameter must be a class index in [0, {num_classes - 1}]. "
                f"Got {target} instead."
            )
        return int(target)
    if callable(target):
        mapping = np.array([target(c) for c in range(num_classes)])
    elif isinstance(target, dict):
        mapping = np.array([target.get(c, c) for c in range(num_classes)])
    else:
        mapping = np.asarray(target)
    if mapping.shape != (num_classes,) or not np.issubdtype(mapping.dtype, np.integer):
        raise InputError(
            f"An all-to-all 'target' must give one integer class for each of the {num_classes} "
            f"classes. Got {target!r} instead."
        )
    if mapping.min() < 0 or mapping.max() >= num_classes:
        raise InputError(f"An all-to-all 'target' maps to classes outside [0, {num_classes - 1}].")
    return mapping.astype(np.int64)


class LabeledData:
    """Validated labelled data, as numpy arrays or a streamed ``tf.data.Dataset``.

    ``batches(batch_size)`` yields ``(x, y)`` numpy batches with x as float32
    and y as int64 class indices. Array data is fully checked on creation; a
    dataset is checked batch by batch as it streams.
    """

    def __init__(self, name, x=None, y=None, dataset=None, input_shape=None, num_classes=None):
        self.name = name
        self.x = x
        self.y = y
        self.dataset = dataset
        self.input_shape = input_shape
        self.num_classes = num_classes

    @property
    def size(self):
        """Number of examples, or None for a dataset."""
        return None if self.x is None else int(self.x.shape[0])

    def batches(self, batch_size=256):
        if self.x is not None:
            for start in range(0, self.x.shape[0], batch_size):
                yield self.x[start:start + batch_size], self.y[start:start + batch_size]
            return
        seen = 0
        for element in self.dataset:
            if not isinstance(element, (tuple, list)) or len(element) < 2:
                raise InputError(f"The dataset `{self.name}` must yield (x, y) pairs.")
            _refuse_dict_inputs(element[0], self.name, dataset=True)
            x, y = (np.asarray(e.numpy() if hasattr(e, "numpy") else e) for e in element[:2])
            if _single_example(x, y, self.input_shape):
                x, y = x[None], y[None]
            x, y = _check_arrays(x, y, self.name, self.input_shape, self.num_classes)
            seen += x.shape[0]
            for start in range(0, x.shape[0], batch_size):
                yield x[start:start + batch_size], y[start:start + batch_size]
        if seen == 0:
            raise InputError(f"The dataset `{self.name}` is empty.")

    def arrays(self):
        """``(x, y)`` as numpy arrays (a dataset is read once into memory)."""
        if self.x is not None:
            return self.x, self.y
        parts = list(self.batches(4096))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def subset(self, index):
        """Array data restricted to ``index`` (array data only)."""
        if self.x is None:
            raise InputTypeError("subset() needs array data, not a dataset.")
        return LabeledData(self.name, self.x[index], self.y[index], None, self.input_shape,
                           self.num_classes)


def _single_example(x, y, input_shape):
    """Whether a dataset element is one example (an unbatched dataset): ``x`` of the model's
    input rank with a scalar label, or ``x`` of exactly the input shape with a one-hot row or a
    ``(1,)`` label.

    >>> _single_example(np.zeros((4, 4)), np.zeros(3), (None, 4)), _single_example(
    ...     np.zeros((32, 4)), np.zeros(32), (4, 1))
    (True, False)
    """
    shape = tuple(input_shape or ())
    if x.ndim != len(shape):
        return False
    return y.ndim == 0 or (y.ndim == 1 and all(e is None or e == g
                                               for e, g in zip(shape, x.shape)))


def all_finite(x, chunk_bytes=1 << 24):
    """Whether every value of ``x`` is finite, checked in slices of about ``chunk_bytes``
    so that memory does not grow with the data set.

    >>> all_finite(np.zeros((3, 2))), all_finite(np.array([[0.0, np.inf]]))
    (True, False)
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        return bool(np.all(np.isfinite(x)))
    rows = max(1, chunk_bytes // max(1, x[:1].nbytes))
    return all(bool(np.isfinite(x[start:start + rows]).all())
               for start in range(0, x.shape[0], rows))


def _refuse_dict_inputs(x, name, dataset=False):
    """An :class:`InputTypeError` for Keras-style ``{input_name: x}`` inputs, which the
    library does not read; the message says how to pass the array instead."""
    if not isinstance(x, Mapping):
        return
    keys = list(x)
    key = repr(keys[0]) if len(keys) == 1 else "input_name"
    fix = (f"dataset.map(lambda x, y: (x[{key}], y))" if dataset else f"(x[{key}], y)")
    raise InputTypeError(
        f"`{name}` gives its inputs as a dict (keys {keys}); dict inputs are not supported. "
        f"Pass the input array itself: for a one-input model, {fix}.")


def _check_label_rows(y, name, num_classes):
    """Refuse 2-D label rows whose width is not the model's class count (argmax would misread
    them; rows that are neither one-hot nor probabilities are refused by ``class_indices``)."""
    y = np.asarray(y)
    if y.ndim != 2 or y.shape[1] < 2 or num_classes is None:
        return
    if y.shape[1] != num_classes:
        raise InputError(
            f"The labels of `{name}` are rows of {y.shape[1]} columns, but the model has "
            f"{num_classes} classes: one-hot labels need one column per class. Pass class "
            f"indices of shape (N,) or one-hot rows of shape (N, {num_classes}).")


def _check_arrays(x, y, name, input_shape, num_classes):
    _refuse_dict_inputs(x, name)
    x = np.asarray(x)
    if isinstance(y, (tuple, list)) and len(y) > 1 and len(y) != len(x) \
            and all(len(getattr(part, "shape", ())) >= 1 for part in y):
        raise InputError(f"`{name}` gives a list of {len(y)} label arrays (one per output of a "
                         "multi-output model?); the model must have one output, and the data "
                         "one label array: (x, y).")
    _check_label_rows(y, name, num_classes)
    y = class_indices(y, f"The labels of `{name}`")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"`{name}` has {x.shape[0]} inputs but {y.shape[0]} labels; "
                         "they must have the same length.")
    if input_shape is not None:
        expected = tuple(input_shape)
        got = tuple(x.shape[1:])
        if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
            shown = tuple("None" if e is None else e for e in expected)
            raise InputError(
                f"`{name}` has inputs of shape {got}, but the model expects {shown}"
                " (batch dimension excluded)."
                + (" Channels-first data must be transposed to channels-last."
                   if len(got) == 3 and len(expected) == 3 and got[0] == expected[-1] else "")
            )
    if not np.issubdtype(x.dtype, np.number):
        raise InputTypeError(f"`{name}` must hold numbers. Got dtype {x.dtype}.")
    x = x.astype(np.float32, copy=False)
    if not all_finite(x):
        raise InputError(f"`{name}` contains NaN or Inf values.")
    if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0]
        raise InputError(
            f"`{name}` has label {bad} out of range: the model has {num_classes} classes "
            f"(labels 0..{num_classes - 1})."
        )
    return x, y


def check_data(data, name="data", *, model=None, num_classes=None):
    """Validate labelled data given as ``(x, y)`` arrays or a ``tf.data.Dataset``.

    Parameters
    ----------
    data : tuple of (array, array), LabeledData or tf.data.Dataset
        Inputs and labels (class indices, or one-hot or probability rows with
        one column per class, each row summing to 1). A dataset yields
        ``(x, y)`` batches or single examples. ``x`` is an array: Keras-style
        ``{input_name: x}`` dicts are refused (:class:`InputTypeError`).
    name : str
        Used in error messages.
    model : tf_keras.Model, default=None
        When given, input shapes and label ranges are checked against it.
    num_classes : int, default=None
        Overrides the class count taken from ``model``.

    Returns
    -------
    LabeledData

    Examples
    --------
    >>> import numpy as np
    >>> data = check_data((np.zeros((2, 3)), [0, 1]))
    >>> data.size, data.y.tolist()
    (2, [0, 1])
    """
    input_shape = None
    if model is not None:
        input_shape = tuple(model.inputs[0].shape[1:])
        if num_classes is None:
            num_classes = num_classes_of(model)
    if isinstance(data, LabeledData):
        if data.x is None:
            return LabeledData(name, dataset=data.dataset, input_shape=input_shape,
                               num_classes=num_classes)
        data = (data.x, data.y)
    if isinstance(data, tf.data.Dataset):
        if int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
            raise InputError(f"`{name}` is a tf.data.Dataset that repeats forever (infinite "
                             "cardinality); pass a finite dataset (drop .repeat() or add "
                             ".take(n)).")
        spec = data.element_spec
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            what = (f"{len(spec)}-tuples" if isinstance(spec, (tuple, list))
                    else "single values")
            raise InputError(
                f"`{name}` is a tf.data.Dataset of {what}; it must yield (x, y) "
                "pairs" + (" (sample weights are not supported; drop them with "
                           "dataset.map(lambda x, y, w: (x, y)))"
                           if isinstance(spec, (tuple, list)) and len(spec) == 3 else "")
                + ".")
        return LabeledData(name, dataset=data, input_shape=input_shape, num_classes=num_classes)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise InputTypeError(
            f"`{name}` must be an (x, y) pair of arrays or a tf.data.Dataset of (x, y). "
            f"Got {type(data).__name__}."
        )
    x, y = data
    x, y = _check_arrays(x, y, name, input_shape, num_classes)
    if x.shape[0] == 0:
        raise InputError(f"`{name}` is empty: it has no examples.")
    return LabeledData(name, x, y, None, input_shape, num_classes)


def renamed_argument(function, old, old_value, new, new_value):
    """The value of a renamed keyword argument, accepting its old name for one release.

    Call it first thing in ``function`` with both keywords' values (``None``
    when not passed); the old one warns with a ``DeprecationWarning``.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     value = renamed_argument("f", "clean_data", 1, "validation_data", None)
    >>> value, caught[0].category.__name__
    (1, 'DeprecationWarning')
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise InputTypeError(f"{function} got both '{new}' and its old name '{old}'; "
                             f"pass '{new}' only.")
    warnings.warn(f"The '{old}' parameter of {function} is now '{new}'; '{old}' will be removed "
                  "in the next release.", DeprecationWarning, stacklevel=3)
    return old_value


_ONE_HOT_LOSSES = frozenset(name.replace("_", "") for name in (
    "categorical_crossentropy", "categorical_focal_crossentropy", "categorical_hinge",
    "kl_divergence", "kld", "kullback_leibler_divergence"))


def wants_one_hot(loss):
    """Whether the Keras ``loss`` (a name, a loss object or a function) takes one-hot labels.

    >>> wants_one_hot("categorical_crossentropy"), wants_one_hot(None)
    (True, False)
    """
    if loss is None:
        return False
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    return name.replace("_", "").lower() in _ONE_HOT_LOSSES


def training_labels(data, loss, model):
    """The labels of checked training data (``LabeledData``) in the form ``loss`` takes.

    Returns ``(x, y)`` arrays, or a dataset of ``(x, y)`` batches: class indices,
    or one-hot rows for a categorical loss (see :func:`wants_one_hot`). A dataset
    must yield batches of ``(x, y)``; labels may be indices or one-hot in both forms.
    """
    one_hot = wants_one_hot(loss)
    classes = int(model.outputs[0].shape[-1])
    if one_hot and classes < 2:
        raise InputError(f"The 'loss' parameter {loss!r} takes one-hot labels, but the model has "
                         "one output unit; use a binary loss (or the default loss=None).")
    if data.x is not None:
        if not one_hot:
            return data.x, data.y
        return data.x, np.eye(classes, dtype=np.float32)[data.y]
    x_spec, y_spec = data.dataset.element_spec  # check_data: (x, y) pairs
    if data.input_shape is not None and x_spec.shape.rank == len(data.input_shape):
        raise InputError(f"The dataset `{data.name}` yields single examples; training needs "
                         "batches: pass `dataset.batch(64)`.")
    y_rank = y_spec.shape.rank
    is_one_hot = y_rank == 2 and y_spec.shape[-1] != 1

    def convert(x, y):
        if is_one_hot and not one_hot:
            y = tf.argmax(y, axis=-1)
        elif not is_one_hot and one_hot:
            y = tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), classes)
        return x, y

    return data.dataset.map(convert)


def check_ranking_data(data, name="ranking_data", *, model=None, num_classes=None):
    """Validate data for activation statistics, which need no labels.

    Like :func:`check_data`, and also ``x`` alone: an array of inputs, or a
    ``tf.data.Dataset`` yielding inputs only (batches or single examples; with
    ``model`` the two are told apart by rank, without it batches are assumed).
    Such data get all-zero labels, which nothing reads.

    >>> check_ranking_data(np.zeros((2, 3))).y.tolist()
    [0, 0]
    """
    if isinstance(data, tf.data.Dataset) and not isinstance(data.element_spec, (tuple, list)):
        if not isinstance(data.element_spec, tf.TensorSpec):
            raise InputTypeError(f"`{name}` must be a tf.data.Dataset of inputs x or of (x, y) "
                                 f"pairs. It yields {data.element_spec!r}.")
        rank = None if model is None else len(model.inputs[0].shape)

        def unlabelled(x):
            single = rank is not None and x.shape.rank is not None and x.shape.rank == rank - 1
            return x, tf.zeros(() if single else tf.shape(x)[:1], tf.int64)

        data = data.map(unlabelled)
    elif not isinstance(data, (tuple, list, tf.data.Dataset, LabeledData)) and data is not None:
        x = np.asarray(data)
        if x.ndim == 0 or not np.issubdtype(x.dtype, np.number):
            raise InputTypeError(f"`{name}` must be (x, y) arrays, an array of inputs x or a "
                                 f"tf.data.Dataset. Got {type(data).__name__}.")
        data = (x, np.zeros(x.shape[0], np.int64))
    return check_data(data, name, model=model, num_classes=num_classes)


# -- notes about the defender's clean data (defend and scan_model warn them) -----------------
#: Below this validation accuracy, the received model is taken to read the defender's data in
#: another form than it was trained on, and :func:`~tf_backdoor_defense.defend` and
#: :func:`~tf_backdoor_defense.scan_model` warn (:class:`LowAccuracyWarning`).
LOW_ACCURACY = 0.5


class LowAccuracyWarning(UserWarning):
    """The received model gets most of the defender's clean validation data wrong: the data are
    likely scaled or ordered otherwise than the model's training data, or labelled otherwise."""


class MissingClassesWarning(UserWarning):
    """The defender's clean data hold no example of some of the model's classes: repairs and
    scan verdicts are judged only on the classes present."""


def _missing_classes_note(labels, classes):
    """A warning's text when ``labels`` lack some of the ``classes`` classes, else "".

    >>> import numpy as np
    >>> _missing_classes_note(np.arange(6) % 3, 3)
    ''
    >>> print(_missing_classes_note(np.array([0, 1, 1]), 4))  # doctest: +ELLIPSIS
    the clean data hold no example of 2 of the model's 4 classes (2, 3)...
    """
    missing = sorted(set(range(classes)) - set(np.unique(np.asarray(labels)).tolist()))
    if not missing:
        return ""
    shown = ", ".join(str(c) for c in missing[:20]) + (", ..." if len(missing) > 20 else "")
    return (f"the clean data hold no example of {len(missing)} of the model's {classes} classes "
            f"({shown}): the scan reverses triggers from inputs of the classes present only, and "
            f"repairs are trained and judged, and verdicts made, on those {classes - len(missing)} "
            "classes only; a backdoor or an accuracy loss that involves the missing classes can "
            "go unseen. Give examples of every class")


def clean_data_notes(model, labels, accuracy, x, scan=False):
    """``[(warning class, text), ...]`` about the defender's clean data, for
    :func:`~tf_backdoor_defense.defend` and :func:`~tf_backdoor_defense.scan.scan_model`
    (``scan=True``) alike:
    :class:`LowAccuracyWarning` when the received model's ``accuracy`` on them is low (``x``:
    the inputs it was measured on), then :class:`MissingClassesWarning` when ``labels`` lack
    some of the model's classes."""
    classes = num_classes_of(model)
    low = (_low_accuracy_note(accuracy, classes, x, "clean data", "The scan reverses triggers "
                              "towards these labels, so its verdict says little")
           if scan else _low_accuracy_note(accuracy, classes, x))
    notes = [(LowAccuracyWarning, low),
             (MissingClassesWarning, _missing_classes_note(labels, classes))]
    return [(category, text) for category, text in notes if text]


def _low_accuracy_note(accuracy, classes, x, data="clean validation data",
                       consequence="Every repair is judged against this accuracy"):
    """A warning's text when ``accuracy`` is below :data:`LOW_ACCURACY`, else "".

    >>> import numpy as np
    >>> _low_accuracy_note(0.97, 10, np.zeros(3))
    ''
    >>> print(_low_accuracy_note(0.12, 10, np.array([0.0, 255.0])))  # doctest: +ELLIPSIS
    the received model classifies only 12.0% of the clean validation data right (chance: 10.0%)...
    >>> "255" in _low_accuracy_note(0.12, 10, np.array([0.0, 1.0])).split("[0, 1]")[1]
    True
    >>> "255" in _low_accuracy_note(0.12, 10, np.array([0.0, 9999.0]))  # token IDs, say
    False
    """
    if accuracy >= LOW_ACCURACY:
        return ""
    low, high = float(np.min(x)), float(np.max(x))
    if 2.0 < high <= 255.0:  # raw pixels: the usual mismatch is x / 255 in training
        hint = "; a model trained on x / 255 needs them divided by 255 too"
    elif high <= 1.0 and low >= -1.0:  # already scaled: the model may read raw 0-255 values
        hint = "; a model trained on raw 0-255 pixels needs them unscaled"
    else:
        hint = ""
    return (f"the received model classifies only {accuracy:.1%} of the {data} "
            f"right (chance: {1 / classes:.1%}). A backdoor does not do that to clean inputs: "
            f"the data are likely prepared otherwise than the model's training data (these lie "
            f"in [{low:g}, {high:g}]{hint}), or labelled in another order. {consequence}")
