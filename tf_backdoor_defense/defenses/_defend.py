"""One automatic entry point: scan, try several repairs, keep the one the defender can verify.

:func:`defend` works on the defender's clean data alone. It splits it into a
training part and a held-apart validation part, then:

1. **Scans** the network for a backdoor without the trigger
   (:func:`~tf_backdoor_defense.scan.scan_model`, on the training part): reversed
   triggers per class and an untargeted one. A network the scan finds clean is
   returned unchanged (a copy) with that verdict, unless ``repair_if_clean``.
2. **Repairs** a copy with each method, in order.
3. **Judges** every candidate on the validation part, which no repair trained on:
   its clean accuracy against the model as received, and the backdoor signal:
   the ASR on ``poisoned_validation_data`` when the defender has triggered data,
   otherwise the *residual* of the reversed triggers (the share of stamped
   validation inputs still sent to a suspected target; for an all-to-all
   suspicion, the share the untargeted trigger still sends along the class map
   the scan traced, each class to its suspected target; see ``_all_to_all_residual``).
4. **Verifies** by scanning again (``verify=True``): a candidate that
   clears the signal is scanned, and one in which the scan still finds a
   backdoor does not end the search (the next method runs; among candidates
   that clear the signal, verified ones are chosen first). ``unlearn``
   repeats itself: it rescans its result and unlearns what the rescan finds,
   up to ``UNLEARN_ROUNDS`` rounds in all. If the chosen model's scan still
   finds a backdoor, the result says so and warns. A rescan verifies the
   repair of what the first scan found: its second tier (a larger trigger's
   weaker evidence) names only the first scan's suspected targets
   (``scan_model(second_tier_classes=)``), and a new class must pass the
   first tier. Once a repair removes a target, a natural sink can fall into
   the second tier's range: after unlearning the zoo's patch target (seed 0),
   class 8 went from 0.42 x the median mask and index 2.0 to the second
   tier, and ``unlearn`` spent a second round and a rescan on it.
5. **Keeps the model as received** when no candidate within the budget
   clears the signal and the best one does not at least halve it
   (``MIN_SIGNAL_REDUCTION``): a repair that costs accuracy and leaves the
   backdoor (or a natural weakness that the scan mistook for one) is not
   shipped; nor is a candidate when none is within the budget. The result warns.

Methods (``METHODS``), in the default order, which is the order of preference:

``"unlearn"``
    Unlearning of the reversed triggers (Neural Cleanse): fine-tune on clean
    inputs stamped with them, true labels (the received model's predictions)
    kept (:func:`~tf_backdoor_defense.defenses._unlearning.unlearn_triggers`).
``"ibau"``
    Adversarial unlearning of a universal perturbation (I-BAU, Zeng et al.,
    ICLR 2022; :func:`~tf_backdoor_defense.defenses._ibau.ibau`). Needs no trigger.
    When the scan names an all-to-one target, the perturbation is searched
    towards that class (``target=``): on the zoo's blend all-to-one BadNets
    (seeds 0 and 1) this left 0.68% and 0.44% ASR against 2.03% and 1.98%
    untargeted, with a smaller validation drop. When it suspects an
    all-to-all backdoor, the search follows the class map its untargeted
    trigger traced (``ScanResult.all_to_all_map``, each class to its own
    target). ``defend`` runs it at a learning rate of 1e-3
    (``IBAU_LEARNING_RATE``; :func:`~tf_backdoor_defense.defenses._ibau.ibau`
    defaults to 2e-3): on the zoo's BatchNorm blend BadNets (all-to-all seeds
    1 and 2, all-to-one seed 1) it lost 0-1 of 250 validation digits where
    2e-3 lost 1-8, leaving 0.4-0.6% ASR, and over the 24 zoo BadNets
    ``defend`` repaired 19 instead of 16 (blend all-to-all seed 0 was lost,
    four others gained; with the all-to-all residual counted along the map,
    21); the clean BatchNorm net the scan mistakes for a backdoor at seed 1
    lost 1.0 point. Its perturbation's L2 radius is 3 in units of the data's
    value range (``ibau_radius``, ``IBAU_RADIUS``). The held-out nets'
    triggers measure 2.94-3.05 (a sinusoidal signal, a 3x3 square, a 5x5
    noise patch), at the ball's surface, and I-BAU's repairs left 2.48%
    (square seed 0) and 5.8% (square all-to-all seed 2). A radius of 4 was
    measured over the 41 BadNets of the zoo and the held-out nets (750 + 250
    digits, no triggered data) and not kept: 33 repaired against 36. It
    removed more of the large triggers (the line of seed 0: 3.6% to 0.45%;
    the signal of seed 2: 1.12%, where radius 3 lost the budget and
    ``unlearn`` shipped 8.7%; square all-to-all seed 2: 5.8% to 2.4%), but
    lost five nets to accuracy: 1.4 evaluation points that validation did
    not see (pixel all-to-one seed 0), every repair over the budget
    (pruning-aware seed 1, noise all-to-one seed 2), and interpolated
    repairs that left 2.2% (blend all-to-one seed 2, square seed 2). A
    defender who expects a trigger larger than the ball can widen it.

    When the scan found a backdoor, ``defend``'s I-BAU repair goes on with
    one pass of unlearning of the scan's reversed triggers
    (:func:`~tf_backdoor_defense.defenses._unlearning.unlearn_triggers`, as
    the first round of ``unlearn``; ``IBAU_THEN_UNLEARN``): a trigger at the
    ball's surface is only partly reached by the perturbation, and the
    reversed triggers, which no ball bounds, take out part of what is left.
    If that repair is over the budget, I-BAU's repair before the unlearning
    pass is judged next as a candidate of its own, ``"ibau-alone"``, then
    its interpolations, and only then those of the whole: the pass costs
    some accuracy, and when the whole is over the budget the candidates
    ``defend`` judged before the pass existed come first (judged the other
    way round, the whole's interpolation shipped on blend all-to-one seed 2
    with 3.81% ASR). Measured over the 41 BadNets of the zoo and the
    held-out nets (750 + 250 digits, no triggered data): 38 repaired against
    36. Gained: square seed 0 (2.48% to 0.90%), line seed 0 (3.60% to
    0.45%), signal seed 2 (where I-BAU alone lost the budget and ``unlearn``
    shipped 8.7%: 1.34%, warned, its residual 2.6%); square all-to-all seed
    2 went from 5.8% to 3.4%, still a miss. Lost: blend all-to-one seed 2,
    2.02% after ``ibau-alone@0.8`` (1.79% before, on a net trained again).
    The pass took 9-20 s on the held-out LeNet and residual nets.
``"reinit-head"``
    Draw the dense layers after the last convolution afresh and train the
    whole network on clean data (:func:`~tf_backdoor_defense.finetune._training.train_clean`).
``"prune-search"``
    Fine-pruning with the budget measured after training
    (:func:`~tf_backdoor_defense.defenses._search.search_pruning_level`) on the last
    convolution and the penultimate dense layer together.
``"clp"``
    Data-free channel Lipschitz pruning (:func:`~tf_backdoor_defense.scoring._lipschitz.clp_prune`)
    of every convolution, most aggressive ``u`` first, then clean training.
``"ft-sam"``
    Sharpness-aware clean training (FT-SAM).
``"anp"``
    Adversarial neuron pruning (:func:`~tf_backdoor_defense.scoring._anp.anp_prune`),
    then clean training.
``"ft-cosine"``
    Clean training alone: cosine-decayed SGD (``learning_rate``, ``epochs``) from
    the received weights. (The paper's "fine-tuning", SGD at 0.01, is
    :func:`~tf_backdoor_defense.finetune.fine_tune`.)
``"fine-pruning"``
    The paper's recipe, for reference: prune the last convolution within the
    budget measured *before* fine-tuning, then fine-tune at 0.01.

The default, ``methods=None``, is ``DEFAULT_METHODS`` (``unlearn``, ``ibau``,
``clp``): the repairs that need no trigger and fit in a few minutes. When the
scan names an all-to-one target or an all-to-all class map, it is
``TARGETED_METHODS`` (``ibau``, ``unlearn``, ``clp``): the perturbation searched
towards the target (or along the map) also finds dense triggers (blends) whose
reversed small mask unlearning removes while the real trigger stays (on the
zoo's blend BadNets ``unlearn`` cleared the reversed trigger and left 85-96%
ASR, with no signal left to tell). Measured on the 15 all-to-one zoo BadNets
(seeds 0-2), ``ibau`` first repaired two that ``unlearn`` first did not
(blend, seed 0: ASR 0.68% instead of 93%; pruning-aware, seed 1: 0.22%
instead of 53%) and missed two that it repaired, narrowly (patch, seed 0:
2.43% at a 1.4-point drop; pixel, seed 2: 2.01%): the same count, with near
misses in place of backdoors left whole. On the 9 all-to-all ones (I-BAU at
2e-3) it repaired one more (blend, seed 0: 0.8% instead of 93.6%) and lost
none. With I-BAU at 1e-3 (below), blend all-to-all seeds 0 and 1 were
missed while the all-to-all residual counted every input the untargeted
trigger moved off its class: I-BAU's repairs left 3.6% and 3.2% of such moves
(natural adversarial ones, to other classes: along the map, 0.0%), so
``unlearn`` ran next, cleared the small reversed trigger and shipped with the
blend intact. Counting moves along the map only, I-BAU ships at all three
seeds (0.8%, 0.8%, 0.6% ASR).

**The accuracy budget.** A candidate is within budget when an upper confidence
bound of its accuracy drop is at most ``max_accuracy_drop``. The drop is
measured *paired* against the model as received on the same validation
inputs: with ``b`` inputs the received model gets right and the candidate
wrong, ``c`` the reverse, and ``n`` inputs, the drop is ``(b - c) / n`` and its
standard error ``sqrt(b + c - (b - c)**2 / n) / n``; the bound adds ``z``
standard errors, ``z`` the one-sided normal quantile of ``budget_confidence``
(0.8 by default: ``z = 0.84``). Pairing removes the noise both models share,
so a repair that changes few predictions is judged precisely even on a few
hundred inputs, while a drop that validation noise could hide is not passed.
``budget_confidence=None`` compares the point estimate with the budget.

**Interpolation.** A repair over the budget is judged once more with its
weights ``alpha`` of the way from the received model's to its own (every
variable, BatchNorm statistics included; ``interpolate``, default ``(0.8,)``),
a weight-space interpolation in the manner of WiSE-FT (Wortsman et al., CVPR
2022): most of the repair's movement is kept, and the clean behaviour it
had disturbed partly comes back. The interpolated model is a candidate of
its own (``"unlearn@0.8"``, right after ``unlearn``), judged, rescanned and
chosen by the same rules. On the zoo's patch all-to-one BadNet of seed 1,
where every repair lost 2-3 of 250 validation digits net, ``unlearn`` at 0.8
lost 1 (bound 0.98 point), left a residual of 0.45% and, on evaluation
digits, 0.0% ASR at no accuracy drop. Nearer the received model the backdoor
comes back faster than the residual shows (at 0.6, I-BAU's repairs of that
net and of pattern all-to-all seed 1 kept residuals of 0.45% and 0.8% and
5.3% and 6.2% ASR), so only 0.8 is tried by default. Each fraction is one
more look at the same validation data, which the bound does not correct
for: keep the list short.

**The choice.** Among candidates within budget whose backdoor signal is at
most ``asr_tolerance``, the first in ``methods`` order. When none clears the
signal, the lowest signal within budget wins (ties: higher accuracy, then
order) and the result warns (:class:`BackdoorStillActiveWarning`,
``result.backdoor_still_active``). When none is within budget, nothing is
shipped: the model as received is returned (a copy) with a note naming the
smallest bound, and the repairs stay in ``result.candidates`` for a defender
who accepts a larger drop. When ``ibau`` searched the scan's target or class
map but was not chosen (over the budget, or its residual above the tolerance)
and another repair shipped, ``result.warnings`` says so: that repair removes
the scan's reversed triggers only, and a dense trigger (a blend) would stay
unseen; on the zoo this is how the blend BadNets failed. ``defend`` never
sees evaluation data.

Progress (one line per method tried) goes to the ``logging`` logger of this
module, ``tf_backdoor_defense.defenses._defend``.
"""

