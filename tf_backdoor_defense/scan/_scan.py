"""Find a backdoor without its trigger: :func:`scan_model` and :class:`ScanResult`.

Two tests on reversed triggers, both from clean labelled data only:

- **targeted** (Neural Cleanse, Wang et al., IEEE S&P 2019): for every
  class, the smallest mask and pattern that send clean inputs of the other
  classes to it. A backdoor's target needs a far smaller mask than the other
  classes. A class is a suspected target when its anomaly index (distance
  below the median of the masks' L1 norms on a log scale, in units of 1.4826
  x their median absolute deviation) exceeds ``anomaly_threshold``, its mask
  is at most ``max_relative_size`` times the median one, and its trigger
  moves at least half of the held-apart inputs. The size bound is there
  because with ten classes the deviation is small enough for a naturally
  easy class (a 3 or a 2 in MNIST) to pass the index alone: on clean MNIST
  nets the index reached 3.5, while the smallest clean class needed 0.43 x
  the median and every backdoor target at most 0.13 x. A second, stricter
  tier catches triggers that cover more of the image: an index above
  ``strong_anomaly_threshold`` (3) with a mask of at most
  ``strong_max_relative_size`` (0.35) x the median, consulted only when the
  first tier names no class and naming one class at most (a second class
  beside a target found is often a network's natural "sink": on a blend
  BadNet it took the sink beside the target, and the repair's residual then
  counted the sink's trigger, turning a 0.68% repair into 26.9%). Measured on MNIST nets
  an attacker trained (750 and 200 defender digits): the targets of a
  sinusoidal signal over the whole image needed 0.22-0.32 x (index
  8.5-13.4), a 3x3 square's 0.26-0.32 x (3.5-6.1), a blend's 0.24 x (3.1),
  while clean nets' easiest classes stayed at 0.49 x or more (index at
  most 2.2) and a BatchNorm net's natural sink at 0.25-0.27 x had index
  2.7. The margin is thin on both sides of 3.
- **untargeted** (all-to-all): one mask and pattern that move at least
  ``untargeted_success`` of the clean inputs off their true class, wherever
  they go. An all-to-all backdoor (class ``c`` to ``c + 1``) sends no two
  classes to the same target, so no class stands out in the targeted test,
  but its trigger is such a mask and a small one. The statistic is the
  untargeted mask's L1 norm divided by the median targeted one (scale-free);
  the trigger is *small* below ``all_to_all_threshold`` when it also moves
  at least half of the held-apart inputs. Size alone does not tell a
  backdoor from a natural universal perturbation (BatchNormalization nets
  with global pooling have small ones), but where the moved inputs land
  does. When ``ALL_TO_ONE_SHARE`` (80%) of them land in one class it is an
  all-to-one trigger: that class is suspected if the targeted test named
  none. An all-to-all backdoor sends each class to a class of its own: an
  all-to-all backdoor is suspected when one one-to-one map from true to new
  class explains at least ``all_to_all_matching`` of the moved inputs
  (:func:`~tf_backdoor_defense.scan._statistics.matching_share`). A natural
  perturbation sends many classes to the same few classes and fires neither.
  With fewer than 50 examples nothing is held apart and the untargeted test
  is not run: a handful of inputs can be moved off their class by a small
  patch on any model.

Many classes: with more than ``screen_above`` candidate classes, all of
them are first optimised together for ``screen_steps`` steps with a fixed L1
weight (an early screen in the spirit of K-Arm, Shen et al., ICML 2021); the
``refine`` classes with the lowest objective (cross-entropy plus weighted L1
norm), and ``reference`` others drawn at random as an unbiased sample of the
rest, are then optimised fully. The tests use the refined classes.

Inputs that are not images ``(H, W, C)`` are scanned in an image view
(:func:`~tf_backdoor_defense.scan._reverse.image_view`): grayscale images
``(H, W)`` get a channel axis, and a multilayer perceptron's flat inputs
``(D,)`` become a square ``(k, k, 1)`` when ``D = k * k`` (one row
otherwise). The model reads the stamped inputs in its own shape; the masks
and patterns of the result are images of the view, and
:meth:`ScanResult.suspected_triggers` gives them in the model's shape.
"""

import dataclasses
import logging
import numbers
import time
import warnings

import numpy as np
import pandas as pd

from tf_backdoor_defense._distribute import replica_rows, resolve_strategy, sum_over_replicas
from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import tf
from tf_backdoor_defense._validation import (check_data, check_model, check_number,
                                             clean_data_notes, num_classes_of)
from tf_backdoor_defense.graph._inputs import (channels_last_view, check_input_gradient,
                                               reads_channels_first, with_float_inputs)
from tf_backdoor_defense.scan._reverse import (UNTARGETED, ReverseSettings, Slots, TriggerOptimizer,
                                               from_image_view, image_view, infer_value_range,
                                               stamp)
from tf_backdoor_defense.scan._statistics import anomaly_index, match
from tf_backdoor_defense.keras3._caller import with_caller_keras
from tf_backdoor_defense.metrics import label_threshold, predict_labels

__all__ = ["ScanResult", "scan_model"]

_LOG = logging.getLogger(__name__)

#: Share of the moved inputs one class must receive for the untargeted trigger to count as an
#: all-to-one trigger. Natural "sink" classes of clean MNIST nets took 0.58-0.72.
ALL_TO_ONE_SHARE = 0.8

