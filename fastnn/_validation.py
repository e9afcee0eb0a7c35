"""Boundary checks: every public entry point validates here, once, so kernels never do.

Each check raises ValueError or TypeError naming the argument, what was expected and
what was received, and returns a C-contiguous array of the requested dtype (converting
non-contiguous or other-float input rather than rejecting it).
"""
import functools
import math
import numbers

import numpy as np

FLOAT_DTYPES = {"float32": np.float32, "float64": np.float64}


def check_dtype(dtype, name="dtype"):
    """Resolve "float32"/"float64" (or np.float32/np.float64) to a numpy dtype."""
    if isinstance(dtype, str):
        if dtype in FLOAT_DTYPES:
            return np.dtype(FLOAT_DTYPES[dtype])
    elif dtype is not None:
        try:
            resolved = np.dtype(dtype)
        except TypeError:
            resolved = None
        if resolved in (np.float32, np.float64):
            return resolved
    raise ValueError(f"{name} must be 'float32' or 'float64', got {dtype!r}")


def all_finite(arr):
    """True if ``arr`` holds no NaN or infinity.

    A C-contiguous float32/float64 array first takes ``dot_finite`` (one dot product,
    5-7x faster than two reductions on weight-sized arrays). When that fails (or for
    other arrays), the exact test: min and max are finite, two SIMD reductions with no
    temporary (a NaN propagates through both), where ``isfinite(arr).all()`` would
    first write a boolean array as large as the input. So finite values that overflow
    the dot product still count as finite.
    """
    if arr.dtype.kind != "f":
        return True
    if arr.dtype.char in "fd" and arr.flags.c_contiguous and dot_finite(arr):
        return True
    return bool(np.isfinite(arr.min()) and np.isfinite(arr.max()))


def dot_finite(arr):
    """True when ``sum(arr * arr)`` is finite, which it is only when every value is (a
    NaN or inf makes it NaN or inf); False says nothing, since finite values can
    overflow it. ``arr``: C-contiguous float32 or float64. The dot product runs in
    scipy's BLAS, the one the compiled kernels call: a second BLAS (numpy's) woken
    between their calls leaves its threads spinning against theirs."""
    flat = arr.reshape(-1)
    if not 0 < flat.size < 2**31:  # BLAS's int length; nothing to add up
        return flat.size == 0
    sdot, ddot = _scipy_dots()
    return math.isfinite((sdot if arr.dtype == np.float32 else ddot)(flat, flat))


@functools.cache
def _scipy_dots():
    """scipy's BLAS (sdot, ddot), imported at the first call: ``import fastnn`` does not
    import scipy.linalg, and an import statement in dot_finite cost a third of it."""
    from scipy.linalg.blas import ddot, sdot

    return sdot, ddot


def _as_numeric(a, name):
    if isinstance(a, (str, bytes)) or a is None:
        raise TypeError(f"{name} must be array-like of numbers, got {type(a).__name__}")
    if hasattr(a, "toarray") and hasattr(a, "nnz"):  # a scipy.sparse matrix or array
        raise TypeError(f"{name} is a sparse {type(a).__name__}: sparse input is not "
                        f"supported; convert it with {name}.toarray()")
    try:
        arr = np.asarray(a)
    except ValueError as exc:  # numpy refuses a ragged nested list
        raise ValueError(f"{name} is a ragged nested sequence (its rows have different "
                         f"lengths); every sample needs the same number of values") from exc
    if arr.dtype.kind in "US" or (arr.dtype == object and arr.size
                                  and isinstance(arr.flat[0], str)):
        hint = ("encode class labels as 0..K-1, e.g. classes, y = np.unique(y, "
                "return_inverse=True), or use fastnn.sklearn's estimators, which accept "
                "any labels") if name.startswith("y") else (
                "encode categorical features as numbers first (e.g. one-hot)")
        raise TypeError(f"{name} must hold numbers, got strings (dtype {arr.dtype}); {hint}")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == np.bool_):
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.dtype.kind == "m":  # numpy counts timedelta64 among the integers
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}; convert durations "
                        "to numbers first (e.g. arr / np.timedelta64(1, 's'))")
    return arr


def _as_float(arr, name, dtype):
    """``arr`` as a C-contiguous ``dtype`` array that must be finite; a value that is
    finite in ``arr`` but too large for ``dtype`` is reported as an overflow, not as
    the infinity the conversion made of it."""
    with np.errstate(over="ignore"):
        converted = np.ascontiguousarray(arr, dtype=dtype)
    if all_finite(converted):
        return converted
    bad = np.count_nonzero(~np.isfinite(arr)) if arr.dtype.kind == "f" else 0
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    overflow = np.count_nonzero(~np.isfinite(converted))
    hint = " or use dtype='float64'" if converted.dtype == np.float32 else ""
    raise ValueError(f"{name} has {overflow} value(s) that overflow {converted.dtype} (largest "
                     f"magnitude {float(np.abs(arr).max()):.6g}, {converted.dtype} holds up to "
                     f"{float(np.finfo(converted.dtype).max):.6g}); scale the data{hint}")


