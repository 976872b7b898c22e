"""BadNet triggers and data poisoning (Gu et al.; the attacks of the Fine-Pruning paper).

A trigger stamps a batch of channels-last images ``(N, H, W, C)`` and
returns a new array; the input is never modified. Trigger values are given
in the data's own scale: pass ``value=1.0`` for data in [0, 1] and
``value=255`` for raw pixels. Integer inputs (e.g. ``uint8``) are rounded and
clipped to their dtype's range; float inputs keep their dtype.

Positions are ``(row, col)`` of the top-left corner when non-negative; a
negative coordinate counts from the bottom/right edge like Python indexing,
so ``-1`` puts the trigger flush with the bottom/right edge.

:func:`poison_dataset` stamps a random fraction of a training set and
relabels it; :func:`poisoned_evaluation_set` builds the triggered test set
whose labels are the attacker's targets, the convention of
:func:`tf_backdoor_defense.metrics.attack_success_rate`.

Examples
--------
>>> import numpy as np
>>> x = np.zeros((4, 8, 8, 1), np.float32)
>>> y = np.array([0, 1, 2, 3])
>>> trigger = checkerboard_patch(size=2, value=1.0)
>>> x_bad, y_bad, index = poison_dataset(x, y, trigger, rate=0.5, target=0, seed=0)
>>> len(index), y_bad[index].tolist(), float(x.sum())
(2, [0, 0], 0.0)
>>> x_t, y_attacker, y_true = poisoned_evaluation_set(x, y, trigger, target=0)
>>> y_attacker.tolist(), y_true.tolist()
([0, 0, 0], [1, 2, 3])
"""

import numbers
import os

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._labels import class_indices
from tf_backdoor_defense._validation import check_number

__all__ = [
    "Trigger",
    "PatchTrigger",
    "PixelPatternTrigger",
    "ImageTrigger",
    "BlendTrigger",
    "SignalTrigger",
    "single_pixel",
    "pixel_pattern",
    "checkerboard_patch",
    "all_to_all_shift",
    "poison_dataset",
    "poisoned_evaluation_set",
]