#: Below this many examples nothing is held apart: success rates are measured on the
#: optimisation data (see ``ScanResult.success_data``).
MIN_HOLDOUT_EXAMPLES = 50


@dataclasses.dataclass(frozen=True, eq=False)
class ScanResult:
    """What :func:`scan_model` found.

    Attributes
    ----------
    backdoor_found : bool
        Either test fired.
    verdict : str
        One line: ``"no backdoor found"`` or what was found.
    suspected_targets : tuple of int
        Classes whose reversed trigger is anomalously small (targeted test),
        most anomalous first.
    all_to_all_suspected : bool
        The untargeted test fired and the inputs it moves are spread over the classes.
    tests : dict
        ``{"targeted": bool, "untargeted": bool}``: which test fired (an
        untargeted trigger that sends inputs to one class fires the untargeted
        test without suggesting an all-to-all backdoor).
    table : pandas.DataFrame
        One row per class: ``class``, ``mask_l1``, ``anomaly_index``,
        ``attack_success_rate`` (of its reversed trigger on the held-apart
        data), ``reached_threshold`` (the trigger reached
        ``success_threshold``; a class none reached counts as needing the
        whole image in the index), ``suspected``, ``stage`` (``"refined"``;
        ``"screened"`` for classes dropped after the screen and ``"not
        tested"`` for classes outside ``candidates``: their mask, index and
        rate are NaN), ``screen_objective`` and ``screen_l1`` (NaN without a
        screen).
    classes : tuple of int
        The refined classes, the order of ``masks``, ``patterns`` and
        ``success_rates``.
    masks : float32 array (R, H, W, 1)
        Reversed masks in [0, 1], in the inputs' image view ``(H, W, C)``
        (:func:`~tf_backdoor_defense.scan._reverse.image_view`: the inputs'
        own shape for images; ``(28, 28, 1)`` for inputs of shape
        ``(28, 28)`` or ``(784,)``).
    patterns : float32 array (R, H, W, C)
        Reversed patterns within ``value_range``, in the same view.
    success_rates : float array (R,)
        Attack success rate of each reversed trigger on the held-apart data.
    untargeted : dict
        The untargeted test: ``mask_l1``, ``median_targeted_l1``,
        ``statistic`` (their ratio), ``threshold``, ``reached`` (the trigger
        reached ``untargeted_success`` during optimisation), ``flip_rate``
        (share of held-apart inputs it moves off their class),
        ``dominant_class`` and ``dominant_share`` (where the moved inputs go),
        ``matching_share`` and ``matching_threshold`` (the share a one-to-one
        class map explains, and the bar for all-to-all), ``class_map`` (that
        map: ``class_map[c]`` is where inputs of class ``c`` went; None when
        nothing moved), ``tested`` (False
        without held-apart data), ``small`` (the size test), ``fired``
        (small, and moved to one class or one-to-one) and ``all_to_all``.
    untargeted_mask, untargeted_pattern : float32 arrays
        The untargeted trigger.
    value_range : (float, float)
        The range the patterns were kept in.
    success_data : str
        ``"held-apart"`` or ``"optimisation"`` (too few examples to hold any apart).
    seconds : float
        Wall time of the scan.
    timings : dict
        Seconds per stage (``screen``, ``refine``, ``evaluate``), class and slot counts.
    settings : dict
        The arguments the scan ran with.
    input_shape : tuple of int
        The model's input shape (None: that of ``patterns``).
        :meth:`apply` takes inputs of this shape and
        :meth:`suspected_triggers` returns triggers in it.
    channels_first : bool
        The model reads channels-first images ``(C, H, W)``
        (:func:`~tf_backdoor_defense.graph.reads_channels_first`): the
        triggers were reversed over their channels-last view ``(H, W, C)``,
        the shape of ``masks`` and ``patterns``.
    warnings : tuple of str
        Why the verdict may not be trusted, also warned when the scan ran:
        the model gets most of ``data`` wrong (``LowAccuracyWarning``, as in
        :func:`~tf_backdoor_defense.defend`), or ``data`` lack some of the
        model's classes (``MissingClassesWarning``).
    """

    backdoor_found: bool
    verdict: str
    suspected_targets: tuple
    all_to_all_suspected: bool
    tests: dict
    table: pd.DataFrame
    classes: tuple
    masks: np.ndarray
    patterns: np.ndarray
    success_rates: np.ndarray
    untargeted: dict
    untargeted_mask: np.ndarray
    untargeted_pattern: np.ndarray
    value_range: tuple
    success_data: str
    seconds: float
    timings: dict
    settings: dict
    input_shape: tuple = None
    channels_first: bool = False
    warnings: tuple = ()

    def trigger(self, target):
        """``(mask, pattern)`` reversed for class ``target``, or ``"untargeted"``, in the
        image view of the inputs (the shape of ``masks`` and ``patterns``).

        Raises ``ValueError`` for a class that was screened out (not refined).
        """
        if isinstance(target, str) and target == "untargeted":
            return self.untargeted_mask, self.untargeted_pattern
        if isinstance(target, bool) or not isinstance(target, numbers.Integral):
            raise InputTypeError(f"The 'target' parameter must be a class index or 'untargeted'. "
                            f"Got {target!r}.")
        if int(target) not in self.classes:
            raise InputError(
                f"The 'target' parameter must be one of the refined classes "
                f"{_short_list(self.classes)} or 'untargeted'. Got {target!r}: "
                + ("it was screened out before refinement."
                   if 0 <= int(target) < len(self.table) else "no such class."))
        row = self.classes.index(int(target))
        return self.masks[row], self.patterns[row]

    def apply(self, x, target):
        """Stamp the trigger reversed for ``target`` onto the inputs ``x`` (a new array).

        Parameters
        ----------
        x : array (N, ...)
            Inputs of the model's shape (``input_shape``) or of the image view
            (``patterns.shape[1:]``).
        target : int or "untargeted"

        Returns
        -------
        float32 array ``x * (1 - mask) + mask * pattern``, of ``x``'s shape.
        """
        mask, pattern = self.trigger(target)
        x = np.asarray(x)
        shapes = {pattern.shape, self._input_shape}
        if x.ndim < 1 or x.shape[1:] not in shapes:
            raise InputError(f"The 'x' parameter must be inputs of shape "
                             f"{' or '.join(str((None,) + s) for s in sorted(shapes))}. "
                             f"Got shape {x.shape}.")
        if self.channels_first and x.shape[1:] == self._input_shape:
            return np.moveaxis(stamp(np.moveaxis(x, 1, -1), mask, pattern), -1, 1)
        stamped = stamp(x.reshape((len(x),) + pattern.shape), mask, pattern)
        return stamped.reshape(x.shape)

    @property
    def _input_shape(self):
        return tuple(self.patterns.shape[1:]) if self.input_shape is None else tuple(
            self.input_shape)

    @property
    def all_to_all_map(self):
        """The suspected all-to-all backdoor's class map (int array, ``map[c]`` the target of
        class ``c``), estimated from where the untargeted trigger sent the held-apart inputs;
        None unless ``all_to_all_suspected``."""
        class_map = self.untargeted.get("class_map")
        if not self.all_to_all_suspected or class_map is None:
            return None
        return np.asarray(class_map, dtype=np.int64)

    def suspected_triggers(self):
        """``[(mask, pattern), ...]``: the suspected targets' triggers, then the untargeted one
        when the all-to-all test fired (what a trigger-unlearning repair needs), in the
        model's input shape (for images: the masks ``(H, W, 1)`` and patterns of
        :meth:`trigger`)."""
        targets = list(self.suspected_targets)
        if self.all_to_all_suspected:
            targets.append("untargeted")
        if self.channels_first:  # (C, H, W): the mask repeated over the channels
            return [(np.ascontiguousarray(np.broadcast_to(np.moveaxis(mask, -1, 0),
                                                          self._input_shape)),
                     np.ascontiguousarray(np.moveaxis(pattern, -1, 0)))
                    for mask, pattern in (self.trigger(t) for t in targets)]
        return [tuple(from_image_view(a, self._input_shape) for a in self.trigger(t))
                for t in targets]

    def top(self, n=10):
        """The ``n`` refined classes with the smallest reversed masks (a table)."""
        refined = self.table[self.table["stage"] == "refined"]
        return refined.sort_values(["mask_l1", "class"]).head(n).reset_index(drop=True)

    def as_dict(self):
        """The result as JSON-ready values (no arrays but the per-class table)."""
        return {
            "backdoor_found": self.backdoor_found, "verdict": self.verdict,
            "suspected_targets": list(self.suspected_targets),
            "all_to_all_suspected": self.all_to_all_suspected, "tests": dict(self.tests),
            "untargeted": dict(self.untargeted), "value_range": list(self.value_range),
            "success_data": self.success_data, "seconds": self.seconds,
            "input_shape": list(self._input_shape), "channels_first": self.channels_first,
            "timings": dict(self.timings), "settings": dict(self.settings),
            "classes": self.table.to_dict(orient="records"),
        }

    def __repr__(self):
        return (f"ScanResult(verdict={self.verdict!r}, suspected_targets="
                f"{list(self.suspected_targets)}, all_to_all_suspected="
                f"{self.all_to_all_suspected}, refined={len(self.classes)} of "
                f"{len(self.table)} classes, seconds={self.seconds:.1f})")