import contextlib
import dataclasses
import json
import logging
import time
import warnings
from statistics import NormalDist
from typing import Optional

import numpy as np
import pandas as pd

from tf_backdoor_defense.io._data import to_json
from tf_backdoor_defense.keras3._caller import with_caller_keras
from tf_backdoor_defense.masks._wrapper import last_conv_layer, masked_layers
from tf_backdoor_defense.metrics import attack_success_rate, predict_labels
from tf_backdoor_defense.finetune._training import as_arrays, copy_model, head_layers, train_clean
from tf_backdoor_defense._distribute import resolve_strategy
from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._validation import check_data, check_fraction, check_model, check_number, \
    check_target, num_classes_of
from tf_backdoor_defense._validation import (LowAccuracyWarning, MissingClassesWarning,
                                             clean_data_notes)

__all__ = ["defend", "DefenseResult", "BackdoorStillActiveWarning", "MissingClassesWarning",
           "METHODS", "DEFAULT_METHODS",
           "TARGETED_METHODS", "INTERPOLATE",
           "paired_drop", "interpolate_weights"]

METHODS = ("unlearn", "ibau", "reinit-head", "prune-search", "clp", "ft-sam", "anp", "ft-cosine",
           "fine-pruning")
DEFAULT_METHODS = ("unlearn", "ibau", "clp")
TARGETED_METHODS = ("ibau", "unlearn", "clp")
logger = logging.getLogger(__name__)

