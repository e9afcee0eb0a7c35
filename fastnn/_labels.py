"""Class labels of any hashable, sortable kind <-> the integer codes 0..K-1 kernels take.

``ClassLabels.fit(y)`` finds the sorted distinct labels (``classes``); ``encode`` maps
labels to their positions in it and ``decode`` maps codes back. Labels may be integers
(e.g. {-1, 1}), bools, integer-valued floats, strings, or an object array of mutually
comparable values (as pandas gives); a single class is allowed (every code is 0).
``classes`` is an ordinary numpy array, so a model can save it and rebuild the mapping
with ``ClassLabels(classes)``.
"""
import numpy as np

from ._validation import all_finite, check_length


def as_label_vector(y, name="y", n_samples=None):
    """Validate class labels: a 1-D (or (n, 1)) non-empty array of discrete labels.

    Integer-valued floats are class labels (sklearn keeps them as floats, and so does
    this); non-integer or non-finite floats look like regression targets and are
    rejected, and so are None/NaN inside object arrays and labels that cannot be
    ordered against each other (such as a mix of str and int).

    Returns
    -------
    ndarray, shape (n,)
        The labels (a view or the array itself when possible).

    Raises
    ------
    ValueError, TypeError
        Naming ``name``, for the cases above or a length other than ``n_samples``.
    """
    if y is None or isinstance(y, (str, bytes)):
        raise TypeError(f"{name} must be an array-like of class labels, got {type(y).__name__}")
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of class labels, got shape {arr.shape}")
    check_length(arr, name, n_samples)
    kind = arr.dtype.kind
    if kind == "f":
        if not all_finite(arr):
            raise ValueError(f"{name} contains NaN or infinite values")
        fractional = arr != np.round(arr)
        if fractional.any():
            raise ValueError(f"{name} must hold class labels, got non-integer values such "
                             f"as {arr[fractional][0]!r}")
    elif kind == "O":
        missing = [v for v in arr if v is None or (isinstance(v, float) and v != v)]
        if missing:
            raise ValueError(f"{name} contains missing labels ({missing[0]!r})")
        try:
            np.unique(arr)
        except TypeError as exc:
            kinds = sorted({type(v).__name__ for v in arr})
            raise TypeError(f"{name} must hold labels of one comparable kind, got a mix "
                            f"of {kinds}") from exc
    elif kind not in "biuUS":
        raise TypeError(f"{name} must hold class labels (integers, bools or strings), got "
                        f"dtype {arr.dtype}")
    return arr


class ClassLabels:
    """The mapping between original class labels and codes 0..K-1.

    Parameters
    ----------
    classes : array-like, shape (K,)
        Distinct labels (sorted on construction).

    Attributes
    ----------
    classes : ndarray, shape (K,)
        The sorted distinct labels; code k stands for ``classes[k]``.
    """

    def __init__(self, classes):
        classes = as_label_vector(classes, "classes")
        unique = np.unique(classes)
        if len(unique) != len(classes):
            raise ValueError(f"classes must be distinct, got {len(classes)} labels of which "
                             f"{len(unique)} are distinct")
        self.classes = unique

    @classmethod
    def fit(cls, y, name="y", n_samples=None):
        """The ClassLabels of the distinct labels in ``y`` (validated as class labels)."""
        return cls(np.unique(as_label_vector(y, name, n_samples)))

    @classmethod
    def fit_encode(cls, y, name="y", n_samples=None):
        """``(ClassLabels.fit(y), its encode(y))`` from one sort of ``y``: the codes are
        the positions of the labels among the sorted distinct ones."""
        classes, codes = np.unique(as_label_vector(y, name, n_samples), return_inverse=True)
        return cls(classes), codes.astype(np.int64, copy=False)

    def __len__(self):
        return len(self.classes)

    def __repr__(self):
        return f"ClassLabels({self.classes!r})"

    def encode(self, y, name="y", n_samples=None):
        """Labels (n,) -> int64 codes (n,) in [0, K); a label not in ``classes`` raises."""
        arr = as_label_vector(y, name, n_samples)
        if (arr.dtype.kind in "US") != (self.classes.dtype.kind in "US") and \
                "O" not in (arr.dtype.kind, self.classes.dtype.kind):
            raise TypeError(f"{name} must hold labels of the kind the classes are "
                            f"(dtype {self.classes.dtype}), got dtype {arr.dtype}")
        try:
            codes = np.searchsorted(self.classes, arr)
        except TypeError as exc:
            raise TypeError(f"{name} must hold labels comparable with the classes "
                            f"{self.classes.tolist()}, got dtype {arr.dtype}") from exc
        codes = np.minimum(codes, len(self.classes) - 1)
        unseen = self.classes[codes] != arr
        if unseen.any():
            raise ValueError(f"{name} has labels that are not among the classes "
                             f"{self.classes.tolist()}: {np.unique(arr[unseen]).tolist()}")
        return codes.astype(np.int64)

    def decode(self, codes):
        """Codes (any shape) in [0, K) -> the labels they stand for."""
        return self.classes[np.asarray(codes, dtype=np.intp)]
