"""Readers for IDX files, the format MNIST ships in (http://yann.lecun.com/exdb/mnist/).

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the data, big-endian, row-major. MNIST distributes each
file gzip-compressed; both forms are read.
"""
import gzip
import math
import os
import struct
import zlib

import numpy as np

from .._validation import check_choice

#: IDX type byte -> big-endian dtype of the data.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(file):
    """The (decompressed) content of ``file`` and a name for messages."""
    if hasattr(file, "read"):
        name = getattr(file, "name", "<file object>")
        data = file.read()
    elif isinstance(file, (str, bytes, os.PathLike)):
        name = os.fsdecode(file)
        with open(file, "rb") as handle:
            data = handle.read()
    else:
        raise TypeError(f"file must be a path or a binary file object, "
                        f"got {type(file).__name__}")
    if not isinstance(data, bytes):
        raise TypeError(f"file {name!r} must be opened in binary mode, read returned "
                        f"{type(data).__name__}")
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{name!r} is a corrupt or truncated gzip file: {exc}") from exc
    return data, name


def read_idx(file):
    """Read one IDX file (gzip-compressed or plain) into the array its header declares.

    Parameters
    ----------
    file : str, path-like or binary file object
        The IDX file.

    Returns
    -------
    ndarray
        Native-endian, with the header's shape and dtype (uint8, int8, int16, int32,
        float32 or float64), e.g. (60000, 28, 28) uint8 for MNIST's training images.

    Raises
    ------
    ValueError
        The magic number is wrong, or the data is truncated or has trailing bytes
        (the message names the file).
    TypeError
        ``file`` is neither a path nor a binary file object.
    """
    data, name = _read_bytes(file)
    if len(data) < 4:
        raise ValueError(f"{name!r} is not an IDX file: expected a 4-byte magic number, "
                         f"got {len(data)} byte(s)")
    zero0, zero1, type_code, ndim = data[:4]
    magic = int.from_bytes(data[:4], "big")
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_TYPES or ndim == 0:
        known = ", ".join(f"0x{code:02X}" for code in _IDX_TYPES)
        raise ValueError(f"{name!r} is not an IDX file: magic number 0x{magic:08X}; expected "
                         f"0x0000TTDD with type TT in ({known}) and DD >= 1 dimensions")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{name!r} is truncated: its header declares {ndim} dimension "
                         f"size(s) ({offset} header bytes), the file has {len(data)} bytes")
    shape = struct.unpack(f">{ndim}I", data[4:offset])
    dtype = _IDX_TYPES[type_code]
    count = math.prod(shape)
    expected, found = count * dtype.itemsize, len(data) - offset
    if found != expected:
        problem = "is truncated" if found < expected else "has trailing bytes"
        raise ValueError(f"{name!r} {problem}: header declares shape {shape} of {dtype.name} "
                         f"= {expected} data bytes, found {found}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _find(directory, prefix, part, ndim):
    """Path of ``<prefix>-<part>-idx<ndim>-ubyte`` in ``directory`` (also ``.gz``, and the
    ``<prefix>-<part>.idx<ndim>-ubyte`` spelling some mirrors use)."""
    names = []
    for stem in (f"{prefix}-{part}-idx{ndim}-ubyte", f"{prefix}-{part}.idx{ndim}-ubyte"):
        names += [stem, stem + ".gz"]
    for candidate in names:
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no MNIST {part} file in {directory!r}: looked for "
                            f"{', '.join(names)}")


def load_mnist(path, kind="train"):
    """MNIST from the IDX files a user downloaded: X float32 (n, 784) in [0, 1], y int64 (n,).

    X is pixel / 255, one flattened row-major 28x28 image per row. Files in the same
    format with other image sizes (n, rows*cols) or labels (e.g. Fashion-MNIST) load too.

    Parameters
    ----------
    path : str or path-like
        The directory holding ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte``
        (``kind="train"``, n = 60000) or ``t10k-images-idx3-ubyte`` /
        ``t10k-labels-idx1-ubyte`` (``kind="test"``, n = 10000), each plain or ``.gz``.
    kind : {"train", "test"}, default "train"
        Which part to load.

    Returns
    -------
    X : ndarray, shape (n, 784), float32
    y : ndarray, shape (n,), int64

    Raises
    ------
    FileNotFoundError
        A missing directory or file.
    ValueError
        A corrupt, truncated or mismatched file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path (str or os.PathLike), "
                        f"got {type(path).__name__}")
    kind = check_choice(kind, "kind", ("train", "test"))
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"path must be a directory holding the MNIST IDX files; "
                                f"{directory!r} is not a directory")
    prefix = "train" if kind == "train" else "t10k"
    images_file = _find(directory, prefix, "images", 3)
    labels_file = _find(directory, prefix, "labels", 1)
    images, labels = read_idx(images_file), read_idx(labels_file)
    for file, array, want_ndim in ((images_file, images, 3), (labels_file, labels, 1)):
        if array.dtype != np.uint8 or array.ndim != want_ndim:
            raise ValueError(f"{file!r} must hold unsigned bytes in {want_ndim} dimension(s) "
                             f"(magic number 0x000008{want_ndim:02X}), got {array.dtype} "
                             f"of shape {array.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_file!r} holds {len(images)} images but {labels_file!r} "
                         f"holds {len(labels)} labels")
    X = images.reshape(len(images), -1).astype(np.float32)
    X /= 255
    return X, labels.astype(np.int64)