COLUMNS = ["method", "validation_accuracy", "accuracy_drop", "drop_bound", "validation_asr",
           "residual_trigger_rate", "within_budget", "verified", "channels_pruned", "seconds",
           "chosen", "note"]
# Rounds of "unlearn" when verifying: unlearn, rescan the result, unlearn what the rescan finds.
UNLEARN_ROUNDS = 3
# The rate of defend()'s I-BAU (ibau() itself defaults to 2e-3): half as fast, it lost fewer
# validation digits on the zoo's BatchNorm blend BadNets (see the module docs).
IBAU_LEARNING_RATE = 1e-3
# The L2 radius of defend()'s I-BAU perturbation, in units of the data's value range (as
# ibau()'s default): 4 was measured and not kept (see the module docs, "ibau").
IBAU_RADIUS = 3.0
# defend()'s I-BAU repair then unlearns the scan's reversed triggers once (see the module
# docs, "ibau").
IBAU_THEN_UNLEARN = True
# Without a cleared candidate, one is shipped only if it at least halves the backdoor signal.
MIN_SIGNAL_REDUCTION = 0.5
# A repair over the budget is also judged with its weights this far from the received model's
# towards its own (see the module docs, "Interpolation").
INTERPOLATE = (0.8,)


class BackdoorStillActiveWarning(UserWarning):
    """The repaired model may still obey a trigger (triggered or reversed-trigger evidence)."""


@dataclasses.dataclass(frozen=True)
class DefenseResult:
    """What :func:`defend` returns.

    Attributes
    ----------
    model : tf_keras.Model
        The repaired copy chosen; a copy of the model as received when the
        scan found no backdoor or no method ran.
    method : str or None
        The chosen method (None: nothing was repaired); ``"<method>@<fraction>"``
        for an interpolated repair (``interpolate``).
    table : pandas.DataFrame
        One row per method tried (and per interpolation of one, and
        ``ibau-alone`` when it was judged): ``method``,
        ``validation_accuracy``, ``accuracy_drop`` (paired, vs. the model as
        received), ``drop_bound``
        (its upper confidence bound), ``validation_asr`` (NaN without
        triggered data), ``residual_trigger_rate`` (NaN without a scan that
        found something), ``within_budget``, ``verified`` (True/False: whether
        a scan of the candidate found no backdoor; None: not scanned, only
        candidates that qualify are), ``channels_pruned``, ``seconds``,
        ``chosen`` and ``note``.
    baseline : dict
        The received model's ``validation_accuracy``, ``validation_asr`` and
        ``residual_trigger_rate``.
    candidates : dict
        ``{method: repaired model}`` for every method that ran (and every
        interpolated or ``ibau-alone`` row).
    warnings : list of str
        Why the result may not be trusted.
    settings : dict
        The arguments ``defend`` ran with.
    backdoor_still_active : bool
        True when the chosen model's backdoor signal is above ``asr_tolerance``
        or the verification scan still finds a backdoor.
    validation_asr : float or None
        The chosen model's ASR on the triggered validation data (None without).
    scan : ScanResult or None
        The scan of the model as received (None with ``scan=False``).
    verification : ScanResult or None
        The scan of the chosen model (None when not run).
    verdict : str
        One line: what was found and what was done.
    """

    model: object
    method: Optional[str]
    table: pd.DataFrame
    baseline: dict
    candidates: dict
    warnings: list
    settings: dict
    backdoor_still_active: bool = False
    validation_asr: Optional[float] = None
    scan: object = None
    verification: object = None
    verdict: str = ""

    def summary(self):
        """A JSON-friendly dict: verdict, baseline, chosen method, table rows and warnings;
        the scan and the verification rescan in full (:meth:`ScanResult.as_dict
        <tf_backdoor_defense.scan.ScanResult.as_dict>`: per-class mask sizes, anomaly
        indices and success rates, the untargeted test)."""
        rows = self.table.astype(object).where(self.table.notna(), None).to_dict(orient="records")
        out = {"verdict": self.verdict, "method": self.method, "baseline": self.baseline,
               "methods": rows, "warnings": list(self.warnings), "settings": self.settings,
               "backdoor_still_active": self.backdoor_still_active}
        for name in ("scan", "verification"):
            found = getattr(self, name)
            if found is None:
                out[name] = None
                continue
            # The whole scan (its per-class table and untargeted test too), so that a
            # verdict, a clean one above all, can be audited from the file alone; through
            # to_json for plain JSON values (NaN as None).
            out[name] = json.loads(to_json(found.as_dict(), indent=None))
        return out

    def __repr__(self):
        return (f"DefenseResult(method={self.method!r}, methods_tried={len(self.table)}, "
                f"verdict={self.verdict!r})")


def paired_drop(reference_correct, candidate_correct, confidence=0.8):
    """Accuracy drop of a candidate against a reference on the same inputs, with a bound.

    Parameters
    ----------
    reference_correct, candidate_correct : bool arrays (n,)
        Which inputs each model classifies correctly.
    confidence : float in (0.5, 1) or None, default=0.8
        One-sided confidence of the upper bound; None gives the point estimate.

    Returns
    -------
    (drop, bound) : floats
        ``(b - c) / n`` and ``drop + z * sqrt(b + c - (b - c)**2 / n) / n``, where ``b``
        counts inputs only the reference gets right and ``c`` the reverse.

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.array([True] * 100)
    >>> cand = ref.copy(); cand[:2] = False
    >>> drop, bound = paired_drop(ref, cand, confidence=0.8)
    >>> round(drop, 3), round(bound, 3)
    (0.02, 0.032)
    >>> paired_drop(ref, ref)
    (0.0, 0.0)
    """
    reference_correct = np.asarray(reference_correct, dtype=bool)
    candidate_correct = np.asarray(candidate_correct, dtype=bool)
    n = reference_correct.size
    if n == 0 or candidate_correct.shape != reference_correct.shape:
        raise ValueError("paired_drop needs two boolean arrays of the same non-zero length.")
    b = int(np.sum(reference_correct & ~candidate_correct))
    c = int(np.sum(~reference_correct & candidate_correct))
    drop = (b - c) / n
    if confidence is None:
        return float(drop), float(drop)
    z = NormalDist().inv_cdf(float(confidence))
    spread = max(b + c - (b - c) ** 2 / n, 0.0)
    return float(drop), float(drop + z * np.sqrt(spread) / n)


