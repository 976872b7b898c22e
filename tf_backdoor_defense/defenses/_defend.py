"""One automatic entry point: try several repairs, keep the best one the defender can verify.

:func:`defend` runs a list of repair methods on a copy of the suspect
network, measures each on the defender's own validation data, and returns the
repaired model with a table of what every method achieved. It never sees
evaluation or test data.

Methods (``METHODS``), in the default order, which is also the order of
preference when the defender has no triggered data:

``"reinit-head"``
    Draw the dense layers after the last convolution afresh and fine-tune the
    whole network on clean data (:func:`~tf_backdoor_defense.finetune._training.train_clean`):
    the classifier is relearnt from clean data only.
``"prune-search"``
    Fine-pruning with the budget measured after fine-tuning
    (:func:`~tf_backdoor_defense.defenses._search.search_pruning_level`) on the last
    convolution and the penultimate dense layer together.
``"clp"``
    Data-free channel Lipschitz pruning (:func:`~tf_backdoor_defense.scoring._lipschitz.clp_prune`)
    of every convolution, most aggressive ``u`` first, then fine-tuning.
``"ft-sam"``
    Sharpness-aware fine-tuning (FT-SAM).
``"anp"``
    Adversarial neuron pruning (:func:`~tf_backdoor_defense.scoring._anp.anp_prune`),
    then fine-tuning.
``"fine-tuning"``
    Fine-tuning alone, with a cosine schedule.
``"fine-pruning"``
    The paper's recipe, for reference: prune the last convolution within the
    budget measured *before* fine-tuning, then fine-tune at a small rate.

Choice: among the methods whose validation accuracy stays within
``max_accuracy_drop`` of the model as received, the first in ``methods``
order; when the defender has ``poisoned_validation``, only those whose ASR
on it is at most ``asr_tolerance`` qualify for that, and when none is, the
lowest ASR wins (ties: higher accuracy, then method order). Preferring the
order over tiny ASR differences avoids trading accuracy for noise on a small
validation set.
When the chosen model still shows the backdoor on ``poisoned_validation``
(ASR above ``asr_tolerance``), a :class:`BackdoorStillActiveWarning` is
issued and recorded in the result.
"""

import time
import warnings

import numpy as np
import pandas as pd

from tf_backdoor_defense.masks._wrapper import last_conv_layer, masked_layers
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.finetune._training import as_arrays, head_layers, train_clean
from tf_backdoor_defense._validation import check_data, check_fraction, check_model, check_number, \
    check_target, num_classes_of

__all__ = ["defend", "DefenseResult", "BackdoorStillActiveWarning", "METHODS"]

METHODS = ("reinit-head", "prune-search", "clp", "ft-sam", "anp", "fine-tuning", "fine-pruning")
COLUMNS = ["method", "validation_accuracy", "accuracy_drop", "validation_asr", "within_budget",
           "channels_pruned", "seconds", "chosen", "note"]


class BackdoorStillActiveWarning(UserWarning):
    """The repaired model still obeys the trigger on the defender's poisoned validation data."""


class DefenseResult:
    """What :func:`defend` returns.

    Attributes
    ----------
    model : tf_keras.Model
        The repaired copy chosen (the model as received when no method ran).
    method : str or None
        The chosen method.
    table : pandas.DataFrame
        One row per method tried: ``method``, ``validation_accuracy``,
        ``accuracy_drop`` (vs. the model as received), ``validation_asr``
        (NaN without poisoned validation data), ``within_budget``,
        ``channels_pruned``, ``seconds``, ``chosen`` and ``note``.
    baseline : dict
        The received model's ``validation_accuracy`` and ``validation_asr``.
    candidates : dict
        ``{method: repaired model}`` for every method that ran.
    warnings : list of str
        Why the result may not be trusted (backdoor still active on
        validation, no method within budget, methods skipped for time).
    """

    def __init__(self, model, method, table, baseline, candidates, warnings_, settings):
        self.model = model
        self.method = method
        self.table = table
        self.baseline = baseline
        self.candidates = candidates
        self.warnings = warnings_
        self.settings = settings

    @property
    def backdoor_still_active(self):
        """True when poisoned validation data shows the chosen model's backdoor."""
        return any(w.startswith("backdoor still active") for w in self.warnings)

    def summary(self):
        """A JSON-friendly dict: baseline, chosen method, table rows and warnings."""
        rows = self.table.replace({np.nan: None}).to_dict(orient="records")
        return {"method": self.method, "baseline": self.baseline, "methods": rows,
                "warnings": list(self.warnings), "settings": self.settings}

    def __repr__(self):
        return f"DefenseResult(method={self.method!r}, methods_tried={len(self.table)})"


