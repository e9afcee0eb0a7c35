"""The .npz model file: an atomic write, and a read that treats the file as untrusted.

A model file is a zip archive of .npy members (no pickle): ``meta.npy`` (a 0-d unicode
array holding JSON: format, version, layer configs, loss, metrics, optimizer or solver
settings), ``params.npy`` (the flat parameter vector) and one ``optimizer/<name>.npy``
per optimizer state buffer.

Reading checks, before anything large is allocated: the path is a regular file (a named
pipe or a device is refused, never opened for a blocking read); each member's declared
size fits inside the archive (members are stored, not compressed, so nothing read
can be larger than the file); each .npy header's shape times itemsize equals the bytes
the member holds; the JSON nests at most ``MAX_JSON_DEPTH`` deep; and the layer sizes
in the config account for exactly the parameters stored. Then every field of the
configuration and optimizer state is checked for type, range and finiteness. Every
refusal is a ValueError naming the file and the field or member at fault.
"""
import json
import math
import numbers
import os
import re
import stat
import tempfile
import zipfile

import numpy as np

from . import losses as losses_module
from . import optimizers as optimizers_module
from . import solvers as solvers_module
from ._validation import all_finite, check_dtype
from ._labels import ClassLabels
from .layers import LAYER_CLASSES, layer_from_config

FORMAT = "fastnn.Sequential"
FORMAT_VERSION = 1
#: Deepest JSON nesting a model file needs is 4 (meta / optimizer / config / lr);
#: anything far deeper is refused before json.loads could recurse on it.
MAX_JSON_DEPTH = 32
#: Largest update count accepted from a file: exactly representable as a float64, so
#: bias corrections like beta ** t stay exact in the kernels.
MAX_ITERATIONS = 2 ** 53
#: Optimizer state buffers that hold running sums of squares (a sqrt is taken of them).
_NONNEGATIVE_STATE = frozenset({"sum", "square_avg", "exp_avg_sq", "max_exp_avg_sq"})
_TEMP_PREFIX, _TEMP_SUFFIX = ".fastnn-", ".tmp"
_TEMP_NAME = re.compile(r"\.fastnn-(\d+)-[A-Za-z0-9_]+\.tmp\Z")
_TOP_LEVEL_FIELDS = frozenset({"format", "version", "config", "loss", "metrics",
                               "optimizer", "solver", "classes", "precision"})
_OPTIMIZER_FIELDS = frozenset({"config", "iterations", "lr_scale", "state"})


class _Damaged(ValueError):
    """A problem with one field or member; ``read_model`` prefixes the file name."""


# ---------------------------------------------------------------------------- write
def write_model(model, path):
    """Write ``model`` to ``path`` atomically; see ``Sequential.save``."""
    path = os.fspath(path)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.get_config()}
    arrays = {"params": model.params}
    if model.loss is not None:
        meta["loss"] = model.loss.get_config()
        meta["metrics"] = list(model.metrics)
        meta["precision"] = model.precision
    if isinstance(model.optimizer, optimizers_module.Optimizer):
        meta["optimizer"] = {"config": model.optimizer.get_config(),
                             "iterations": model.optimizer.iterations,
                             "lr_scale": model.optimizer.lr_scale,
                             "state": sorted(model.optimizer.state)}
        for name, arr in model.optimizer.state.items():
            arrays["optimizer/" + name] = arr
    elif isinstance(model.optimizer, solvers_module.Solver):
        meta["solver"] = model.optimizer.get_config()
    if model.class_labels is not None:
        meta["classes"] = _json_classes(model.class_labels.classes)
    arrays["meta"] = np.array(json.dumps(meta))
    directory = check_destination(path)
    remove_stale_temp_files(directory)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=_TEMP_SUFFIX,
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; save like open() does
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_destination(path):
    """The directory a model saved at ``path`` goes to; ValueError unless ``path`` ends in
    .npz (the format written), IsADirectoryError if it is a directory,
    FileNotFoundError if its directory does not exist."""
    path = os.fspath(path)
    if not str(path).lower().endswith(".npz"):
        raise ValueError(f"cannot save a model to {path!r}: fastnn writes .npz model files "
                         "(architecture, weights and optimizer state, no pickle); give a "
                         "path ending in .npz")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save a model to {path!r}: it is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save a model to {path!r}: there is no directory "
                                f"{directory!r}")
    return directory


