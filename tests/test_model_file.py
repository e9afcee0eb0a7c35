"""Model files are untrusted input (issue 18, items 4-6): every field validated, hostile
sizes refused before allocating, only regular files read, stale temp files of killed
saves removed."""
import io
import json
import os
import re
import subprocess
import sys
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastnn as fn
from _helpers import blobs, mlp, rng


def trained(optimizer="adam"):
    X, y = blobs(10, rng(30))
    model = mlp([2, 6, 3], activation="relu").compile("cross_entropy", optimizer)
    model.fit(X, y, epochs=2, batch_size=8, seed=0, verbose=0)
    return model


@pytest.fixture(scope="module")
def saved_members(tmp_path_factory):
    """(meta dict, {name: array}) of a saved, compiled Adam model."""
    path = tmp_path_factory.mktemp("good") / "good.npz"
    trained(fn.optimizers.Adam(lr=0.01)).save(path)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def write_members(path, meta, arrays):
    np.savez(path, meta=np.array(meta if isinstance(meta, str) else json.dumps(meta)), **arrays)
    return path


def assert_refused(path, *fragments):
    with pytest.raises(ValueError) as info:
        fn.load_model(path)
    message = str(info.value)
    assert repr(str(path)) in message
    for fragment in fragments:
        assert fragment in message, message


def edit(meta, dotted, value):
    meta = json.loads(json.dumps(meta))
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return meta


# ---------------------------------------------------------------------------- item 4
@pytest.mark.parametrize("field, value, named", [
    ("optimizer.lr_scale", float("nan"), "optimizer.lr_scale"),
    ("optimizer.lr_scale", 0.0, "optimizer.lr_scale"),
    ("optimizer.lr_scale", -1.0, "optimizer.lr_scale"),
    ("optimizer.lr_scale", 2.0, "optimizer.lr_scale"),
    ("optimizer.lr_scale", True, "optimizer.lr_scale"),
    ("optimizer.lr_scale", "0.5", "optimizer.lr_scale"),
    ("optimizer.iterations", -5, "optimizer.iterations"),
    ("optimizer.iterations", 1e20, "optimizer.iterations"),
    ("optimizer.iterations", 10 ** 20, "optimizer.iterations"),
    ("optimizer.iterations", float("inf"), "optimizer.iterations"),
    ("optimizer.iterations", True, "optimizer.iterations"),
    ("optimizer.iterations", 3.0, "optimizer.iterations"),
    ("optimizer.state", ["exp_avg"], "optimizer.state"),
    ("optimizer.state", "exp_avg", "optimizer.state"),
    ("optimizer.config.amsgrad", "yes", "optimizer.config: amsgrad must be a bool"),
    ("optimizer.config.amsgrad", 1, "optimizer.config: amsgrad must be a bool"),
    ("optimizer.config.lr", float("nan"), "optimizer.config"),
    ("optimizer.config.lr", -0.1, "optimizer.config"),
    ("optimizer.config.betas", [0.9, float("inf")], "optimizer.config"),
    ("optimizer.config.name", "lbfgs", "optimizer.config"),
    ("optimizer.config.bogus", 1, "optimizer.config"),
    ("optimizer.extra", 1, "optimizer"),
    ("config.layers.0.in_features", 2.0, "config.layers[0].in_features"),
    ("config.layers.0.in_features", 0, "config.layers[0].in_features"),
    ("config.layers.0.use_bias", 1, "config.layers[0].use_bias"),
    ("config.layers.0.l2", float("nan"), "config.layers[0]"),
    ("config.layers.0.l1", -1.0, "config.layers[0]"),
    ("config.layers.0.activation", "swish", "config.layers[0]"),
    ("config.layers.0.seed", -3, "config.layers[0]"),
    ("config.layers.0.dtype", "int8", "config.layers[0].dtype"),
    ("config.layers.0.class", "Conv2D", "config.layers[0].class"),
    ("config.layers.1.in_features", 5, "parameter vector"),
    ("config.layers", [], "config.layers"),
    ("config.extra", 1, "config"),
    ("loss.name", "nope", "loss"),
    ("loss", "cross_entropy", "loss"),
    ("metrics", "accuracy", "metrics"),
    ("metrics", ["nope"], "compile settings"),
    ("version", True, "version"),
    ("version", 1.0, "version"),
    ("surprise", 1, "surprise"),
])
def test_every_field_is_validated(tmp_path, saved_members, field, value, named):
    meta, arrays = saved_members
    path = write_members(tmp_path / "bad.npz", edit(meta, field, value), arrays)
    assert_refused(path, named)