def _split(data, fraction, seed, model):
    x, y = as_arrays(data, "clean_data", model)
    if x.shape[0] < 2:
        raise ValueError("`clean_data` must hold at least 2 examples to split off validation data.")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    count = max(1, int(round(fraction * x.shape[0])))
    if count >= x.shape[0]:
        raise ValueError(f"validation_split={fraction} leaves no training data.")
    return (x[order[count:]], y[order[count:]]), (x[order[:count]], y[order[:count]])


def _penultimate_dense(model):
    heads = head_layers(model)
    return heads[-2] if len(heads) >= 2 else None


def _channels_pruned(model):
    return int(sum(layer.pruned_channels.size for layer in masked_layers(model)))


# -- the methods -----------------------------------------------------------------------
def _validation_accuracy(model, context):
    """Clean validation accuracy of ``model``, measured once per model object."""
    known = context["accuracy_of"]
    if id(model) not in known:
        known[id(model)] = (model, clean_accuracy(model, context["validation"]))
    return known[id(model)][1]


def _tune(model, train, context, **options):
    """``train_clean`` at every learning rate; the best validation accuracy wins (ties: first)."""
    best, best_accuracy, best_rate = None, -1.0, None
    for rate in context["learning_rates"]:
        tuned = train_clean(model, train, learning_rate=rate, **context["fine_tune"], **options)
        accuracy = (_validation_accuracy(tuned, context)
                    if len(context["learning_rates"]) > 1 else 0.0)
        if accuracy > best_accuracy:
            best, best_accuracy, best_rate = tuned, accuracy, rate
    return best, best_rate


def _with_rate(note, rate, context):
    if len(context["learning_rates"]) == 1:
        return note
    return f"{note}{'; ' if note else ''}lr {rate:g}"


def _reinit_head(model, train, context):
    heads = head_layers(model)
    if not heads:
        raise _Skip("the model has no dense layer after its last convolution")
    tuned, rate = _tune(model, train, context, reinitialize_layers=heads)
    return tuned, _with_rate(f"re-initialised {', '.join(heads)}", rate, context)


def _last_conv_or_skip(model):
    try:
        return last_conv_layer(model)
    except ValueError as error:
        raise _Skip("the model has no convolution") from error


def _prune_search(model, train, context):
    from tf_backdoor_defense.defenses._search import search_pruning_level

    layers = [_last_conv_or_skip(model)]
    penultimate = _penultimate_dense(model)
    if penultimate is not None:
        layers.append(penultimate)
    result = search_pruning_level(model, train, context["validation"], layers=layers,
                                  max_accuracy_drop=context["budget"],
                                  fine_tune=dict(context["fine_tune"],
                                                 learning_rate=context["learning_rates"][0]),
                                  seed=context["seed"])
    return result.model, (f"pruned {result.fraction:.0%} of {', '.join(layers)} "
                          f"({len(result.table)} levels fine-tuned)")


def _clp(model, train, context):
    from tf_backdoor_defense.scoring._lipschitz import channel_lipschitz, clp_masks, conv_layers
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    layers = conv_layers(model)
    if not layers:
        raise _Skip("the model has no convolution")
    scores = {name: channel_lipschitz(model, name) for name in layers}
    tried = []
    for u in context["clp_u"]:  # most aggressive first
        masks = clp_masks(scores, u)
        tuned, rate = _tune(wrap_layers(model, layers, masks), train, context)
        accuracy = _validation_accuracy(tuned, context)
        tried.append(u)
        if context["baseline_accuracy"] - accuracy <= context["budget"] + 1e-12:
            break
    return tuned, _with_rate(f"u={u:g} (tried {', '.join(f'{t:g}' for t in tried)})", rate, context)


def _ft_sam(model, train, context):
    tuned, rate = _tune(model, train, context, sam_rho=context["sam_rho"])
    return tuned, _with_rate(f"rho={context['sam_rho']:g}", rate, context)


def _anp(model, train, context):
    from tf_backdoor_defense.scoring._anp import anp_prune

    result = anp_prune(model, train, threshold=0.2, iterations=context["anp_iterations"],
                       seed=context["seed"])
    tuned, rate = _tune(result.model, train, context)
    return tuned, _with_rate("threshold 0.2", rate, context)


def _fine_tuning(model, train, context):
    tuned, rate = _tune(model, train, context)
    return tuned, _with_rate("", rate, context)