def _split(data, fraction, seed, model):
    x, y = as_arrays(data, "train_data", model)
    if x.shape[0] < 2:
        raise InputError(f"`train_data` holds {x.shape[0]} example; it must hold at least 2 to "
                         "split off validation data. Pass more examples, or give "
                         "`validation_data` (--validation on the command line).")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    count = max(1, int(round(fraction * x.shape[0])))
    if count >= x.shape[0]:
        raise InputError(f"validation_split={fraction} leaves no training data from "
                         f"{x.shape[0]} examples; pass more examples or a smaller "
                         "validation_split.")
    return (x[order[count:]], y[order[count:]]), (x[order[:count]], y[order[:count]])


def _penultimate_dense(model):
    heads = head_layers(model)
    return heads[-2] if len(heads) >= 2 else None


def _channels_pruned(model):
    return int(sum(layer.pruned_channels.size for layer in masked_layers(model)))


def _labels(y):
    y = np.asarray(y)
    if y.ndim > 1 and y.shape[-1] > 1:
        return y.argmax(-1)
    return y.reshape(-1).astype(np.int64)


def _predictions(model, context):
    """Validation predictions of ``model``, computed once per model object."""
    known = context["predictions_of"]
    if id(model) not in known:
        known[id(model)] = (model, predict_labels(model, context["validation"][0],
                                                  strategy=context["strategy"]))
    return known[id(model)][1]


def _validation_accuracy(model, context):
    """Clean validation accuracy of ``model``, measured once per model object."""
    return float(np.mean(_predictions(model, context) == context["validation_labels"]))


def _residual(model, context):
    """Backdoor signal of the reversed triggers on the validation data (NaN without any)."""
    scan = context.get("scan")
    if scan is None or not scan.backdoor_found:
        return np.nan
    x, y = context["validation"][0], context["validation_labels"]
    rates = []
    for target in scan.suspected_targets:
        keep = y != int(target)
        if not keep.any():
            continue
        stamped = scan.apply(x[keep], int(target))
        predicted = predict_labels(model, stamped, strategy=context["strategy"])
        rates.append(float(np.mean(predicted == int(target))))
    if scan.all_to_all_suspected:
        stamped = predict_labels(model, scan.apply(x, "untargeted"), strategy=context["strategy"])
        rates.append(_all_to_all_residual(stamped, _predictions(model, context), y,
                                          scan.all_to_all_map))
    return max(rates) if rates else np.nan


def _all_to_all_residual(stamped, clean, labels, class_map=None):
    """Share of inputs the untargeted trigger sends along the suspected class map.

    ``stamped`` and ``clean`` are the candidate's predictions on the stamped and
    the unstamped inputs, ``labels`` their true classes. With a ``class_map``
    (:attr:`~tf_backdoor_defense.scan.ScanResult.all_to_all_map`) the signal is
    the share of inputs of class ``c`` that the trigger sends to
    ``class_map[c]`` and that the candidate does not already put there
    unstamped: a small untargeted trigger also moves a few inputs of any
    network to other classes (a natural adversarial perturbation), which is
    not the backdoor the scan suspects. Without a map, the share moved off
    their class beyond the candidate's clean error.

    >>> import numpy as np
    >>> labels = np.array([0, 1, 2, 0])
    >>> clean = labels.copy()
    >>> stamped = np.array([1, 2, 1, 0])  # 0 -> 1 and 1 -> 2 follow the map, 2 -> 1 does not
    >>> float(_all_to_all_residual(stamped, clean, labels, np.array([1, 2, 0])))
    0.5
    >>> float(_all_to_all_residual(stamped, clean, labels))
    0.75
    """
    stamped, clean, labels = (np.asarray(a) for a in (stamped, clean, labels))
    if class_map is None:
        return max(float(np.mean(stamped != labels)) - float(np.mean(clean != labels)), 0.0)
    sent = np.asarray(class_map)[labels]
    return float(np.mean((stamped == sent) & (clean != sent)))


# -- the methods -----------------------------------------------------------------------
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


def interpolate_weights(received, repaired, alpha):
    """A copy of ``repaired`` whose weights lie ``alpha`` of the way from ``received``'s to its own.

    Every variable, BatchNorm statistics included, becomes
    ``received + alpha * (repaired - received)``; the copy is made under the
    repair's distribution strategy. None when the two models do not hold the
    same variables (a pruned repair wraps layers in masks). Neither model is
    modified.

    >>> import numpy as np, tf_keras as keras
    >>> a = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="ones")])
    >>> b = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    >>> interpolate_weights(a, b, 0.8).get_weights()[0].tolist()
    [[0.19999998807907104]]
    >>> interpolate_weights(a, keras.Sequential([keras.Input((1,)), keras.layers.Dense(2)]), 0.5)
    """
    start, end = received.get_weights(), repaired.get_weights()
    if type(received) is not type(repaired) or len(start) != len(end) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(start, end)):
        return None
    with repaired.distribute_strategy.scope():  # the copy lives where the repair does
        blended = copy_model(repaired)
    blended.set_weights([a + alpha * (b - a) if np.issubdtype(a.dtype, np.floating) else b
                         for a, b in zip(start, end)])
    return blended


def _base_method(name):
    """``"unlearn"`` for ``"unlearn"`` and for its interpolated row ``"unlearn@0.8"``;
    ``"ibau"`` for the first stage of a repair in stages, ``"ibau-alone"`` (and its rows)."""
    return None if name is None else name.split("@")[0].removesuffix("-alone")


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
                                  seed=context["seed"], distribute_strategy=context["strategy"])
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
                       seed=context["seed"], strategy=context["strategy"])
    tuned, rate = _tune(result.model, train, context)
    return tuned, _with_rate("threshold 0.2", rate, context)


def _ft_cosine(model, train, context):
    tuned, rate = _tune(model, train, context)
    return tuned, _with_rate("", rate, context)