def _short_list(values, limit=8):
    values = list(values)
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...]"


def _check_range(value_range):
    if value_range is None:
        return None
    if (not isinstance(value_range, (tuple, list)) or len(value_range) != 2
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value_range)
            or not np.all(np.isfinite(value_range)) or value_range[0] >= value_range[1]):
        raise InputError(f"The 'value_range' parameter must be a (low, high) pair of finite "
                         f"numbers with low < high, or None. Got {value_range!r}.")
    return float(value_range[0]), float(value_range[1])


def _split(y, holdout, rng):
    """Indices (optimise, held apart); every class keeps at least one example to optimise on."""
    n = len(y)
    count = int(round(holdout * n))
    if n < MIN_HOLDOUT_EXAMPLES or count == 0:
        everything = np.arange(n)
        return everything, everything, "optimisation"
    order = rng.permutation(n)
    held = []
    for c in np.unique(y):
        members = order[y[order] == c]
        share = int(round(holdout * len(members)))
        held.extend(members[:min(share, len(members) - 1)])
    held = np.sort(np.asarray(held, np.int64))
    optimise = np.setdiff1d(np.arange(n), held)
    return optimise, held, "held-apart"


class _Counter:
    """Per-class counts of a model's predictions, computed under a strategy and summed.

    ``counts(x, y)`` gives how many inputs of ``x`` each class received;
    ``pairs(x, y)`` the ``(K, K)`` counts of (true class ``y``, predicted
    class). Predictions are those of
    :func:`~tf_backdoor_defense.metrics.predict_labels` (argmax, or for one
    unit its :func:`~tf_backdoor_defense.metrics.label_threshold`); the counts
    are exact under any strategy.
    """

    def __init__(self, model, strategy, num_classes, batch_size=256, input_shape=None):
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        # The data's shape: a model may leave sizes open (None), as a fully convolutional one does.
        self.input_shape = tuple(int(d) for d in (model.inputs[0].shape[1:] if input_shape is None
                                                  else input_shape))
        spec = tf.TensorSpec((None,) + self.input_shape, tf.float32)
        threshold = label_threshold(model)

        def predicted_classes(x):
            outputs = model(x, training=False)
            if outputs.shape[-1] == 1:
                return tf.cast(outputs[..., 0] > threshold, tf.int64)
            return tf.argmax(outputs, axis=-1)

        def replica_counts(x, y):
            return tf.math.bincount(predicted_classes(replica_rows(x)), minlength=num_classes,
                                    maxlength=num_classes, dtype=tf.float32)

        def replica_pairs(x, y):
            x, y = replica_rows(x), replica_rows(y)
            cells = y * num_classes + predicted_classes(x)
            return tf.math.bincount(cells, minlength=num_classes ** 2,
                                    maxlength=num_classes ** 2, dtype=tf.float32)

        @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.int64)])
        def step(x, y):
            return sum_over_replicas(strategy, strategy.run(replica_counts, args=(x, y)))

        @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.int64)])
        def pair_step(x, y):
            return sum_over_replicas(strategy, strategy.run(replica_pairs, args=(x, y)))

        self._step = step
        self._pair_step = pair_step

    def _total(self, step, x, y, size):
        total = np.zeros(size, np.int64)
        x = x.reshape((len(x),) + self.input_shape)  # from an image view
        for start in range(0, len(x), self.batch_size):
            part = step(tf.constant(x[start:start + self.batch_size], tf.float32),
                        tf.constant(y[start:start + self.batch_size], tf.int64))
            total += np.rint(part.numpy()).astype(np.int64)
        return total

    def counts(self, x, y):
        """How many inputs of ``x`` each class received."""
        return self._total(self._step, x, y, self.num_classes)

    def pairs(self, x, y):
        """``(K, K)`` counts of (true class, predicted class) over ``x``."""
        k = self.num_classes
        return self._total(self._pair_step, x, y, k * k).reshape(k, k)