def test_corrupt_optimizer_state_is_refused(tmp_path, saved_members):
    meta, arrays = saved_members
    n = arrays["params"].size
    cases = {
        "nan_moment": dict(arrays, **{"optimizer/exp_avg": np.full(n, np.nan, np.float32)}),
        "inf_moment": dict(arrays, **{"optimizer/exp_avg": np.full(n, np.inf, np.float32)}),
        "negative_square": dict(arrays, **{"optimizer/exp_avg_sq": -np.ones(n, np.float32)}),
        "float64_state": dict(arrays, **{"optimizer/exp_avg": np.zeros(n)}),
        "short_state": dict(arrays, **{"optimizer/exp_avg": np.zeros(n - 1, np.float32)}),
        "int_state": dict(arrays, **{"optimizer/exp_avg": np.zeros(n, np.int32)}),
        "extra_member": dict(arrays, surplus=np.zeros(3, np.float32)),
        "nan_params": dict(arrays, params=np.full(n, np.nan, np.float32)),
    }
    for name, members in cases.items():
        path = write_members(tmp_path / f"{name}.npz", meta, members)
        assert_refused(path, "damaged fastnn model file")


def test_uncompiled_file_with_optimizer_fields_is_refused(tmp_path, saved_members):
    meta, arrays = saved_members
    path = write_members(tmp_path / "noloss.npz", meta_without_loss(meta), arrays)
    assert_refused(path, "without a 'loss'")


def meta_without_loss(meta):
    stripped = json.loads(json.dumps(meta))
    stripped.pop("loss")
    return stripped


def test_valid_round_trip_still_loads(tmp_path, saved_members):
    meta, arrays = saved_members
    path = write_members(tmp_path / "same.npz", meta, arrays)
    loaded = fn.load_model(path)
    np.testing.assert_array_equal(loaded.params, arrays["params"])
    assert loaded.optimizer.iterations == meta["optimizer"]["iterations"]