def _unlearn(model, train, context):
    from tf_backdoor_defense.defenses._unlearning import unlearn_triggers

    scan = context.get("scan")
    if scan is None or not scan.backdoor_found:
        raise _Skip("no reversed trigger to unlearn (the scan found no backdoor)")
    triggers, names = scan.suspected_triggers(), _trigger_names(scan)
    repaired, rounds = model, context["unlearn_rounds"]
    for round_ in range(1, rounds + 1):
        repaired = unlearn_triggers(repaired, train, triggers,
                                    batch_size=context["fine_tune"]["batch_size"],
                                    seed=context["seed"] + round_ - 1, strategy=context["strategy"])
        context["verifications"].pop("unlearn", None)
        if round_ == rounds:
            break
        check = _rescan(repaired, train, context, f"unlearn's round {round_}")
        context["verifications"]["unlearn"] = check
        if not check.backdoor_found:
            break
        triggers = triggers + check.suspected_triggers()
        names = names + _trigger_names(check)
    rounds_note = f" in {round_} rounds" if round_ > 1 else ""
    return repaired, f"unlearnt {len(triggers)} reversed trigger(s){rounds_note}: {', '.join(names)}"


def _trigger_names(scan):
    names = [str(t) for t in scan.suspected_targets]
    return names + (["untargeted"] if scan.all_to_all_suspected else [])


def _rescan(model, train, context, what):
    from tf_backdoor_defense.scan._scan import scan_model

    # A rescan verifies the repair of what the first scan found: its second tier names only
    # the first scan's targets (a new class needs the first tier's evidence).
    options = dict(context["scan_kwargs"])
    options.setdefault("second_tier_classes", context["scan"].suspected_targets)
    # scan_model logs its own verdict line ("scan: ..."); this one says what it scans.
    logger.log(context["log_level"], "rescanning %s", what)
    with _without_data_warnings():  # about the defender's data, which defend warned of
        return scan_model(model, train, **options)