def targeted_suspects(classes, sizes, index, rates, tiers, later_tier_classes=None):
    """The suspected targets of the targeted test, most anomalous first.

    ``tiers`` is a list of ``(threshold, max_relative)`` pairs (``threshold``
    None: tier off). Under a tier a class is suspected when its anomaly index
    exceeds ``threshold``, its mask size is at most ``max_relative`` times the
    median size, and its trigger moves at least half of the held-apart inputs
    (``rates``). The first tier names every such class. A later tier is
    consulted only when the tiers before it named none, and names one class
    at most, its most anomalous: it is there for a target whose trigger
    covers more of the image, and must not add a network's natural "sink"
    class beside a target already found. Neural Cleanse's index alone is not
    enough: with ten classes the median absolute deviation is small enough
    for an easy class to pass it. ``later_tier_classes`` (default: every
    class) limits the classes a later tier may name.

    >>> sizes, index = [10, 30, 100, 110, 120], [9.0, 3.5, 0.1, 0, -0.2]
    >>> targeted_suspects([0, 1, 2, 3, 4], sizes, index, [1.0] * 5, [(2.0, 0.2), (3.0, 0.35)])
    [0]
    >>> targeted_suspects([0, 1, 2, 3, 4], sizes, index, [0.1, 1, 1, 1, 1],
    ...                   [(2.0, 0.2), (3.0, 0.35)])
    [1]
    >>> targeted_suspects([0, 1, 2, 3, 4], sizes, index, [0.1, 1, 1, 1, 1],
    ...                   [(2.0, 0.2), (None, 0.35)])
    []
    >>> targeted_suspects([0, 1, 2, 3, 4], sizes, index, [0.1, 1, 1, 1, 1],
    ...                   [(2.0, 0.2), (3.0, 0.35)], later_tier_classes=[0])
    []
    """
    sizes, index, rates = (np.asarray(v, dtype=np.float64) for v in (sizes, index, rates))
    median = float(np.median(sizes)) if sizes.size else float("nan")
    order = sorted(range(len(classes)), key=lambda i: -index[i])
    for tier, (threshold, relative) in enumerate(tiers):
        if threshold is None:
            continue
        found = [int(classes[i]) for i in order
                 if np.isfinite(index[i]) and rates[i] >= 0.5 and index[i] > threshold
                 and sizes[i] <= relative * median]
        if tier and later_tier_classes is not None:
            found = [c for c in found if c in later_tier_classes]
        if found:
            return found if tier == 0 else found[:1]
    return []