def remove_stale_temp_files(directory):
    """Delete ``.fastnn-<pid>-<random>.tmp`` files in ``directory`` left by saves whose
    process no longer exists (killed mid-save). A file whose pid is alive (including
    this process, or a process of another user) is kept. POSIX only: elsewhere a pid
    cannot be probed safely, and nothing is removed."""
    if os.name != "posix":
        return
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if not _process_exists(int(match.group(1))):
            try:
                os.remove(entry.path)
            except FileNotFoundError:  # another save removed it first
                pass


def _process_exists(pid):
    if pid == os.getpid():
        return True
    if pid <= 0:  # kill(0 or negative) addresses process groups, not one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; or not probeable:
        pass                                  # keep its file
    return True


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- read
def read_model(path, model_class):
    """Build a ``model_class`` (Sequential) from the file at ``path``; see ``load_model``."""
    path = os.fspath(path)
    try:
        meta, arrays = _read_archive(path)
        return _build(meta, arrays, model_class)
    except _Damaged as exc:
        raise ValueError(f"{path!r} is a damaged fastnn model file: {exc}") from None


def _open_regular_file(path):
    """A binary file object for ``path``, refusing anything but a regular file.

    The type is checked before opening (opening a device can have effects), then again
    on the descriptor, opened with O_NONBLOCK, so a named pipe swapped in between can
    neither block the open nor be read."""
    try:
        _require_regular_file(path, os.stat(path).st_mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"no model file at {path!r}") from None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        _require_regular_file(path, os.fstat(fd).st_mode)
    except ValueError:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _require_regular_file(path, mode):
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a special file")
    raise ValueError(f"{path!r} is not a fastnn model file: it is {kind}, not a regular file")


def _read_archive(path):
    """(meta dict, {name: array}) from the archive at ``path``, every size checked
    before reading."""
    with _open_regular_file(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise ValueError(f"{path!r} is not a fastnn model file: not an .npz (zip) "
                             f"archive (empty, truncated or of another format): {exc}") from None
        with archive:
            try:
                return _read_members(path, archive, file_size)
            except (zipfile.BadZipFile, EOFError) as exc:
                raise _Damaged(f"unreadable archive: {exc}") from None


def _read_members(path, archive, file_size):
    members = _members(archive, file_size)
    if "meta.npy" not in members:
        raise ValueError(f"{path!r} is not a fastnn model file: no 'meta' member "
                         f"(members: {sorted(members)[:10]})")
    try:
        meta_text = _read_npy(archive, members.pop("meta.npy"), "meta", kind="U")
        meta = _parse_json(meta_text)
    except _Damaged as exc:
        raise ValueError(f"{path!r} is not a readable fastnn model file: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r} is not a fastnn model file (format {found!r})")
    if type(meta.get("version")) is not int or meta["version"] != FORMAT_VERSION:
        raise ValueError(f"{path!r} has model format version {meta.get('version')!r}; "
                         f"this fastnn reads version {FORMAT_VERSION}")
    arrays = {name[:-len(".npy")]: _read_npy(archive, info, name[:-len(".npy")], kind="f")
              for name, info in members.items()}
    return meta, arrays


def _members(archive, file_size):
    """{name: ZipInfo}; refuses duplicate names, encrypted or compressed members (a
    compressed one could expand a small file into a huge allocation), and members whose
    declared sizes cannot fit in a file of ``file_size`` bytes."""
    members = {}
    for info in archive.infolist():
        name = info.filename
        if name in members:
            raise _Damaged(f"member {name!r} appears twice")
        if not name.endswith(".npy"):
            raise _Damaged(f"member {name!r} is not an .npy array")
        if info.flag_bits & 0x1:
            raise _Damaged(f"member {name!r} is encrypted")
        if info.header_offset < 0 or info.header_offset + info.compress_size > file_size:
            raise _Damaged(f"member {name!r} declares {info.compress_size} bytes at offset "
                           f"{info.header_offset}, outside the {file_size}-byte file")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Damaged(f"member {name!r} is compressed (zip method {info.compress_type}); "
                           "model files hold stored members, whose sizes the file bounds")
        if info.file_size != info.compress_size:
            raise _Damaged(f"stored member {name!r} declares {info.file_size} bytes but "
                           f"holds {info.compress_size}")
        members[name] = info
    return members


def _read_npy(archive, info, name, kind):
    """The array in .npy member ``info``: its header is read first and its declared
    shape x itemsize checked against the member's size before the data is read.
    ``kind`` is "f" (float32/float64) or "U" (unicode text)."""
    with archive.open(info) as stream:
        try:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f".npy format version {version} (expected 1.0 or 2.0)")
        except ValueError as exc:
            raise _Damaged(f"member {name!r} has no valid .npy header: {exc}") from None
        if kind == "f" and dtype.newbyteorder("=") not in (np.float32, np.float64):
            raise _Damaged(f"member {name!r} has dtype {dtype}, expected float32 or float64")
        if kind == "U" and dtype.kind != "U":
            raise _Damaged(f"member {name!r} has dtype {dtype}, expected unicode text")
        data_bytes = info.file_size - stream.tell()
        declared = math.prod(shape) * dtype.itemsize
        if declared != data_bytes:
            raise _Damaged(f"member {name!r} declares shape {shape} of {dtype} "
                           f"({declared} bytes), but holds {data_bytes} bytes of data")
        data = stream.read(data_bytes)
    if len(data) != data_bytes:
        raise _Damaged(f"member {name!r} is truncated: {len(data)} of {data_bytes} bytes")
    order = "F" if fortran_order else "C"
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order=order)
    return array.astype(dtype.newbyteorder("="), order="C")