@contextlib.contextmanager
def _without_data_warnings():
    """Silence :func:`clean_data_notes`' warnings in the scans :func:`defend` runs itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowAccuracyWarning)
        warnings.simplefilter("ignore", MissingClassesWarning)
        yield


def _ibau(model, train, context):
    from tf_backdoor_defense.defenses._ibau import ibau
    from tf_backdoor_defense.graph._inputs import NoInputGradientError

    scan = context.get("scan")
    target = _ibau_target(scan)
    try:
        repaired = ibau(model, train, batch_size=context["fine_tune"]["batch_size"],
                        seed=context["seed"], strategy=context["strategy"], target=target,
                        learning_rate=IBAU_LEARNING_RATE, radius=context["ibau_radius"])
    except NoInputGradientError as error:
        raise _Skip(str(error)) from None
    if target is None:
        note = "universal perturbation unlearnt"
    elif isinstance(target, int):
        note = f"universal perturbation towards class {target} unlearnt"
    else:
        from tf_backdoor_defense.scan._statistics import describe_map

        note = (f"universal perturbation along the class map "
                f"{describe_map(target, limit=10)} unlearnt")
    if IBAU_THEN_UNLEARN and scan is not None and scan.backdoor_found:
        from tf_backdoor_defense.defenses._unlearning import unlearn_triggers

        # I-BAU's repair alone: judged when the whole is over the budget (see defend's loop).
        context["first_stages"]["ibau"] = ("ibau-alone", repaired, note)
        triggers = scan.suspected_triggers()
        repaired = unlearn_triggers(repaired, train, triggers,
                                    batch_size=context["fine_tune"]["batch_size"],
                                    seed=context["seed"], strategy=context["strategy"])
        note += (f", then {len(triggers)} reversed trigger(s) unlearnt: "
                 f"{', '.join(_trigger_names(scan))}")
    return repaired, note


def _dense_repair_not_chosen(table, chosen, found, poisoned, budget, tolerance):
    """A note when I-BAU searched the scan's target (or map) but was not chosen (over the
    budget, above the residual tolerance or still found by the rescan), and a repair that
    only sees the reversed small triggers shipped instead (else "")."""
    if (poisoned is not None or _base_method(chosen) in (None, "ibau")
            or _ibau_target(found) is None):
        return ""
    rows = table[table["method"] == "ibau"]
    if rows.empty:
        return ""
    row = rows.iloc[0]
    if not row["within_budget"]:
        why = f"was over the budget (bound {float(row['drop_bound']):+.4f} against {budget:g})"
    elif _failed(row["verified"]):
        why = "was still found backdoored by the rescan"
    else:
        why = (f"left a reversed-trigger residual of {float(row['residual_trigger_rate']):.1%} "
               f"(tolerance {tolerance:.1%})")
    return (f"ibau, which also unlearns dense triggers such as blends, {why}; {chosen} "
            "removes the scan's reversed triggers only, and a dense trigger they do not "
            "reproduce would stay unseen (result.candidates['ibau'] holds the ibau repair)")


def _ibau_target(scan):
    """What I-BAU's inner step searches towards: the scan's all-to-all class map, else its
    most anomalous all-to-one target, else nothing (untargeted)."""
    if scan is None:
        return None
    if scan.all_to_all_map is not None:
        return scan.all_to_all_map
    if scan.suspected_targets and not scan.all_to_all_suspected:
        return int(scan.suspected_targets[0])
    return None


def _fine_pruning(model, train, context):
    from tf_backdoor_defense.finetune._fine_prune import fine_prune

    _last_conv_or_skip(model)
    with context["strategy"].scope():  # fit() and the FinePruning callback follow the scope
        result = fine_prune(model, train, context["validation"],
                            max_accuracy_drop=context["budget"],
                            ranking_data=context["validation"], epochs=10, seed=context["seed"])
    return result.model, (f"{result.channels_pruned} channels of {', '.join(result.layers)}, "
                          "SGD 0.01 x 10")


class _Skip(Exception):
    """A method does not apply to this model."""


_RUNNERS = {"unlearn": _unlearn, "ibau": _ibau, "reinit-head": _reinit_head,
            "prune-search": _prune_search, "clp": _clp, "ft-sam": _ft_sam, "anp": _anp,
            "ft-cosine": _ft_cosine, "fine-pruning": _fine_pruning}


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


def _signal(table):
    """The backdoor signal of each row: triggered ASR when known, else the reversed-trigger residual."""
    return table["validation_asr"].where(table["validation_asr"].notna(),
                                         table["residual_trigger_rate"])


def _failed(verified):
    """Whether a ``verified`` cell says a scan of the candidate still found a backdoor."""
    return verified is not None and not pd.isna(verified) and not bool(verified)


def _qualifies(row, tolerance):
    """Whether the choice rule would take this row over every later method."""
    if not row["within_budget"] or _failed(row.get("verified")):
        return False
    signal = row["validation_asr"]
    if np.isnan(signal):
        signal = row["residual_trigger_rate"]
    return bool(np.isnan(signal) or signal <= tolerance + 1e-12)


def _choose(table, tolerance=0.02):
    within = table[table["within_budget"]]
    if within.empty:
        return None
    signal = _signal(within)
    if signal.notna().any():
        cleared = within[signal.fillna(np.inf) <= tolerance + 1e-12]
        if not cleared.empty:  # every one of these removes the backdoor: trust the order,
            trusted = cleared[[not _failed(v) for v in cleared["verified"]]]  # verified first
            return (trusted if not trusted.empty else cleared)["method"].iloc[0]
        ranked = within.assign(order=np.arange(len(within)), signal=signal.fillna(np.inf)).sort_values(
            ["signal", "validation_accuracy", "order"], ascending=[True, False, True], kind="stable")
        return ranked["method"].iloc[0]
    return within["method"].iloc[0]


def _check_confidence(value):
    if value is None:
        return None
    value = check_number(value, "budget_confidence", 0.5, maximum=1.0)
    if not 0.5 <= value < 1.0:
        raise ValueError(f"The 'budget_confidence' parameter must be in [0.5, 1) or None. "
                         f"Got {value!r} instead.")
    return float(value)


def _check_interpolate(values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"The 'interpolate' parameter must be a sequence of fractions in (0, 1). "
                        f"Got {values!r} instead.")
    return tuple(float(check_number(v, "interpolate", positive=True, below=1.0)) for v in values)


def _check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"The '{name}' parameter must be True or False. Got {value!r} instead.")
    return bool(value)


@with_caller_keras
def defend(model, train_data, *, validation_data=None, validation_split=0.25, max_accuracy_drop=0.01,
           poisoned_validation_data=None, target=None, methods=None, scan=True,
           repair_if_clean=False, verify=True, budget_confidence=0.8, try_all=False,
           interpolate=INTERPOLATE, time_budget=None, epochs=20,
           learning_rate=0.05, batch_size=64, asr_tolerance=0.02, ibau_radius=IBAU_RADIUS,
           scan_options=None, seed=0, verbose=0, strategy=None):
    """Scan a suspect network, repair it if needed, and verify the repair, within an accuracy budget.

    ``model`` is never modified. See the module documentation for the flow,
    the methods and the choice rule.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (Functional or Sequential).
    train_data : (x, y) arrays or tf.data.Dataset
        The defender's clean data: the scan reverses triggers on it and the
        repairs train on it.
    validation_data : (x, y) arrays or tf.data.Dataset, default=None
        Clean data for judging the candidates; default: a ``validation_split``
        share of ``train_data``, held apart from the scan and every repair.
    validation_split : float, default=0.25
    max_accuracy_drop : float, default=0.01
        Allowed drop of validation accuracy against the model as received.
    poisoned_validation_data : (x, y), default=None
        Triggered validation inputs, when the defender has some (labels as in
        :mod:`tf_backdoor_defense.metrics`, read with ``target``). Their ASR is
        then the backdoor signal.
    target : default=None
        How to read ``poisoned_validation_data``'s labels.
    methods : sequence of str, default=None
        Which methods to try, in order of preference; None: ``DEFAULT_METHODS``,
        or ``TARGETED_METHODS`` when the scan names an all-to-one target or an
        all-to-all class map.
    scan : bool, default=True
        Scan the received model first. With False, every method runs whatever
        the model, and candidates are judged by accuracy (and triggered data) only.
    repair_if_clean : bool, default=False
        Repair even when the scan finds no backdoor.
    verify : bool, default=True
        Scan candidates that clear the backdoor signal again (and let
        ``unlearn`` unlearn what the rescans find); the search goes on past a
        candidate still found backdoored, and a backdoor found in the chosen
        model sets ``backdoor_still_active`` and warns.
    budget_confidence : float in [0.5, 1) or None, default=0.8
        One-sided confidence of the bound on the accuracy drop (None: the
        point estimate).
    try_all : bool, default=False
        Run every method even after one qualifies. By default the methods stop
        at the first that is within budget and clears the backdoor signal: the
        choice rule could not pick a later one.
    interpolate : sequence of float in (0, 1), default=INTERPOLATE (0.8,)
        A repair over the budget is judged again with its weights each of these
        fractions of the way from the received model's to its own
        (:func:`interpolate_weights`), in order, until one qualifies; each is
        a row of its own, ``"<method>@<fraction>"``, after its repair's. Only
        for repairs that keep the received model's variables (``unlearn``,
        ``ibau``, ``reinit-head``, ``ft-sam``, ``ft-cosine``); ``()`` turns it off.
    time_budget : float, default=None
        Seconds: once spent, the remaining methods are skipped (a method that
        has started finishes).
    epochs, learning_rate, batch_size : default=20, 0.05, 64
        Settings of the clean training that ``reinit-head``, ``clp``,
        ``ft-sam``, ``anp``, ``ft-cosine`` and ``prune-search`` share (cosine-decayed
        SGD). ``learning_rate`` may list several rates: each such method then
        trains once per rate and keeps the best validation accuracy.
        ``batch_size`` is also the batch of ``unlearn`` and ``ibau``.
    asr_tolerance : float, default=0.02
        Backdoor signal above which the backdoor counts as still active.
    ibau_radius : float, default=IBAU_RADIUS
        The L2 radius of ``ibau``'s universal perturbation, in units of the
        data's value range (:func:`~tf_backdoor_defense.defenses._ibau.ibau`'s
        ``radius``): a prior on the trigger's size. A trigger at or beyond the
        ball's surface is only partly unlearnt; a larger ball costs more clean
        accuracy (the module docs give the measurements).
    scan_options : dict, default=None
        Keyword arguments for :func:`~tf_backdoor_defense.scan.scan_model`,
        for the first scan and the rescans. Rescans get the first scan's
        suspected targets as ``second_tier_classes`` unless it is given here.
    seed : int, default=0
    verbose : int, default=0
        The level of the lines logged on this module's logger: ``logging.INFO``
        with 1, ``logging.DEBUG`` with 0. Nothing is printed. Each scan's
        verdict ("scan: ...") is logged once, at INFO, by
        :func:`~tf_backdoor_defense.scan.scan_model`'s own logger; here a line
        ("rescanning ...") names what each rescan checks.
    strategy : tf.distribute.Strategy, default=None
        Passed to the scans (:func:`~tf_backdoor_defense.scan.scan_model`),
        the clean training of the ``train_clean`` methods, ``unlearn``,
        ``ibau`` and ``anp``'s masks; ``fine-pruning`` runs in its scope. Default:
        ``model.distribute_strategy`` (the strategy whose ``scope()`` the call
        runs in, else one device). The judging of the candidates (the
        validation predictions, plain and stamped, and the ASR on
        ``poisoned_validation_data``) splits each batch over the replicas
        (:func:`~tf_backdoor_defense.metrics.predict_labels`); ``clp``'s
        scores read the weights only.

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
    >>> y = model.predict(x, verbose=0).argmax(-1)  # labels it gets right
    >>> result = defend(model, (x, y), methods=["reinit-head", "ft-cosine"], epochs=1,
    ...                 scan=False, max_accuracy_drop=1.0, try_all=True)
    >>> result.method, list(result.table["method"])
    ('reinit-head', ['reinit-head', 'ft-cosine'])
    """
    check_model(model)
    strategy = resolve_strategy(strategy, model)
    default_methods = methods is None
    methods = _check_methods(DEFAULT_METHODS if methods is None else methods)
    budget = check_fraction(max_accuracy_drop, "max_accuracy_drop")
    tolerance = check_fraction(asr_tolerance, "asr_tolerance")
    split = check_fraction(validation_split, "validation_split", allow_one=False)
    if split == 0 and validation_data is None:
        raise ValueError("The 'validation_split' parameter must be > 0 when `validation_data` "
                         "is not given.")
    do_scan = _check_flag(scan, "scan")
    repair_if_clean = _check_flag(repair_if_clean, "repair_if_clean")
    verify = _check_flag(verify, "verify")
    try_all = _check_flag(try_all, "try_all")
    confidence = _check_confidence(budget_confidence)
    interpolate = _check_interpolate(interpolate)
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
    ibau_radius = float(check_number(ibau_radius, "ibau_radius", positive=True))
    if time_budget is not None:
        time_budget = float(check_number(time_budget, "time_budget", positive=True))
    if scan_options is not None and not isinstance(scan_options, dict):
        raise TypeError(f"The 'scan_options' parameter must be a dict. Got {scan_options!r}.")
    check_data(train_data, "train_data", model=model)
    if validation_data is None:
        train, validation = _split(train_data, split, seed, model)
    else:
        train = as_arrays(train_data, "train_data", model)
        validation = as_arrays(validation_data, "validation_data", model)
    poisoned = None
    if poisoned_validation_data is not None:
        target = check_target(target, num_classes_of(model))
        poisoned = check_data(poisoned_validation_data, "poisoned_validation_data", model=model)
    elif target is not None:
        raise ValueError("The 'target' parameter needs `poisoned_validation_data`.")
    level = logging.INFO if verbose else logging.DEBUG
    scan_kwargs = dict({"seed": seed, "strategy": strategy}, **(scan_options or {}))
    started = time.perf_counter()

    context = {"validation": validation, "validation_labels": _labels(validation[1]),
               "budget": budget, "predictions_of": {}, "seed": seed, "sam_rho": 0.05,
               "anp_iterations": 500, "clp_u": (1.0, 1.5, 2.0, 3.0), "learning_rates": rates,
               "fine_tune": {"epochs": epochs, "batch_size": batch_size, "seed": seed,
                             "strategy": strategy},
               "strategy": strategy, "scan_kwargs": scan_kwargs, "log_level": level,
               "ibau_radius": ibau_radius,
               "verifications": {}, "unlearn_rounds": UNLEARN_ROUNDS if verify else 1,
               "first_stages": {}}
    base_correct = _predictions(model, context) == context["validation_labels"]
    base_accuracy = float(base_correct.mean())
    context["baseline_accuracy"] = base_accuracy
    data_notes = clean_data_notes(
        model, np.concatenate([_labels(train[1]), context["validation_labels"]]), base_accuracy,
        validation[0])
    for category, text in data_notes:
        warnings.warn(text, category, stacklevel=2)
    found = None
    if do_scan:
        from tf_backdoor_defense.scan._scan import scan_model

        with _without_data_warnings():  # defend has just warned about the same data
            found = scan_model(model, train, **scan_kwargs)
        context["scan"] = found  # scan_model logs its verdict ("scan: ...") itself
        if default_methods and _ibau_target(found) is not None:
            methods = list(TARGETED_METHODS)

    def measure(candidate):
        correct = _predictions(candidate, context) == context["validation_labels"]
        drop, bound = paired_drop(base_correct, correct, confidence)
        asr = (attack_success_rate(candidate, poisoned, target=target, strategy=strategy)
               if poisoned is not None else np.nan)
        return float(correct.mean()), drop, bound, asr, _residual(candidate, context)

    base_asr = (attack_success_rate(model, poisoned, target=target, strategy=strategy)
                if poisoned is not None else np.nan)
    base_residual = _residual(model, context)
    baseline = {"validation_accuracy": base_accuracy,
                "validation_asr": None if poisoned is None else float(base_asr),
                "residual_trigger_rate": None if np.isnan(base_residual) else float(base_residual)}
    settings = {"max_accuracy_drop": budget, "methods": methods, "epochs": epochs,
                "learning_rate": rates[0] if len(rates) == 1 else rates,
                "batch_size": batch_size, "seed": seed, "scan": do_scan, "verify": verify,
                "repair_if_clean": repair_if_clean, "budget_confidence": confidence,
                "try_all": try_all, "interpolate": list(interpolate),
                "train_size": int(train[0].shape[0]), "validation_size": int(validation[0].shape[0]),
                "asr_tolerance": tolerance, "ibau_radius": ibau_radius}

    notes = [text for _, text in data_notes]
    if found is not None and not found.backdoor_found and not repair_if_clean:
        if poisoned is not None and base_asr > tolerance:
            notes.append(f"the scan found no backdoor, but the triggered validation data show "
                         f"ASR {base_asr:.1%}; repairing anyway")
        else:
            verdict = "no backdoor found; model returned unchanged"
            return DefenseResult(copy_model(model), None, pd.DataFrame([], columns=COLUMNS),
                                 baseline, {}, notes, settings,
                                 backdoor_still_active=bool(poisoned is not None
                                                            and base_asr > tolerance),
                                 validation_asr=None if poisoned is None else float(base_asr),
                                 scan=found, verdict=verdict)

    # Without triggered data the residual only covers the triggers the scan reversed: a
    # candidate that clears it is scanned again, and one still found backdoored does not stop
    # the search (the next method runs).
    verify_each = bool(verify and found is not None and found.backdoor_found)
    rows, candidates = [], {}

    def judge(name, repaired, note, began):
        """Measure one candidate, rescan it if it qualifies, and add its row."""
        accuracy, drop, bound, asr, residual = measure(repaired)
        candidates[name] = repaired
        row = {"method": name, "validation_accuracy": accuracy, "accuracy_drop": drop,
               "drop_bound": bound, "validation_asr": asr, "residual_trigger_rate": residual,
               "within_budget": bool(bound <= budget + 1e-12), "verified": None,
               "channels_pruned": _channels_pruned(repaired), "seconds": 0.0, "chosen": False,
               "note": note}
        if verify_each and _qualifies(row, tolerance):
            if name not in context["verifications"]:
                context["verifications"][name] = _rescan(repaired, train, context, name)
            row["verified"] = not context["verifications"][name].backdoor_found
        row["seconds"] = time.perf_counter() - began
        rows.append(row)
        logger.log(level, "%-13s accuracy %.4f (drop %+.4f, bound %+.4f)%s%s  %.1f s", name,
                   accuracy, drop, bound, "" if poisoned is None else f"  ASR {asr:.4f}",
                   "" if np.isnan(residual) else f"  residual {residual:.4f}", row["seconds"])
    def judge_fractions(name, repaired):
        """Judge ``repaired`` part of the way from the received weights, nearest to it first,
        until one qualifies."""
        for alpha in interpolate:
            began = time.perf_counter()
            blended = interpolate_weights(model, repaired, alpha)
            if blended is None:
                break
            judge(f"{name}@{alpha:g}", blended,
                  f"weights {alpha:g} of the way from the received model to the {name} repair",
                  began)
            if _qualifies(rows[-1], tolerance):
                break

    for index, method in enumerate(methods):
        if not try_all and rows and _qualifies(rows[-1], tolerance):
            notes.append(f"not run: {', '.join(methods[index:])} ({rows[-1]['method']} qualified "
                         "first; try_all=True runs them)")
            break
        if time_budget is not None and time.perf_counter() - started > time_budget:
            notes.append(f"skipped {method}: time budget of {time_budget:g} s spent")
            continue
        began = time.perf_counter()
        try:
            repaired, note = _RUNNERS[method](model, train, context)
        except _Skip as reason:
            notes.append(f"skipped {method}: {reason}")
            continue
        judged = len(rows)
        judge(method, repaired, note, began)
        stage = context["first_stages"].pop(method, None)
        if not rows[-1]["within_budget"]:
            # A repair in stages over the budget: first its first stage on its own (and that
            # one's interpolations), then the whole's interpolations.
            if stage is not None:
                judge(*stage, time.perf_counter())
                if not rows[-1]["within_budget"]:
                    judge_fractions(stage[0], stage[1])
            if not any(_qualifies(row, tolerance) for row in rows[judged:]):
                judge_fractions(method, repaired)
    table = pd.DataFrame(rows, columns=COLUMNS)
    chosen = _choose(table, tolerance) if len(table) else None
    base_signal = float(base_asr) if poisoned is not None else float(base_residual)
    kept = False
    if chosen is not None:
        signal = float(_signal(table[table["method"] == chosen]).iloc[0])
        if (signal > tolerance + 1e-12 and np.isfinite(base_signal)
                and signal > MIN_SIGNAL_REDUCTION * base_signal):
            what = "ASR" if poisoned is not None else "reversed-trigger residual"
            notes.append(f"no repair within the budget removed the backdoor signal (best: "
                         f"{chosen}, {what} {signal:.1%} against {base_signal:.1%} as "
                         "received); returning the model as received")
            chosen, kept = None, True
    elif len(table) == 0 or not table["within_budget"].any():
        if len(table):
            nearest = table.sort_values("drop_bound", kind="stable").iloc[0]
            notes.append(f"no method stayed within the accuracy budget of {budget:g} (smallest "
                         f"bound: {nearest['method']}, {nearest['drop_bound']:+.4f}); returning "
                         "the model as received (result.candidates holds every repair)")
            kept = True
        else:
            notes.append("no method ran; returning the model as received")
    if chosen is not None:
        table.loc[table["method"] == chosen, "chosen"] = True
        final = candidates[chosen]
        row = table[table["method"] == chosen].iloc[0]
        final_asr, final_signal = float(row["validation_asr"]), float(_signal(table[table["chosen"]]).iloc[0])
    else:
        final, final_asr = copy_model(model), float(base_asr)
        final_signal = float(base_asr) if poisoned is not None else float(base_residual)
    active = bool(not np.isnan(final_signal) and final_signal > tolerance)
    dense = _dense_repair_not_chosen(table, chosen, found, poisoned, budget, tolerance)
    if dense:
        notes.append(dense)
    if active:
        what = "ASR" if poisoned is not None else "reversed-trigger residual"
        notes.insert(0, f"backdoor still active on validation: {what} {final_signal:.1%} after "
                        f"{chosen or 'no repair'} (tolerance {tolerance:.1%})")
    verification = None
    if verify and found is not None and found.backdoor_found and chosen is not None:
        verification = context["verifications"].get(chosen)
        if verification is None:
            verification = _rescan(final, train, context, f"the chosen model ({chosen})")
            table.loc[table["method"] == chosen, "verified"] = not verification.backdoor_found
        if verification.backdoor_found:
            active = True
            notes.insert(0, f"backdoor may still be active: the scan of the repaired model "
                            f"still finds one ({verification.verdict})")
    if active:
        warnings.warn(notes[0], BackdoorStillActiveWarning, stacklevel=2)
    if found is None:
        verdict = "not scanned"
    elif found.backdoor_found:
        verdict = found.verdict
    else:
        verdict = "no backdoor found; repair requested"
    if chosen is not None:
        verdict += f"; repaired with {chosen}" + ("; backdoor may still be active" if active else "")
    elif kept:
        verdict += ("; no repair within the budget removed it, model returned unchanged"
                    if table["within_budget"].any() else
                    "; no repair stayed within the accuracy budget, model returned unchanged")
    elif len(table) == 0 and found is not None and not found.backdoor_found:
        verdict += "; no method ran, model returned unchanged"
    return DefenseResult(final, chosen, table, baseline, candidates, notes, settings,
                         backdoor_still_active=active,
                         validation_asr=None if poisoned is None else float(final_asr),
                         scan=found, verification=verification, verdict=verdict)