# ---------------------------------------------------------------------------- item 5
def npy_bytes(header_shape, dtype, payload):
    """An .npy member whose header declares ``header_shape`` but holds ``payload``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(dtype)), "fortran_order": False, "shape": header_shape})
    return buffer.getvalue() + payload


def assert_refused_cheaply(path, *fragments):
    """``assert_refused``, with less than 10 MiB allocated on the way (numpy's
    allocations are traced too)."""
    tracemalloc.start()
    try:
        assert_refused(path, *fragments)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2 ** 20


def test_npy_header_declaring_a_terabyte_is_refused_without_allocating(tmp_path,
                                                                       saved_members):
    meta, _ = saved_members
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("meta.npy", npy_bytes((), f"<U{len(json.dumps(meta))}",
                                               np.array(json.dumps(meta)).tobytes()))
        archive.writestr("params.npy", npy_bytes((10 ** 12,), np.float32, b"\0" * 400))
    assert path.stat().st_size < 4096
    assert_refused_cheaply(path, "params", "10", "holds 400 bytes")


def test_huge_layers_in_config_fail_fast_without_allocating(tmp_path, saved_members):
    meta, arrays = saved_members
    huge = edit(edit(meta, "config.layers.0.in_features", 10 ** 6),
                "config.layers.0.out_features", 10 ** 6)
    path = write_members(tmp_path / "hugelayers.npz", huge, arrays)
    assert_refused_cheaply(path, "parameter vector", "(1000001000021,)")


def test_deeply_nested_json_is_a_clear_error(tmp_path, saved_members):
    _, arrays = saved_members
    path = write_members(tmp_path / "deep.npz", "[" * 100000, arrays)
    assert_refused(path, "nests JSON 100000 levels deep")
    brackets_in_strings = json.dumps({"format": "x", "note": "[" * 1000})
    path = write_members(tmp_path / "strings.npz", brackets_in_strings, arrays)
    assert_refused(path, "format 'x'")


def test_member_with_other_dtype_or_header_is_refused(tmp_path, saved_members):
    meta, arrays = saved_members
    path = write_members(tmp_path / "objmeta.npz", meta, arrays)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("other.npy", b"\x93NUMPY garbage")
    assert_refused(path, "other")
    path = write_members(tmp_path / "intmeta.npz", meta, arrays)
    np.savez(path, meta=np.arange(3), **arrays)
    assert_refused(path, "meta", "unicode")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_named_pipe_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            fn.load_model(fifo)
        except ValueError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "load_model blocked on a named pipe"
    assert outcome and "named pipe" in outcome[0] and str(fifo) in outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_pipe_swapped_in_after_the_check_is_refused_on_the_descriptor(tmp_path, monkeypatch):
    fifo, regular = tmp_path / "swapped.npz", tmp_path / "regular.npz"
    os.mkfifo(fifo)
    regular.write_bytes(b"x")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(
        regular if os.fspath(p) == str(fifo) else p, *a, **k))
    assert_refused(fifo, "named pipe")


def test_directory_and_device_are_refused(tmp_path):
    assert_refused(tmp_path, "directory")
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match="device"):
            fn.load_model("/dev/zero")


# ---------------------------------------------------------------------------- item 6
def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_save_names_its_temp_file_with_the_pid(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def spy(src, dst):
        renamed.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    trained().save(tmp_path / "m.npz")
    assert re.fullmatch(rf"\.fastnn-{os.getpid()}-\w+\.tmp", renamed[0])


def test_save_removes_stale_temp_files_of_dead_processes_only(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".fastnn-{dead_pid()}-abc123.tmp"
        in_progress = tmp_path / f".fastnn-{live.pid}-def456.tmp"
        own = tmp_path / f".fastnn-{os.getpid()}-ghi789.tmp"
        unrelated = tmp_path / ".fastnn-notapid.tmp"
        for path in (stale, in_progress, own, unrelated):
            path.write_bytes(b"partial save")
        trained().save(tmp_path / "m.npz")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["m.npz", in_progress.name, own.name, unrelated.name])
    finally:
        live.kill()
        live.wait()


def test_save_to_a_directory_or_a_missing_directory_is_a_clear_error(tmp_path):
    model = trained()
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        model.save(tmp_path / "d.npz")
    with pytest.raises(FileNotFoundError, match="there is no directory"):
        model.save(tmp_path / "absent" / "m.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]


def test_compressed_members_are_refused(tmp_path, saved_members):
    """A deflated member could expand a small file into a huge allocation."""
    meta, arrays = saved_members
    path = tmp_path / "compressed.npz"
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    assert_refused(path, "is compressed")


def test_corrupt_archive_structures_are_value_errors(tmp_path):
    good = tmp_path / "good.npz"
    trained().save(good)
    data = bytearray(good.read_bytes())
    params_at = data.index(b"params.npy") + 200  # inside the params member's data
    flipped = bytearray(data)
    flipped[params_at] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    assert_refused(tmp_path / "crc.npz", "unreadable archive", "CRC")
    # The end record's central-directory offset, pushed past the real one, makes the
    # members' offsets negative.
    shifted = bytearray(data)
    offset = int.from_bytes(shifted[-6:-2], "little")
    shifted[-6:-2] = (offset + 100).to_bytes(4, "little")
    (tmp_path / "offset.npz").write_bytes(bytes(shifted))
    assert_refused(tmp_path / "offset.npz", "at offset -100, outside the")


@pytest.mark.parametrize("meta_text, fragment", [
    ('{"format": "fastnn.Sequential", "x": ' + "9" * 5000 + "}", "not JSON text"),
    ("\ud800", "not JSON text"),
])
def test_meta_that_is_not_json_text(tmp_path, saved_members, meta_text, fragment):
    _, arrays = saved_members
    path = tmp_path / "meta.npz"
    np.savez(path, meta=np.array(meta_text), **arrays)
    assert_refused(path, fragment)