def check_array(a, name, dtype, ndim=2, allow_1d=False):
    """A finite, non-empty, C-contiguous float array of ``ndim`` dimensions.

    With ``allow_1d`` a 1-D input of length n becomes an (n, 1) column.
    """
    if (type(a) is np.ndarray and a.dtype == dtype and a.ndim == ndim and a.size
            and a.flags.c_contiguous and all_finite(a)):
        return a  # already what the checks below return (the checks cost ~4 us)
    arr = _as_numeric(a, name)
    if allow_1d and arr.ndim == 1 and ndim == 2:
        arr = arr.reshape(-1, 1)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {arr.ndim}-D array of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return _as_float(arr, name, dtype)


def check_features(X, name, dtype, n_features):
    """A 2-D float input whose column count matches the model's ``n_features``."""
    arr = check_array(X, name, dtype)
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"{name} has {arr.shape[1]} features per sample, but the model expects "
            f"{n_features}; got shape {arr.shape}")
    return arr


def check_labels(y, name, n_samples, n_classes):
    """Integer class labels in [0, n_classes) as an int64 vector of length n_samples."""
    arr = _as_numeric(y, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of class labels, got shape {arr.shape}")
    check_length(arr, name, n_samples)
    if not np.issubdtype(arr.dtype, np.integer):
        if not all_finite(arr):
            raise ValueError(f"{name} contains NaN or infinite values")
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name} must hold integer class labels, got non-integer values "
                             f"such as {float(arr[arr != np.round(arr)][0])!r}")
    low, high = arr.min(), arr.max()  # before the int64 conversion, which wraps 1e30
    if low < 0 or high >= n_classes:
        hint = (f"; the labels look 1-based: pass {name} - 1"
                if low >= 1 and high == n_classes else "")
        raise ValueError(f"{name} must be class labels in [0, {n_classes - 1}] "
                         f"(the model has {n_classes} outputs), got values from "
                         f"{_number_text(low)} to {_number_text(high)}{hint}")
    return np.ascontiguousarray(arr.astype(np.int64))


def _number_text(value):
    """A numpy scalar as the user wrote it: integral floats of int64 range as ints."""
    value = value.item()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        return str(int(value))
    return str(value)


def check_length(arr, name, n_samples):
    if n_samples is not None and len(arr) != n_samples:
        raise ValueError(f"{name} has {len(arr)} samples but X has {n_samples}")
    if len(arr) == 0:
        raise ValueError(f"{name} must not be empty")


def check_sample_weight(w, n_samples, dtype, name="sample_weight"):
    """None, or a finite non-negative weight vector of length n_samples with positive sum."""
    if w is None:
        return None
    arr = _as_numeric(w, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of length {n_samples}, got shape {arr.shape}")
    check_length(arr, name, n_samples)
    arr = _as_float(arr, name, dtype)
    if (arr < 0).any():
        raise ValueError(f"{name} must be non-negative, got minimum {arr.min()}")
    if arr.sum() <= 0:
        raise ValueError(f"{name} must have a positive sum, got all zeros")
    return arr


def check_choice(value, name, choices):
    """``value`` must be one of ``choices`` (a str name); returns it."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {sorted(choices)}; "
                        f"got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {sorted(choices)}")
    return value


def check_bool(value, name):
    """A bool or numpy bool, as a Python bool; a truthy str, int or None is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got "
                        f"{type(value).__name__} {value!r}")
    return bool(value)


def check_int(value, name, low=None, high=None, allow_none=False):
    """An int (not bool) in [low, high]."""
    if value is None and allow_none:
        return None
    # an exact int skips the numbers.Integral check (an ABC check, ~10x slower)
    if type(value) is not int and (isinstance(value, bool)
                                   or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_float(value, name, low=None, high=None, low_open=False, high_open=False):
    """A finite real number in the given (closed unless *_open) range."""
    # an exact float skips the numbers.Real check (an ABC check, ~10x slower)
    if type(value) is not float and (isinstance(value, bool)
                                     or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}{hi}, got {value}")
    return value


def check_seed(seed, name="seed"):
    """None or a non-negative int."""
    if seed is None:
        return None
    return check_int(seed, name, low=0)


def config_class(config, registry, what, key="name"):
    """``(class, keyword arguments)`` for a ``get_config()`` dict: ``config[key]`` looked
    up in ``registry`` (name -> class), the other entries as the keyword arguments."""
    if not isinstance(config, dict):
        raise TypeError(f"a {what} config must be a dict, got {type(config).__name__}")
    kwargs = dict(config)
    name = kwargs.pop(key, None)
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(registry)}")
    return registry[name], kwargs