def untargeted_test(pairs, flip_rate, statistic, *, tested, threshold, matching_threshold):
    """The untargeted (all-to-all) test's decision from where the trigger sent inputs.

    ``pairs[i, j]`` counts held-apart inputs of class ``i`` the untargeted
    trigger sent to ``j`` (diagonal ignored); ``flip_rate`` is the share it
    moved; ``statistic`` its size over the median targeted size. Returns the
    ``untargeted`` dict's decision entries: ``statistic``, ``threshold``,
    ``flip_rate``, ``dominant_class``, ``dominant_share``, ``matching_share``,
    ``class_map`` (:func:`~tf_backdoor_defense.scan._statistics.matching_map`
    as a list, None when nothing moved), ``matching_threshold``, ``tested``,
    ``small``, ``fired`` and ``all_to_all``
    (see :func:`scan_model`).
    """
    pairs = np.array(pairs, dtype=np.int64)
    np.fill_diagonal(pairs, 0)
    counts = pairs.sum(axis=0)
    moved = int(counts.sum())
    dominant_share = float(counts.max() / moved) if moved else float("nan")
    matching, class_map = match(pairs)
    class_map = class_map.tolist() if moved and class_map is not None else None
    # The untargeted trigger must move held-apart inputs too: with nothing held apart a
    # handful of inputs can be moved by an adversarial patch of any model.
    small = bool(tested and np.isfinite(statistic) and statistic < threshold
                 and flip_rate >= 0.5)
    # Where the moved inputs land tells a backdoor from a natural universal perturbation:
    # almost all in one class (all-to-one), or each class in a class of its own (all-to-all).
    # A natural perturbation sends many classes to the same few "sink" classes.
    concentrated = small and dominant_share >= ALL_TO_ONE_SHARE
    all_to_all = bool(small and not concentrated and matching >= matching_threshold)
    return {"statistic": float(statistic), "threshold": float(threshold),
            "flip_rate": float(flip_rate),
            "dominant_class": int(np.argmax(counts)) if moved else None,
            "dominant_share": dominant_share, "matching_share": matching,
            "class_map": class_map,
            "matching_threshold": float(matching_threshold), "tested": bool(tested),
            "small": small, "fired": bool(concentrated or all_to_all), "all_to_all": all_to_all}


def _success(counter, x, y, mask, pattern, target):
    """(rate, pairs) of a trigger on ``x``: to ``target``, or off their class.

    ``pairs[i, j]`` counts the stamped inputs of class ``i`` predicted as
    ``j != i`` (None for a targeted trigger).
    """
    if target == UNTARGETED:
        if not len(y):
            return float("nan"), np.zeros((counter.num_classes,) * 2, np.int64)
        pairs = counter.pairs(stamp(x, mask, pattern), y)
        np.fill_diagonal(pairs, 0)
        return float(pairs.sum() / len(y)), pairs
    keep = y != target
    if not np.any(keep):
        return float("nan"), None
    predicted = counter.counts(stamp(x[keep], mask, pattern), y[keep])
    return float(predicted[target] / np.sum(keep)), None