def _parse_json(meta_text):
    """The JSON value held by the 0-d text array ``meta_text``."""
    if meta_text.ndim != 0:
        raise _Damaged(f"member 'meta' is not a 0-d text array (shape {meta_text.shape})")
    text = str(meta_text[()])
    try:
        depth = _json_depth(text)
        value = None if depth > MAX_JSON_DEPTH else json.loads(text)
    except ValueError as exc:  # not JSON, lone surrogates, an int of too many digits
        raise _Damaged(f"member 'meta' is not JSON text: {exc}") from None
    if depth > MAX_JSON_DEPTH:
        raise _Damaged(f"member 'meta' nests JSON {depth} levels deep (at most "
                       f"{MAX_JSON_DEPTH} allowed)")
    return value


def _json_depth(text):
    """Deepest bracket nesting of JSON ``text``, brackets inside strings not counted
    (vectorised, so a long hostile string costs no Python loop)."""
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    codes = np.frombuffer(outside_strings.encode("utf-32-le"), dtype=np.uint32)
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(codes, (ord("]"), ord("}"))))
    return int(np.cumsum(steps).max(initial=0))


# ---------------------------------------------------------------------------- validate
def _build(meta, arrays, model_class):
    unknown = set(meta) - _TOP_LEVEL_FIELDS
    if unknown:
        raise _Damaged(f"unknown field(s) {sorted(unknown)}")
    layer_configs = _layer_configs(meta.get("config"))
    params = _array(arrays, "params")
    dtype = _layer_dtype(layer_configs)
    expected = sum(_parameter_count(c, f"config.layers[{i}]")
                   for i, c in enumerate(layer_configs))
    if params.ndim != 1 or params.size != expected or params.dtype != dtype:
        raise _Damaged(f"parameter vector has shape {params.shape} and dtype {params.dtype}, "
                       f"expected ({expected},) {dtype} for the layers in the config")
    if not all_finite(params):
        raise _Damaged("parameter vector contains NaN or infinite values")
    layers = [_rebuilt(layer_from_config, c, f"config.layers[{i}]")
              for i, c in enumerate(layer_configs)]
    try:
        model = model_class(layers)
    except (TypeError, ValueError) as exc:
        raise _Damaged(f"config.layers: {exc}") from None
    model.params[...] = params
    if "loss" not in meta:
        for field in ("metrics", "optimizer", "solver", "precision"):
            if field in meta:
                raise _Damaged(f"field {field!r} without a 'loss' (an uncompiled model has "
                               "neither)")
        _no_extra_arrays(arrays, set())
        return model
    if "optimizer" in meta and "solver" in meta:
        raise _Damaged("fields 'optimizer' and 'solver' both present; a model has one")
    loss = _rebuilt(losses_module.get, meta["loss"], "loss", require_dict=True)
    metrics = meta.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise _Damaged(f"metrics must be a list of names, got {metrics!r}")
    if "optimizer" in meta:
        saved = meta["optimizer"]
        _check_fields(saved, "optimizer", _OPTIMIZER_FIELDS)
        optimizer = _rebuilt(optimizers_module.from_config, saved["config"], "optimizer.config",
                             require_dict=True)
    elif "solver" in meta:
        optimizer = _rebuilt(solvers_module.from_config, meta["solver"], "solver",
                             require_dict=True)
    else:
        optimizer = "adam"
    precision = meta.get("precision", "fp32")
    try:
        model.compile(loss, optimizer, metrics or None, precision)
    except (TypeError, ValueError) as exc:
        raise _Damaged(f"compile settings: {exc}") from None
    if "classes" in meta:
        model.class_labels = _class_labels(meta["classes"], model)
    if "optimizer" not in meta:
        _no_extra_arrays(arrays, set())
        return model
    _restore_optimizer_state(model.optimizer, meta["optimizer"], arrays)
    return model