def _fine_pruning(model, train, context):
    from tf_backdoor_defense.finetune._fine_prune import fine_prune

    _last_conv_or_skip(model)
    result = fine_prune(model, train, context["validation"], max_accuracy_drop=context["budget"],
                        epochs=10, seed=context["seed"])
    return result.model, f"{result.channels_pruned} channels of {result.layer}, SGD 0.01 x 10"


class _Skip(Exception):
    """A method does not apply to this model."""


_RUNNERS = {"reinit-head": _reinit_head, "prune-search": _prune_search, "clp": _clp,
            "ft-sam": _ft_sam, "anp": _anp, "fine-tuning": _fine_tuning,
            "fine-pruning": _fine_pruning}


def _check_methods(methods):
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    unknown = [m for m in methods if m not in _RUNNERS]
    if unknown or not methods:
        raise ValueError(f"The 'methods' parameter must list methods among {list(METHODS)}. "
                         f"Got {methods!r}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"The 'methods' parameter names a method twice: {methods!r}.")
    return methods


def _choose(table, poisoned, tolerance=0.02):
    within = table[table["within_budget"]]
    if within.empty:
        return None
    if poisoned:
        cleared = within[within["validation_asr"] <= tolerance + 1e-12]
        if not cleared.empty:  # every one of these removes the backdoor: trust the order
            return cleared["method"].iloc[0]
        ranked = within.assign(order=np.arange(len(within))).sort_values(
            ["validation_asr", "validation_accuracy", "order"], ascending=[True, False, True],
            kind="stable")
        return ranked["method"].iloc[0]
    return within["method"].iloc[0]


def defend(model, clean_data, *, validation_data=None, validation_split=0.2, max_accuracy_drop=0.01,
           poisoned_validation=None, target=None, methods=METHODS, time_budget=None, epochs=20,
           learning_rate=0.05, batch_size=64, asr_tolerance=0.02, seed=0, verbose=0):
    """Repair a suspect network automatically, within an accuracy budget.

    ``model`` is never modified.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (Functional or Sequential).
    clean_data : (x, y) arrays or tf.data.Dataset
        The defender's clean data, for ranking and fine-tuning.
    validation_data : (x, y) arrays or tf.data.Dataset, default=None
        Clean data for measuring the methods; default: a ``validation_split``
        share of ``clean_data`` (held out from training).
    validation_split : float, default=0.2
    max_accuracy_drop : float, default=0.01
        Allowed drop of validation accuracy against the model as received.
    poisoned_validation : (x, y), default=None
        Triggered validation inputs, when the defender has some (labels as in
        :mod:`tf_backdoor_defense.metrics`, read with ``target``). They pick the
        method with the lowest ASR and raise the "backdoor still active" warning.
    target : default=None
        How to read ``poisoned_validation``'s labels.
    methods : sequence of str, default=METHODS
        Which methods to try, in order of preference (see the module docs).
    time_budget : float, default=None
        Seconds: once spent, the remaining methods are skipped (a method that
        has started finishes).
    epochs, learning_rate, batch_size : default=20, 0.05, 64
        Fine-tuning settings shared by the methods (cosine-decayed SGD).
        ``learning_rate`` may list several rates, e.g. ``[0.1, 0.05, 0.01]``:
        each method then fine-tunes once per rate and keeps the one with the
        best validation accuracy (``prune-search`` uses the first rate for
        every level it tries). The rate chosen is in the table's ``note``.
    asr_tolerance : float, default=0.02
        Validation ASR above which the backdoor counts as still active.
    seed : int, default=0
    verbose : int, default=0
        1 prints one line per method.

    Returns
    -------
    DefenseResult

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"), keras.layers.Flatten(),
    ...     keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((40, 6, 6, 1), dtype=np.float32)
    >>> y = (x[:, 0, 0, 0] > 0.5).astype(int)
    >>> result = defend(model, (x, y), methods=["reinit-head", "fine-tuning"], epochs=1,
    ...                 max_accuracy_drop=1.0)
    >>> result.method, list(result.table["method"])
    ('reinit-head', ['reinit-head', 'fine-tuning'])
    """
    check_model(model)
    methods = _check_methods(methods)
    budget = check_fraction(max_accuracy_drop, "max_accuracy_drop")
    tolerance = check_fraction(asr_tolerance, "asr_tolerance")
    split = check_fraction(validation_split, "validation_split", allow_one=False)
    if split == 0 and validation_data is None:
        raise ValueError("The 'validation_split' parameter must be > 0 when `validation_data` "
                         "is not given.")
    epochs = int(check_number(epochs, "epochs", integer=True, positive=True))
    if isinstance(learning_rate, (list, tuple, np.ndarray)):
        rates = list(np.asarray(learning_rate, dtype=object).reshape(-1))
    else:
        rates = [learning_rate]
    if not rates:
        raise ValueError("The 'learning_rate' parameter must give at least one rate.")
    rates = [float(check_number(r.item() if isinstance(r, np.generic) else r, "learning_rate",
                                 positive=True))
             for r in rates]
    batch_size = int(check_number(batch_size, "batch_size", integer=True, positive=True))
    if time_budget is not None:
        time_budget = float(check_number(time_budget, "time_budget", positive=True))
    check_data(clean_data, "clean_data", model=model)
    if validation_data is None:
        train, validation = _split(clean_data, split, seed, model)
    else:
        train = as_arrays(clean_data, "clean_data", model)
        validation = as_arrays(validation_data, "validation_data", model)
    poisoned = None
    if poisoned_validation is not None:
        target = check_target(target, num_classes_of(model))
        poisoned = check_data(poisoned_validation, "poisoned_validation", model=model)
    elif target is not None:
        raise ValueError("The 'target' parameter needs `poisoned_validation`.")

    def measure(candidate):
        accuracy = _validation_accuracy(candidate, context)
        asr = (attack_success_rate(candidate, poisoned, target=target) if poisoned is not None
               else np.nan)
        return accuracy, asr

    context = {"validation": validation, "budget": budget, "accuracy_of": {},
               "seed": seed, "sam_rho": 0.05, "anp_iterations": 500,
               "clp_u": (1.0, 1.5, 2.0, 3.0),
               "learning_rates": rates,
               "fine_tune": {"epochs": epochs,
                             "batch_size": batch_size, "seed": seed}}
    base_accuracy, base_asr = measure(model)
    context["baseline_accuracy"] = base_accuracy
    rows, candidates, notes = [], {}, []
    started = time.perf_counter()
    for method in methods:
        if time_budget is not None and time.perf_counter() - started > time_budget:
            notes.append(f"skipped {method}: time budget of {time_budget:g} s spent")
            continue
        began = time.perf_counter()
        try:
            repaired, note = _RUNNERS[method](model, train, context)
        except _Skip as reason:
            notes.append(f"skipped {method}: {reason}")
            continue
        accuracy, asr = measure(repaired)
        candidates[method] = repaired
        rows.append({"method": method, "validation_accuracy": accuracy,
                     "accuracy_drop": base_accuracy - accuracy, "validation_asr": asr,
                     "within_budget": bool(base_accuracy - accuracy <= budget + 1e-12),
                     "channels_pruned": _channels_pruned(repaired),
                     "seconds": time.perf_counter() - began, "chosen": False, "note": note})
        if verbose:
            row = rows[-1]
            print(f"{method:13s} accuracy {accuracy:.4f} (drop {row['accuracy_drop']:+.4f})"
                  f"{'' if poisoned is None else f'  ASR {asr:.4f}'}  {row['seconds']:.1f} s",
                  flush=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    chosen = _choose(table, poisoned is not None, tolerance) if len(table) else None
    if chosen is None:
        if len(table):
            chosen = table.sort_values("accuracy_drop", kind="stable")["method"].iloc[0]
            notes.append(f"no method stayed within the accuracy budget of {budget:g}; "
                         f"returning {chosen}, the smallest drop")
        else:
            notes.append("no method ran; returning the model as received")
    if chosen is not None:
        table.loc[table["method"] == chosen, "chosen"] = True
        final = candidates[chosen]
        final_asr = float(table.loc[table["method"] == chosen, "validation_asr"].iloc[0])
    else:
        final, final_asr = model, base_asr
    if poisoned is not None and final_asr > tolerance:
        notes.insert(0, f"backdoor still active on validation: ASR {final_asr:.1%} after "
                        f"{chosen or 'no repair'} (tolerance {tolerance:.1%})")
        warnings.warn(notes[0], BackdoorStillActiveWarning, stacklevel=2)
    settings = {"max_accuracy_drop": budget, "methods": methods, "epochs": epochs,
                "learning_rate": rates[0] if len(rates) == 1 else rates,
                "batch_size": batch_size, "seed": seed,
                "train_size": int(train[0].shape[0]), "validation_size": int(validation[0].shape[0]),
                "asr_tolerance": tolerance}
    baseline = {"validation_accuracy": base_accuracy,
                "validation_asr": None if poisoned is None else base_asr}
    return DefenseResult(final, chosen, table, baseline, candidates, notes, settings)