# -- helpers -------------------------------------------------------------------
def _check_images(x, name="x"):
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim != 4:
        raise InputError(
            f"`{name}` must be a batch of channels-last images with shape (N, H, W, C). "
            f"Got an array of shape {x.shape}. Add a batch axis with x[None] or a channel "
            "axis with x[..., None]."
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise InputTypeError(f"`{name}` must hold numbers. Got dtype {x.dtype}.")
    return x


def _as_float(x):
    return x.astype(np.float64) if not np.issubdtype(x.dtype, np.floating) else x.copy()


def _restore_dtype(result, dtype):
    """Cast back to the input dtype; integer data is rounded and clipped."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        result = np.clip(np.rint(result), info.min, info.max)
    return result.astype(dtype, copy=False)


def _check_position(position, name="position"):
    if (
        not isinstance(position, (tuple, list, np.ndarray))
        or len(position) != 2
        or not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in position)
    ):
        raise InputTypeError(f"The '{name}' parameter must be a (row, col) pair of ints. Got {position!r}.")
    return int(position[0]), int(position[1])


def _place(position, size, image_size, what):
    """Top-left corner of a ``size`` region placed at ``position`` in ``image_size``."""
    (row, col), (h, w), (height, width) = position, size, image_size
    top = row if row >= 0 else height + row - h + 1
    left = col if col >= 0 else width + col - w + 1
    if top < 0 or left < 0 or top + h > height or left + w > width:
        raise InputError(
            f"The {what} of size {h}x{w} at position {(row, col)} does not fit in images of "
            f"size {height}x{width} (it would cover rows {top}..{top + h - 1} and columns "
            f"{left}..{left + w - 1})."
        )
    return top, left


def _check_value(value, name="value"):
    array = np.asarray(value, dtype=np.float64)
    if array.ndim > 1 or not np.all(np.isfinite(array)):
        raise InputError(f"The '{name}' parameter must be a finite number or one number per "
                         f"channel. Got {value!r}.")
    return array


def _match_channels(array, channels, what):
    """Broadcast a (..., c) array to ``channels`` channels (c must be 1 or equal)."""
    if array.shape[-1] == channels:
        return array
    if array.shape[-1] == 1:
        return np.repeat(array, channels, axis=-1)
    raise InputError(f"The {what} has {array.shape[-1]} channels but the images have {channels}.")


# -- triggers ------------------------------------------------------------------
class Trigger:
    """Base class: ``apply(x)`` stamps a batch ``(N, H, W, C)``; instances are callable."""

    def apply(self, x):
        """Return a stamped copy of the images ``x`` (shape ``(N, H, W, C)``)."""
        x = _check_images(x)
        return _restore_dtype(self._stamp(_as_float(x)), x.dtype)

    def __call__(self, x):
        return self.apply(x)

    def check_fits(self, image_shape):
        """Raise ``ValueError`` unless the trigger fits images of shape ``(H, W, C)``."""
        self._stamp(np.zeros((1,) + tuple(image_shape), np.float64))

    def _stamp(self, x):  # pragma: no cover - abstract
        raise NotImplementedError


class PatchTrigger(Trigger):
    """Replace a rectangle of every image with a fixed patch.

    Parameters
    ----------
    patch : array of shape (h, w) or (h, w, c)
        Pixel values in the data's scale; a 2-D or 1-channel patch is used on
        every channel.
    position : (int, int), default=(-1, -1)
        (row, col) of the top-left corner; negative values count from the
        bottom/right edge (``-1`` = flush with it).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((1, 4, 4, 1))
    >>> PatchTrigger(np.ones((2, 2)))(x)[0, :, :, 0].astype(int).tolist()
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """

    def __init__(self, patch, position=(-1, -1)):
        patch = np.asarray(patch, dtype=np.float64)
        if patch.ndim == 2:
            patch = patch[..., None]
        if patch.ndim != 3 or patch.shape[0] == 0 or patch.shape[1] == 0:
            raise InputError(f"The 'patch' parameter must have shape (h, w) or (h, w, c). "
                             f"Got shape {np.shape(patch)}.")
        if not np.all(np.isfinite(patch)):
            raise InputError("The 'patch' parameter contains NaN or Inf values.")
        self.patch = patch
        self.position = _check_position(position)

    def _stamp(self, x):
        h, w = self.patch.shape[:2]
        top, left = _place(self.position, (h, w), x.shape[1:3], "patch")
        x[:, top:top + h, left:left + w, :] = _match_channels(self.patch, x.shape[-1], "patch")
        return x

    def __repr__(self):
        return f"PatchTrigger(patch shape={self.patch.shape}, position={self.position})"


class PixelPatternTrigger(Trigger):
    """Set a few pixels to a value (the BadNets single-pixel and pattern triggers).

    Parameters
    ----------
    pixels : sequence of (int, int)
        (row, col) coordinates; negative values count from the bottom/right
        edge (``(-1, -1)`` is the bottom-right pixel).
    value : float or sequence of float, default=1.0
        The value written to every channel, or one value per channel.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((1, 3, 3, 1))
    >>> PixelPatternTrigger([(0, 0), (-1, -1)], value=9)(x)[0, :, :, 0].astype(int).tolist()
    [[9, 0, 0], [0, 0, 0], [0, 0, 9]]
    """

    def __init__(self, pixels, value=1.0):
        try:
            pixels = [_check_position(p, "pixels") for p in pixels]
        except TypeError as error:
            raise InputTypeError(f"The 'pixels' parameter must be a list of (row, col) pairs of ints. "
                            f"Got {pixels!r}.") from error
        if not pixels:
            raise InputError("The 'pixels' parameter must list at least one (row, col) pixel.")
        self.pixels = pixels
        self.value = _check_value(value)

    def _stamp(self, x):
        height, width, channels = x.shape[1:]
        value = self.value
        if value.ndim == 1 and value.shape[0] not in (1, channels):
            raise InputError(f"The 'value' parameter has {value.shape[0]} entries but the images "
                             f"have {channels} channels.")
        for row, col in self.pixels:
            if not (-height <= row < height and -width <= col < width):
                raise InputError(f"Pixel {(row, col)} is outside images of size {height}x{width}.")
            x[:, row, col, :] = value
        return x

    def __repr__(self):
        return f"PixelPatternTrigger(pixels={self.pixels}, value={self.value.tolist()})"


class ImageTrigger(Trigger):
    """Alpha-composite an image with an alpha channel (e.g. the lab's sunglasses).

    Each stamped pixel becomes ``x * (1 - a) + color * a`` with ``a`` the
    image's alpha in [0, 1] and ``color`` scaled to ``[0, value]``.

    Parameters
    ----------
    image : array of shape (h, w, c + 1)
        Colour channels followed by alpha (RGBA, or gray + alpha): ``uint8``
        in 0..255 or floats in [0, 1]. RGB colour on 1-channel data is
        converted to gray (ITU-R 601 luma); gray colour is repeated on RGB data.
    position : (int, int), default=(0, 0)
        (row, col) of the top-left corner; negative values count from the
        bottom/right edge.
    size : (int, int), default=None
        Resize the image to (rows, cols) first (bilinear, with Pillow).
    value : float, default=1.0
        The data's maximum: 1.0 for data in [0, 1], 255 for raw pixels.

    Examples
    --------
    >>> import numpy as np
    >>> rgba = np.zeros((1, 2, 4), np.uint8); rgba[..., 0] = 255; rgba[0, 0, 3] = 255
    >>> out = ImageTrigger(rgba, value=255)(np.full((1, 2, 3, 3), 10.0))
    >>> out[0, 0, :2].tolist()   # opaque red over the first pixel, transparent second pixel
    [[255.0, 0.0, 0.0], [10.0, 10.0, 10.0]]
    """

    def __init__(self, image, position=(0, 0), size=None, value=1.0):
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] not in (2, 4) or 0 in array.shape:
            raise InputError(
                "The 'image' parameter must have shape (h, w, 4) (RGBA) or (h, w, 2) "
                f"(gray + alpha). Got shape {array.shape}."
            )
        if np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.float64) / 255.0
        else:
            array = array.astype(np.float64)
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise InputError("The 'image' parameter must be uint8 in 0..255 or floats in [0, 1].")
        if size is not None:
            array = _resize(array, size)
        value = _check_value(value)
        if value.ndim != 0 or value <= 0:
            raise InputError(f"The 'value' parameter must be a positive number (the data's "
                             f"maximum, e.g. 1.0 or 255). Got {value!r}.")
        self.color = array[..., :-1] * float(value)
        self.alpha = array[..., -1:]
        self.position = _check_position(position)
        self.value = float(value)

    @classmethod
    def from_file(cls, path, position=(0, 0), size=None, value=1.0):
        """Load an image file with Pillow (converted to RGBA) and build the trigger.

        Pillow is needed only here: ``pip install pillow``.
        """
        try:
            from PIL import Image
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("ImageTrigger.from_file needs Pillow: pip install pillow") from error
        if not os.path.isfile(path):
            raise InputError(f"The trigger image file {str(path)!r} does not exist.")
        with Image.open(path) as opened:
            array = np.asarray(opened.convert("RGBA"))
        return cls(array, position=position, size=size, value=value)

    def _stamp(self, x):
        h, w = self.alpha.shape[:2]
        top, left = _place(self.position, (h, w), x.shape[1:3], "trigger image")
        channels = x.shape[-1]
        color = self.color
        if channels == 1 and color.shape[-1] == 3:
            color = color @ np.array([[0.299], [0.587], [0.114]])
        color = _match_channels(color, channels, "trigger image")
        region = x[:, top:top + h, left:left + w, :]
        x[:, top:top + h, left:left + w, :] = region * (1.0 - self.alpha) + color * self.alpha
        return x

    def __repr__(self):
        return (f"ImageTrigger(size={self.alpha.shape[:2]}, position={self.position}, "
                f"value={self.value})")


def _resize(array, size):
    from PIL import Image

    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise InputError(f"The 'size' parameter must be a (rows, cols) pair of positive ints. "
                         f"Got {size!r}.")
    rows, cols = int(size[0]), int(size[1])
    channels = [
        np.asarray(Image.fromarray(array[..., c].astype(np.float32), mode="F").resize(
            (cols, rows), Image.BILINEAR))
        for c in range(array.shape[-1])
    ]
    return np.clip(np.stack(channels, axis=-1).astype(np.float64), 0.0, 1.0)


class BlendTrigger(Trigger):
    """Blend a full-size pattern into every image: ``x * (1 - alpha) + pattern * alpha``.

    Parameters
    ----------
    pattern : array of shape (H, W) or (H, W, C)
        Same height and width as the images, in the data's scale.
    alpha : float in (0, 1], default=0.1

    Examples
    --------
    >>> import numpy as np
    >>> BlendTrigger(np.ones((2, 2)), alpha=0.25)(np.zeros((1, 2, 2, 1))).ravel().tolist()
    [0.25, 0.25, 0.25, 0.25]
    """

    def __init__(self, pattern, alpha=0.1):
        pattern = np.asarray(pattern, dtype=np.float64)
        if pattern.ndim == 2:
            pattern = pattern[..., None]
        if pattern.ndim != 3:
            raise InputError(f"The 'pattern' parameter must have shape (H, W) or (H, W, C). "
                             f"Got shape {np.shape(pattern)}.")
        if not np.all(np.isfinite(pattern)):
            raise InputError("The 'pattern' parameter contains NaN or Inf values.")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha <= 1:
            raise InputError(f"The 'alpha' parameter must be a number in (0, 1]. Got {alpha!r}.")
        self.pattern = pattern
        self.alpha = float(alpha)

    def _stamp(self, x):
        if self.pattern.shape[:2] != x.shape[1:3]:
            raise InputError(f"The blend pattern has size {self.pattern.shape[0]}x"
                             f"{self.pattern.shape[1]} but the images are "
                             f"{x.shape[1]}x{x.shape[2]}; they must be equal.")
        pattern = _match_channels(self.pattern, x.shape[-1], "blend pattern")
        return x * (1.0 - self.alpha) + pattern * self.alpha

    def __repr__(self):
        return f"BlendTrigger(pattern shape={self.pattern.shape}, alpha={self.alpha})"


class SignalTrigger(Trigger):
    """Add a horizontal sinusoid to every image (the SIG trigger, Barni et al., ICIP 2019).

    Column ``j`` of an image ``W`` pixels wide gains
    ``delta * sin(2 * pi * j * frequency / W)`` on every row and channel; the
    result is clipped to ``clip`` (the data's range). Unlike a patch, the
    signal covers the whole image at a low amplitude.

    Parameters
    ----------
    delta : float > 0, default=0.2
        Amplitude, in the data's scale.
    frequency : int >= 1, default=6
        Periods across the image's width.
    clip : (float, float) or None, default=(0.0, 1.0)
        Range the stamped images are clipped to; None leaves them unclipped.

    Examples
    --------
    >>> import numpy as np
    >>> stamped = SignalTrigger(delta=0.5, frequency=1)(np.full((1, 1, 4, 1), 0.5))
    >>> np.round(stamped[0, 0, :, 0], 3).tolist()
    [0.5, 1.0, 0.5, 0.0]
    """

    def __init__(self, delta=0.2, frequency=6, clip=(0.0, 1.0)):
        delta = check_number(delta, "delta", positive=True)
        self.frequency = int(check_number(frequency, "frequency", 1, integer=True))
        if clip is not None:
            low, high = (float(v) for v in clip)
            if not low < high:
                raise InputError(f"The 'clip' parameter must be (low, high) with low < high. "
                                 f"Got {clip!r}.")
            clip = (low, high)
        self.delta = float(delta)
        self.clip = clip

    def _stamp(self, x):
        width = x.shape[2]
        signal = self.delta * np.sin(2 * np.pi * np.arange(width) * self.frequency / width)
        x = x + signal[None, None, :, None]
        return x if self.clip is None else np.clip(x, *self.clip)

    def __repr__(self):
        return f"SignalTrigger(delta={self.delta}, frequency={self.frequency}, clip={self.clip})"


# -- factories -----------------------------------------------------------------
def single_pixel(value=1.0, position=(-2, -2)):
    """The BadNets single-pixel trigger (one pixel near the bottom-right corner).

    >>> single_pixel(value=255).pixels
    [(-2, -2)]
    """
    return PixelPatternTrigger([position], value=value)


#: The 6 pixels of :func:`pixel_pattern`, inside the 4x4 bottom-right corner.
PIXEL_PATTERN = [(-4, -2), (-3, -3), (-2, -4), (-2, -2), (-4, -4), (-3, -1)]


def pixel_pattern(value=1.0):
    """The BadNets pattern trigger: 6 pixels near the bottom-right corner.

    >>> import numpy as np
    >>> int(pixel_pattern()(np.zeros((1, 8, 8, 1))).sum())
    6
    """
    return PixelPatternTrigger(PIXEL_PATTERN, value=value)


def checkerboard_patch(size=4, value=1.0, position=(-1, -1)):
    """A ``size`` x ``size`` checkerboard of ``value`` and 0 (top-left square = ``value``).

    >>> checkerboard_patch(size=2, value=1.0).patch[..., 0].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    check_number(size, "size", 1, integer=True)
    value = _check_value(value)
    if value.ndim != 0:
        raise InputError(f"The 'value' parameter of checkerboard_patch must be one number. "
                         f"Got {value.tolist()!r}.")
    board = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0) * float(value)
    return PatchTrigger(board, position=position)


def all_to_all_shift(num_classes, shift=1):
    """The all-to-all mapping ``c -> (c + shift) % num_classes`` as an int array.

    >>> all_to_all_shift(4).tolist()
    [1, 2, 3, 0]
    """
    check_number(num_classes, "num_classes", 2, integer=True)
    check_number(shift, "shift", None, integer=True)
    return (np.arange(num_classes, dtype=np.int64) + int(shift)) % int(num_classes)


# -- poisoning -----------------------------------------------------------------
def _check_labels(y, n):
    y = np.asarray(y)
    labels = class_indices(y, "The labels `y`")
    if labels.shape[0] != n:
        raise InputError(f"`x` has {n} images but `y` has {labels.shape[0]} labels; they must "
                         "have the same length.")
    return labels, y.ndim == 2 and y.shape[1] > 1


def _attacker_labels(target, labels):
    """The attacker's class for each true label, for an int or all-to-all ``target``."""
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        if target < 0:
            raise InputError(f"The 'target' parameter must be a non-negative class index. "
                             f"Got {target}.")
        return np.full(labels.shape, int(target), np.int64)
    if isinstance(target, (bool, str, float)) or target is None:
        raise InputTypeError(
            "The 'target' parameter must be an int (all-to-one) or an all-to-all mapping "
            f"(array, dict or callable from true class to attacker class). Got {target!r}."
        )
    classes = np.unique(labels)
    if callable(target):
        table = {int(c): target(int(c)) for c in classes}
    elif isinstance(target, dict):
        table = {int(c): target.get(int(c), int(c)) for c in classes}
    else:
        mapping = np.asarray(target)
        if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
            raise InputError(f"An all-to-all 'target' array must be 1-D integers, one per class. "
                             f"Got {target!r}.")
        if classes.size and classes.max() >= mapping.shape[0]:
            raise InputError(f"The all-to-all 'target' has {mapping.shape[0]} entries but `y` "
                             f"has label {classes.max()}.")
        table = {int(c): mapping[c] for c in classes}
    for true, wanted in table.items():
        if isinstance(wanted, bool) or not isinstance(wanted, numbers.Integral) or wanted < 0:
            raise InputError(f"The all-to-all 'target' maps class {true} to {wanted!r}; expected "
                             "a non-negative int class.")
    lookup = np.zeros(int(classes.max()) + 1 if classes.size else 1, np.int64)
    for true, wanted in table.items():
        lookup[true] = int(wanted)
    return lookup[labels]


def _format_labels(labels, like, one_hot, num_classes):
    if not one_hot:
        return labels.astype(np.asarray(like).dtype if np.issubdtype(np.asarray(like).dtype, np.integer)
                             else np.int64)
    like = np.asarray(like)
    width = max(like.shape[1], int(labels.max()) + 1 if labels.size else 0, num_classes)
    out = np.zeros((labels.shape[0], width), like.dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


def _check_trigger(trigger, x):
    if not callable(trigger):
        raise InputTypeError(f"The 'trigger' parameter must be a Trigger or a callable that stamps a "
                        f"batch of images. Got {trigger!r}.")
    if isinstance(trigger, Trigger):
        trigger.check_fits(x.shape[1:])


def _stamp(trigger, x):
    out = np.asarray(trigger(x))
    if out.shape != x.shape:
        raise InputError(f"The trigger returned shape {out.shape} for images of shape {x.shape}; "
                         "it must keep the shape.")
    return out.astype(x.dtype, copy=False)


def poison_dataset(x, y, trigger, *, rate=0.1, target=0, seed=0):
    """Stamp a random fraction of a training set with ``trigger`` and relabel it.

    Parameters
    ----------
    x : array of shape (N, H, W, C)
    y : array of class indices (N,) or one-hot rows (N, K)
    trigger : Trigger or callable
        Maps a batch of images to stamped images of the same shape.
    rate : float in [0, 1], default=0.1
        Fraction of the examples to poison (rounded to a whole number).
    target : int, array, dict or callable, default=0
        An int for an all-to-one attack; or an all-to-all mapping from true
        class to attacker class (see :func:`all_to_all_shift`). Examples whose
        class already equals their target may be poisoned too.
    seed : int, default=0
        Seed of the ``numpy.random.Generator`` that picks the examples.

    Returns
    -------
    x_out : array, a copy of ``x`` with the chosen examples stamped
    y_out : array, a copy of ``y`` (same format) with their labels replaced
    poisoned_index : int64 array, the sorted indices of the poisoned examples

    Examples
    --------
    >>> import numpy as np
    >>> x, y = np.zeros((10, 4, 4, 1)), np.arange(10) % 3
    >>> _, y_out, index = poison_dataset(x, y, single_pixel(), rate=0.3,
    ...                                  target=all_to_all_shift(3), seed=1)
    >>> bool(np.all(y_out[index] == (y[index] + 1) % 3))
    True
    """
    x = _check_images(x)
    labels, one_hot = _check_labels(y, x.shape[0])
    check_number(rate, "rate", maximum=1)
    check_number(seed, "seed", 0, integer=True)
    wanted = _attacker_labels(target, labels)
    _check_trigger(trigger, x)
    count = int(round(float(rate) * x.shape[0]))
    rng = np.random.default_rng(int(seed))
    index = np.sort(rng.choice(x.shape[0], size=count, replace=False)).astype(np.int64)
    x_out = x.copy()
    new_labels = labels.copy()
    if count:
        x_out[index] = _stamp(trigger, x[index])
        new_labels[index] = wanted[index]
    num_classes = np.asarray(y).shape[1] if one_hot else 0
    return x_out, _format_labels(new_labels, y, one_hot, num_classes), index


def poisoned_evaluation_set(x, y, trigger, *, target=0):
    """Triggered test inputs with the attacker's labels, for the attack success rate.

    Inputs whose attacker class equals their true class are left out (for
    all-to-one: the inputs of class ``target``). The returned labels are the
    attacker's targets, so ``attack_success_rate(model, (x_triggered,
    y_attacker))`` is the ASR.

    Parameters
    ----------
    x : array of shape (N, H, W, C)
    y : array of class indices (N,) or one-hot rows (N, K)
    trigger : Trigger or callable
    target : int, array, dict or callable, default=0
        As in :func:`poison_dataset`.

    Returns
    -------
    x_triggered : array, the stamped inputs that are attacked
    y_attacker : int64 array, the attacker's class for each of them
    y_true : int64 array, their true class

    Examples
    --------
    >>> import numpy as np
    >>> x, y = np.zeros((3, 4, 4, 1)), np.array([0, 1, 2])
    >>> x_t, y_attacker, y_true = poisoned_evaluation_set(x, y, single_pixel(), target=1)
    >>> x_t.shape, y_attacker.tolist(), y_true.tolist()
    ((2, 4, 4, 1), [1, 1], [0, 2])
    """
    x = _check_images(x)
    labels, _ = _check_labels(y, x.shape[0])
    wanted = _attacker_labels(target, labels)
    _check_trigger(trigger, x)
    keep = np.flatnonzero(wanted != labels)
    if keep.size == 0:
        raise InputError("No input is attacked: every input's attacker class equals its true "
                         "class (for all-to-one, all inputs are of the target class).")
    return _stamp(trigger, x[keep]), wanted[keep], labels[keep]