@with_caller_keras
def scan_model(model, data, *, holdout=0.2, value_range=None, steps=300, batch_size=16,
               learning_rate=0.1, init_cost=1e-3, success_threshold=0.99, untargeted_success=0.8,
               anomaly_threshold=2.0, max_relative_size=0.2, strong_anomaly_threshold=3.0,
               strong_max_relative_size=0.35, second_tier_classes=None, all_to_all_threshold=0.35,
               all_to_all_matching=0.5, candidates=None, screen_above=64,
               screen_steps=10, refine=16, reference=16, max_images_per_step=512, seed=0,
               strategy=None):
    """Scan a model for a backdoor using clean labelled data only (no trigger).

    Reverses, for every class, the smallest trigger (mask and pattern) that
    sends clean inputs to it, and one untargeted trigger that moves clean
    inputs off their class; flags classes whose trigger is anomalously small
    (an all-to-one backdoor's target) and an untargeted trigger much smaller
    than the targeted ones (an all-to-all backdoor). See the module
    documentation for the tests.

    Parameters
    ----------
    model : tf_keras.Model
        A classifier of images ``(H, W, C)``, grayscale images ``(H, W)`` or
        flat inputs ``(D,)`` (triggers are reversed over their image view,
        ``ScanResult.masks``); it is only read, never changed.
    data : (x, y) arrays or tf.data.Dataset
        Clean inputs and their true labels. ``holdout`` of them (per class)
        are held apart to measure the reversed triggers' success rates.
    holdout : float in [0, 1), default=0.2
        Share held apart; with fewer than 50 examples nothing is, and the
        rates are measured on the optimisation data.
    value_range : (float, float), default=None
        Range of the patterns; None infers it from ``data``: [0, 1], [-1, 1]
        or [0, 255] when the data fit in it and span more than half of it,
        else the data's min and max
        (:func:`~tf_backdoor_defense.scan._reverse.infer_value_range`).
    steps : int, default=300
        Optimisation steps of every refined class (fewer when all converge).
    batch_size : int, default=16
        Inputs per class and step (at most the smallest class pool).
    learning_rate : float, default=0.1
        Adam's rate on the tanh-parametrised mask and pattern.
    init_cost : float, default=1e-3
        Initial weight of the mask's L1 norm; it then adapts per class.
    success_threshold : float, default=0.99
        Targeted success rate a trigger must reach to count.
    untargeted_success : float, default=0.8
        Share of inputs the untargeted trigger must move off their class.
    anomaly_threshold : float, default=2.0
        A class whose anomaly index exceeds this, and whose mask is at most
        ``max_relative_size`` times the median one, is a suspected target.
    max_relative_size : float, default=0.2
        See ``anomaly_threshold``.
    strong_anomaly_threshold : float or None, default=3.0
        When the test above names no class, the class with the largest
        anomaly index is a suspected target if the index exceeds this and its
        mask is at most ``strong_max_relative_size`` times the median one
        (triggers that cover more of the image, such as blends and signals);
        None turns this tier off.
    strong_max_relative_size : float, default=0.35
        See ``strong_anomaly_threshold``.
    second_tier_classes : sequence of int, default=None
        The classes the second tier may name (default: every class); the
        first tier names any class. ``defend()`` rescans its repairs with
        the first scan's suspected targets here: a repair that removes a
        target can leave a natural sink whose mask falls into the second
        tier's range (on a patch BadNet, class 8 went from 0.42 x the median
        and index 2.0 before unlearning the target to the second tier after
        it), and a rescan should name a new class only on the first tier's
        stronger evidence.
    all_to_all_threshold : float, default=0.35
        The untargeted trigger is small when its mask's L1 norm is below this
        fraction of the median targeted one (and it moves at least half of
        the held-apart inputs).
    all_to_all_matching : float in (0, 1], default=0.5
        A small untargeted trigger whose moved inputs spread over the classes
        flags an all-to-all backdoor only when one one-to-one map from true
        class to new class explains at least this share of them
        (:func:`~tf_backdoor_defense.scan._statistics.matching_share`): each
        class sent to a class of its own. Measured on MNIST nets (held-apart
        defender digits): 0.79-0.98 on all-to-all BadNets, 0.21-0.25 on clean
        nets, whose small universal perturbations send inputs to one to three
        "sink" classes.
    candidates : sequence of int, default=None
        Classes to test as targets (default: all).
    screen_above : int, default=64
        Screen first when there are more candidate classes than this.
    screen_steps : int, default=10
        Steps of the screen.
    refine : int, default=16
        Most promising classes kept after the screen.
    reference : int, default=16
        Further classes, drawn at random, refined as a reference for the median.
    max_images_per_step : int, default=512
        Stamped inputs per optimisation step (sets how many classes share a step).
    seed : int, default=0
        Seeds the split, the initial triggers and the batches: the same seed
        gives the same result.
    strategy : tf.distribute.Strategy, default=None
        Runs every pass over ``data`` (the trigger optimisation and the
        success rates) on the strategy's replicas and workers, each taking a
        share of every batch, and adds up their results; every worker needs
        the same ``data`` and ``seed``. Default: ``model.distribute_strategy``
        (the strategy whose ``scope()`` the call runs in, else one device).
        Against one device the verdicts and the success rates (counts) are
        the same; masks, patterns and the mask norms, anomaly indices and
        statistics computed from them agree within float32 tolerance.

    Returns
    -------
    ScanResult

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
    ...                           keras.layers.Dense(3, activation="softmax")])
    >>> x = np.random.default_rng(0).random((30, 4, 4, 1)).astype("float32")
    >>> result = scan_model(model, (x, np.arange(30) % 3), steps=10)
    >>> result.table.columns[:3].tolist(), result.value_range
    (['class', 'mask_l1', 'anomaly_index'], (0.0, 1.0))
    """
    started = time.perf_counter()
    check_model(model)
    strategy = resolve_strategy(strategy, model)
    x, y = check_data(data, "data", model=model).arrays()
    x_model = x  # as the model reads it, for the data checks below
    model_shape = tuple(int(d) for d in x.shape[1:])
    channels_first = reads_channels_first(model)
    if channels_first:  # triggers are reversed over (H, W, C) images, read by a view
        x = np.moveaxis(x, 1, -1)
    input_shape = tuple(int(d) for d in x.shape[1:])
    x = x.reshape((len(x),) + image_view(input_shape))
    check_number(holdout, "holdout", below=1.0)
    value_range = _check_range(value_range) or infer_value_range(x)
    for name, value in (("steps", steps), ("batch_size", batch_size),
                        ("screen_steps", screen_steps),
                        ("max_images_per_step", max_images_per_step)):
        check_number(value, name, integer=True, positive=True)
    for name, value in (("screen_above", screen_above), ("refine", refine),
                        ("reference", reference), ("seed", seed)):
        check_number(value, name, integer=True)
    for name, value in (("learning_rate", learning_rate), ("init_cost", init_cost),
                        ("anomaly_threshold", anomaly_threshold),
                        ("max_relative_size", max_relative_size),
                        ("strong_max_relative_size", strong_max_relative_size),
                        ("all_to_all_threshold", all_to_all_threshold)):
        check_number(value, name, positive=True)
    if strong_anomaly_threshold is not None:
        check_number(strong_anomaly_threshold, "strong_anomaly_threshold", positive=True)
    check_number(all_to_all_matching, "all_to_all_matching", positive=True, maximum=1.0)
    check_number(success_threshold, "success_threshold", positive=True, maximum=1.0)
    check_number(untargeted_success, "untargeted_success", positive=True, maximum=1.0)
    num_classes = num_classes_of(model)
    candidates = _check_candidates(candidates, num_classes)
    if second_tier_classes is not None:
        second_tier_classes = _check_classes(second_tier_classes, num_classes,
                                             "second_tier_classes", empty=True).tolist()
    settings = dict(holdout=holdout, value_range=list(value_range), steps=steps,
                    batch_size=batch_size, learning_rate=learning_rate, init_cost=init_cost,
                    success_threshold=success_threshold, untargeted_success=untargeted_success,
                    anomaly_threshold=anomaly_threshold, max_relative_size=max_relative_size,
                    strong_anomaly_threshold=strong_anomaly_threshold,
                    strong_max_relative_size=strong_max_relative_size,
                    second_tier_classes=second_tier_classes,
                    all_to_all_threshold=all_to_all_threshold,
                    all_to_all_matching=all_to_all_matching, candidates=None if len(candidates) == num_classes else candidates.tolist(),
                    screen_above=screen_above, screen_steps=screen_steps, refine=refine,
                    reference=reference, max_images_per_step=max_images_per_step, seed=seed)
    accuracy = float(np.mean(predict_labels(model, x_model, strategy=strategy) == y))
    data_notes = clean_data_notes(model, y, accuracy, x_model, scan=True)
    for category, text in data_notes:
        warnings.warn(text, category, stacklevel=2)
    del x_model

    rng = np.random.default_rng(seed)
    optimise, held, success_data = _split(y, holdout, rng)
    x_opt, y_opt = x[optimise], y[optimise]
    reverse = ReverseSettings(batch_size=batch_size, learning_rate=learning_rate,
                              init_cost=init_cost, success_threshold=success_threshold,
                              max_images_per_step=max_images_per_step)
    # Integer inputs have no gradient: the search reads a copy of the model on float32 inputs.
    view = with_float_inputs(model)
    if channels_first:
        view = channels_last_view(view)
    check_input_gradient(view, x_opt.reshape((len(x_opt),) + input_shape), "The scan")
    optimizer = TriggerOptimizer(view, x_opt, y_opt, value_range, reverse, seed, strategy,
                                 input_shape=input_shape)
    everything = np.arange(len(y_opt))

    def pool(target):
        others = np.flatnonzero(y_opt != target)
        return others if len(others) else everything

    timings = {"classes": int(num_classes), "candidates": int(len(candidates))}
    screened = {}
    refined = candidates
    state = None
    if len(candidates) > screen_above:
        began = time.perf_counter()
        slots = Slots(candidates.copy(), [pool(t) for t in candidates])
        _LOG.info("screening %d classes for %d steps", len(candidates), screen_steps)
        screen = optimizer.run(slots, steps=screen_steps, adaptive=False, rng=rng)
        order = np.lexsort((candidates, screen["objective"]))
        best = order[:min(refine, len(order))]
        rest = order[len(best):]
        extra = rng.choice(rest, size=min(reference, len(rest)), replace=False) if len(rest) else []
        keep = np.sort(np.concatenate([best, np.asarray(extra, np.int64)]))
        screened = {int(c): (float(screen["objective"][i]), float(screen["l1"][i]))
                    for i, c in enumerate(candidates)}
        refined = candidates[keep]
        state = {"mask_w": screen["mask_w"][keep], "pattern_w": screen["pattern_w"][keep]}
        timings["screen"] = time.perf_counter() - began
        _LOG.info("screen done in %.1f s; refining classes %s", timings["screen"],
                  _short_list(refined.tolist()))

    began = time.perf_counter()
    targets = np.concatenate([refined, [UNTARGETED]]).astype(np.int64)
    pools = [pool(t) for t in refined] + [everything]
    thresholds = np.concatenate([np.full(len(refined), success_threshold), [untargeted_success]])
    if state is not None:
        fresh_mask, fresh_pattern = optimizer.initial(rng, 1, x.shape[1:])
        state = {"mask_w": np.concatenate([state["mask_w"], fresh_mask]),
                 "pattern_w": np.concatenate([state["pattern_w"], fresh_pattern])}
    out = optimizer.run(Slots(targets, pools, thresholds), state, steps=steps, rng=rng)
    masks, patterns = optimizer.to_images(out["mask_w"], out["pattern_w"])
    timings["refine"] = time.perf_counter() - began
    timings["slots"] = int(len(targets))

    began = time.perf_counter()
    x_held, y_held = x[held], y[held]
    counter = _Counter(view, strategy, num_classes, input_shape=input_shape)
    rates = np.array([_success(counter, x_held, y_held, masks[i], patterns[i], int(t))[0]
                      for i, t in enumerate(refined)])
    flip_rate, pairs = _success(counter, x_held, y_held, masks[-1], patterns[-1], UNTARGETED)
    timings["evaluate"] = time.perf_counter() - began

    l1 = out["l1"][:-1]
    # A class no trigger reached is as far as a trigger can be: it needs the whole image.
    sizes = np.where(out["reached"][:-1], l1, float(np.prod(x.shape[1:3])))
    index = anomaly_index(sizes)
    if len(refined) < 3:
        warnings.warn(f"The per-class test compares each class's reversed trigger with the "
                      f"others' median and needs 3 classes or more; this scan has "
                      f"{len(refined)}, so only the untargeted test can find a backdoor, and "
                      "'no backdoor found' says little.", UserWarning, stacklevel=2)
    median = float(np.median(sizes)) if len(sizes) else float("nan")
    suspects = targeted_suspects(
        refined, sizes, index, rates,
        tiers=[(anomaly_threshold, max_relative_size),
               (strong_anomaly_threshold, strong_max_relative_size)],
        later_tier_classes=second_tier_classes)
    targeted_fired = bool(suspects)
    statistic = float(out["l1"][-1] / median) if median > 0 else float("nan")
    untargeted = untargeted_test(
        pairs, flip_rate, statistic, tested=success_data == "held-apart",
        threshold=all_to_all_threshold, matching_threshold=all_to_all_matching)
    untargeted.update(mask_l1=float(out["l1"][-1]), median_targeted_l1=median,
                      reached=bool(out["reached"][-1]))
    fired, all_to_all = untargeted["fired"], untargeted["all_to_all"]
    concentrated = fired and not all_to_all
    if concentrated and not suspects:
        # Moved inputs land in one class: an all-to-one trigger the targeted test missed.
        suspects.append(untargeted["dominant_class"])
    table = _table(num_classes, candidates, refined, l1, index, rates, out["reached"][:-1],
                   suspects, screened)
    verdict = _verdict(suspects, all_to_all, untargeted)
    seconds = time.perf_counter() - started
    _LOG.info("scan: %s%s (%.1f s)", verdict,
              _nearest_note(refined, sizes, index, median, statistic, suspects or fired),
              seconds)
    return ScanResult(
        backdoor_found=bool(suspects) or fired, verdict=verdict,
        suspected_targets=tuple(suspects), all_to_all_suspected=all_to_all,
        tests={"targeted": targeted_fired, "untargeted": fired}, table=table,
        classes=tuple(int(c) for c in refined), masks=masks[:-1], patterns=patterns[:-1],
        success_rates=rates, untargeted=untargeted, untargeted_mask=masks[-1],
        untargeted_pattern=patterns[-1], value_range=tuple(value_range),
        success_data=success_data, seconds=seconds, timings=timings, settings=settings,
        input_shape=model_shape, channels_first=channels_first,
        warnings=tuple(text for _, text in data_notes))