def _json_classes(classes):
    """The class labels as a JSON list: str, or int / float / bool numbers."""
    labels = classes.tolist()
    if not all(isinstance(label, (str, int, float)) for label in labels):
        kinds = sorted({type(label).__name__ for label in labels})
        raise ValueError(f"the model's class labels are of type(s) {kinds}, which a model "
                         "file cannot hold; train on str or int labels to save the model")
    return labels


def _class_labels(saved, model):
    """``ClassLabels`` from the saved "classes" list, checked against the model."""
    if not isinstance(saved, list) or not saved or len({type(v) for v in saved}) != 1 \
            or not isinstance(saved[0], (str, int, float)):
        raise _Damaged(f"classes must be a non-empty list of labels of one type (str, "
                       f"int or float), got {saved!r:.200}")
    if len(saved) > max(model.n_outputs, 2) or not model.loss.classification:
        raise _Damaged(f"classes holds {len(saved)} labels for a model with "
                       f"{model.n_outputs} output(s) and loss {model.loss.name!r}")
    try:
        labels = ClassLabels(np.array(saved))
    except (TypeError, ValueError) as exc:
        raise _Damaged(f"classes: {exc}") from None
    if labels.classes.tolist() != saved:
        raise _Damaged("classes must be distinct and sorted")
    return labels


def _check_fields(value, field, required):
    if not isinstance(value, dict):
        raise _Damaged(f"{field} must be a JSON object, got {type(value).__name__}")
    missing, unknown = required - set(value), set(value) - required
    if missing or unknown:
        raise _Damaged(f"{field} must have exactly the fields {sorted(required)}; missing "
                       f"{sorted(missing)}, unknown {sorted(unknown)}")


def _layer_configs(config):
    if not isinstance(config, dict) or set(config) != {"layers"}:
        raise _Damaged(f"config must be an object with one field 'layers', got {config!r:.80}")
    layers = config["layers"]
    if not isinstance(layers, list) or not layers:
        raise _Damaged("config.layers must be a non-empty list of layer configs")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise _Damaged(f"config.layers[{i}] must be an object, got {type(layer).__name__}")
        if layer.get("class") not in LAYER_CLASSES:
            raise _Damaged(f"config.layers[{i}].class must be one of {sorted(LAYER_CLASSES)}, "
                           f"got {layer.get('class')!r}")
    return layers


def _layer_dtype(layer_configs):
    try:
        dtypes = {check_dtype(c.get("dtype", "float32"), f"config.layers[{i}].dtype")
                  for i, c in enumerate(layer_configs)}
    except (TypeError, ValueError) as exc:
        raise _Damaged(str(exc)) from None
    if len(dtypes) != 1:
        raise _Damaged(f"config.layers mix dtypes {sorted(d.name for d in dtypes)}")
    return dtypes.pop()