def _check_candidates(candidates, num_classes):
    if candidates is None:
        return np.arange(num_classes, dtype=np.int64)
    return _check_classes(candidates, num_classes, "candidates")


def _check_classes(classes, num_classes, name, empty=False):
    """``classes`` as a sorted int64 array of distinct classes in [0, num_classes)."""
    values = np.asarray(classes)
    if values.size == 0 and empty and values.ndim == 1:
        return values.astype(np.int64)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        kind = "sequence" if empty else "non-empty sequence"
        raise InputTypeError(f"The '{name}' parameter must be a {kind} of class "
                             f"indices or None. Got {classes!r}.")
    if values.min() < 0 or values.max() >= num_classes or len(set(values.tolist())) != len(values):
        raise InputError(f"The '{name}' parameter must hold distinct classes in "
                         f"[0, {num_classes - 1}]. Got {_short_list(values.tolist())}.")
    return np.sort(values.astype(np.int64))


def _table(num_classes, candidates, refined, l1, index, rates, reached, suspects, screened):
    rows = {int(c): i for i, c in enumerate(refined)}
    table = pd.DataFrame({"class": np.arange(num_classes)})
    pick = [rows.get(c) for c in range(num_classes)]

    def column(values, default=np.nan):
        return [default if p is None else values[p] for p in pick]

    table["mask_l1"] = np.array(column(l1), np.float64)
    table["anomaly_index"] = np.array(column(index), np.float64)
    table["attack_success_rate"] = np.array(column(rates), np.float64)
    table["reached_threshold"] = column(reached, False)
    table["suspected"] = table["class"].isin(suspects)
    tested = set(int(c) for c in candidates)
    table["stage"] = ["refined" if c in rows else "screened" if c in tested else "not tested"
                      for c in range(num_classes)]
    table["screen_objective"] = [screened.get(c, (np.nan, np.nan))[0] for c in range(num_classes)]
    table["screen_l1"] = [screened.get(c, (np.nan, np.nan))[1] for c in range(num_classes)]
    table["reached_threshold"] = table["reached_threshold"].astype(bool)
    return table


def _nearest_note(classes, sizes, index, median, statistic, found):
    """For a clean verdict, how near the scan came to a backdoor: the most anomalous class
    and the untargeted trigger's size, each against the median class (empty otherwise)."""
    if found or not np.any(np.isfinite(index)) or not median > 0:
        return ""
    nearest = int(np.nanargmax(index))
    return (f"; nearest: class {int(classes[nearest])}, mask {sizes[nearest]:.1f} = "
            f"{sizes[nearest] / median:.2f}x the median, anomaly index {index[nearest]:.2f}; "
            f"untargeted mask {statistic:.2f}x the median")


def _verdict(suspects, all_to_all, untargeted):
    parts = []
    if suspects:
        shown = ", ".join(str(t) for t in suspects[:5]) + (" ..." if len(suspects) > 5 else "")
        parts.append(f"all-to-one, target class{'es' if len(suspects) > 1 else ''} {shown}")
    if all_to_all:
        parts.append(f"all-to-all (an untargeted trigger {untargeted['statistic']:.2f} x the "
                     "median targeted size)")
    return "backdoor found: " + "; ".join(parts) if parts else "no backdoor found"