def _parameter_count(config, field):
    """Parameters a layer config implies, from its integers alone (nothing allocated)."""
    if config["class"] != "Dense":
        return 0
    sizes = []
    for key in ("in_features", "out_features"):
        value = config.get(key)
        if type(value) is not int or value < 1:
            raise _Damaged(f"{field}.{key} must be an int >= 1, got {value!r}")
        sizes.append(value)
    use_bias = config.get("use_bias", True)
    if type(use_bias) is not bool:
        raise _Damaged(f"{field}.use_bias must be true or false, got {use_bias!r}")
    return sizes[0] * sizes[1] + (sizes[1] if use_bias else 0)


def _rebuilt(factory, config, field, require_dict=False):
    """``factory(config)``, checked to give back exactly ``config`` from get_config():
    so a field the constructor would coerce (a string read as a bool, 1 as True, a
    float where an int belongs) is refused, not silently reinterpreted."""
    if require_dict and not isinstance(config, dict):
        raise _Damaged(f"{field} must be a JSON object, got {type(config).__name__}")
    try:
        obj = factory(config)
    except KeyError as exc:
        raise _Damaged(f"{field}: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise _Damaged(f"{field}: {exc}") from None
    rebuilt = obj.get_config()
    for key, value in config.items():
        if key not in rebuilt or not _same_value(value, rebuilt[key]):
            shown = rebuilt.get(key, "<not a setting>")
            raise _Damaged(f"{field}.{key} is {value!r}, which does not read back as "
                           f"itself (it would be {shown!r})")
    return obj


def _same_value(saved, rebuilt):
    """Equal with JSON types kept apart: bool is not int, list matches list or tuple."""
    if isinstance(saved, dict):
        return (isinstance(rebuilt, dict) and saved.keys() == rebuilt.keys()
                and all(_same_value(saved[k], rebuilt[k]) for k in saved))
    if isinstance(saved, list):
        return (isinstance(rebuilt, (list, tuple)) and len(saved) == len(rebuilt)
                and all(_same_value(a, b) for a, b in zip(saved, rebuilt)))
    if isinstance(saved, bool) or isinstance(rebuilt, (bool, np.bool_)):
        return type(saved) is bool and isinstance(rebuilt, (bool, np.bool_)) and saved == rebuilt
    if isinstance(saved, numbers.Real):
        return isinstance(rebuilt, numbers.Real) and saved == rebuilt
    return type(saved) is type(rebuilt) and saved == rebuilt


def _restore_optimizer_state(optimizer, saved, arrays):
    iterations = saved["iterations"]
    if type(iterations) is not int or not 0 <= iterations <= MAX_ITERATIONS:
        raise _Damaged(f"optimizer.iterations must be an int in [0, 2**53], "
                       f"got {iterations!r}")
    lr_scale = saved["lr_scale"]
    if (isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float))
            or not 0.0 < lr_scale <= 1.0):
        raise _Damaged(f"optimizer.lr_scale must be a number in (0, 1] (ReduceLROnPlateau "
                       f"only lowers it), got {lr_scale!r}")
    names = saved["state"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
            and sorted(names) == sorted(optimizer.state)):
        raise _Damaged(f"optimizer.state must list the buffers {sorted(optimizer.state)}, "
                       f"got {names!r:.200}")
    _no_extra_arrays(arrays, {"optimizer/" + n for n in names})
    for name in names:
        field = "optimizer/" + name
        buffer = _array(arrays, field)
        current = optimizer.state[name]
        if buffer.shape != current.shape or buffer.dtype != current.dtype:
            raise _Damaged(f"optimizer state {name!r} has shape {buffer.shape} and dtype "
                           f"{buffer.dtype}, expected {current.shape} {current.dtype}")
        if not all_finite(buffer):
            raise _Damaged(f"optimizer state {name!r} contains NaN or infinite values")
        if name in _NONNEGATIVE_STATE and buffer.size and buffer.min() < 0:
            raise _Damaged(f"optimizer state {name!r} (a running sum of squares) has a "
                           f"negative value {buffer.min()}")
        current[...] = buffer
    optimizer.iterations = iterations
    optimizer.lr_scale = float(lr_scale)


def _array(arrays, name):
    if name not in arrays:
        raise _Damaged(f"missing member {name!r}")
    return arrays[name]


def _no_extra_arrays(arrays, state_names):
    extra = set(arrays) - {"params"} - state_names
    if extra:
        raise _Damaged(f"unexpected member(s) {sorted(extra)}")
