"""The argument checks of the kernel contract, shared by every backend.

The numpy reference runs them on every call. The compiled backends test the same
conditions in O(1) in compiled code (and bounds-check class labels and sample indices
inside their loops) and call these only to report a failure, so every backend raises
the same error: a ValueError (TypeError for a non-array) that names the kernel, the
argument, what was expected and what was received. Values are not checked (no NaN
scans): the API validates them once, at its boundary.
"""
import numpy as np

from . import (
    DEFAULT_ALPHA, LABEL_LOSS_CODES, NODE_DATA, OPTIMIZER_CODES, OPTIMIZER_HYPER, NodeSum,
    dense_stack_workspace_size, node_split_bytes, optimizer_states_used,
    train_epoch_workspace_size,
)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT64 = np.dtype(np.int64)
_FLOAT64 = np.dtype(np.float64)
_UINT8 = np.dtype(np.uint8)


def _array(kernel, name, a, ndim=None, dtype=None, writable=False):
    """``a`` as the kernel needs it: an ndarray, C-contiguous, of ``ndim`` dimensions
    (any when None) and ``dtype`` (float32 or float64 when None); returns its dtype."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{kernel}: {name} must be a numpy array, got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{kernel}: {name} must be {ndim}-D, got shape {a.shape}")
    if dtype is None:
        if a.dtype not in _FLOATS:
            raise ValueError(f"{kernel}: {name} must be float32 or float64, got {a.dtype}")
    elif a.dtype != dtype:
        raise ValueError(f"{kernel}: {name} must have dtype {dtype} (one dtype per call), "
                         f"got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{kernel}: {name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{kernel}: {name} is an output and must be writable")
    return a.dtype


def _shape(kernel, name, a, shape):
    if a.shape != shape:
        raise ValueError(f"{kernel}: {name} must have shape {shape}, got {a.shape}")


def _act(kernel, act):
    if not 0 <= act < len(DEFAULT_ALPHA):
        raise ValueError(f"{kernel}: act must be an activation code in "
                         f"[0, {len(DEFAULT_ALPHA)}), got {act}")


def activation(kernel, act, inputs, out):
    """activation_forward (inputs: z) / activation_backward (inputs: a, dout): every
    array of one shape and dtype."""
    _act(kernel, act)
    (first_name, first), *rest = inputs.items()
    dtype = _array(kernel, first_name, first)
    for name, a in rest + [("out", out)]:
        _array(kernel, name, a, dtype=dtype, writable=name == "out")
        _shape(kernel, name, a, first.shape)


def softmax_forward(z, out):
    """z (n, k) with k >= 1; out (n, k) of z's dtype."""
    kernel = "softmax_forward"
    dtype = _array(kernel, "z", z, 2)
    if z.shape[1] < 1:
        raise ValueError(f"{kernel}: z must have at least one column, got shape {z.shape}")
    _array(kernel, "out", out, 2, dtype, writable=True)
    _shape(kernel, "out", out, z.shape)


def dense_forward(x, w, b, act, out):
    """x (n, d), w (d, k), b (k,), out (n, k)."""
    kernel = "dense_forward"
    _act(kernel, act)
    dtype = _array(kernel, "x", x, 2)
    _array(kernel, "w", w, 2, dtype)
    _array(kernel, "b", b, 1, dtype)
    _array(kernel, "out", out, 2, dtype, writable=True)
    (n, d), k = x.shape, w.shape[1]
    _shape(kernel, "w", w, (d, k))
    _shape(kernel, "b", b, (k,))
    _shape(kernel, "out", out, (n, k))


def dense_backward(x, w, a, dout, act, dz, dx, dw, db):
    """x (n, d), w (d, k), a / dout / dz (n, k), dx (n, d) or None, dw (d, k), db (k,)."""
    kernel = "dense_backward"
    _act(kernel, act)
    dtype = _array(kernel, "x", x, 2)
    _array(kernel, "w", w, 2, dtype)
    (n, d), k = x.shape, w.shape[1]
    _shape(kernel, "w", w, (d, k))
    outputs = {"dz": (n, k), "dw": (d, k), "db": (k,)}
    if dx is not None:
        outputs["dx"] = (n, d)
    for name, arr, shape in [("a", a, (n, k)), ("dout", dout, (n, k))] + [
            (name, {"dz": dz, "dx": dx, "dw": dw, "db": db}[name], shape)
            for name, shape in outputs.items()]:
        _array(kernel, name, arr, len(shape), dtype, writable=name in outputs)
        _shape(kernel, name, arr, shape)


def dense_per_sample_grad(x, dz, jac, offset, use_bias):
    """x (n, d), dz (n, k), jac (n, P) with 0 <= offset, offset + d*k (+ k) <= P."""
    kernel = "dense_per_sample_grad"
    dtype = _array(kernel, "x", x, 2)
    _array(kernel, "dz", dz, 2, dtype)
    _array(kernel, "jac", jac, 2, dtype, writable=True)
    (n, d), k = x.shape, dz.shape[1]
    _shape(kernel, "dz", dz, (n, k))
    width = d * k + (k if use_bias else 0)
    if jac.shape[0] != n or offset < 0 or offset + width > jac.shape[1]:
        raise ValueError(f"{kernel}: jac must have {n} rows and columns [offset, offset + "
                         f"{width}) = [{offset}, {offset + width}), got shape {jac.shape}")


def loss(kernel, names, pred, target, weights, dpred, labels=False):
    """pred (n, k), n and k >= 1; target (n, k) of pred's dtype, or int64 labels (n,)
    when ``labels``; weights (n,) or None; dpred (n, k) or None. ``names`` are the
    kernel's names of (pred, target, dpred)."""
    pred_name, target_name, grad_name = names
    dtype = _array(kernel, pred_name, pred, 2)
    n, k = pred.shape
    if n < 1 or k < 1:
        raise ValueError(f"{kernel}: {pred_name} must have at least one row and one "
                         f"column, got shape {pred.shape}")
    if labels:
        _array(kernel, target_name, target, 1, _INT64)
        _shape(kernel, target_name, target, (n,))
    else:
        _array(kernel, target_name, target, 2, dtype)
        _shape(kernel, target_name, target, (n, k))
    if weights is not None:
        _array(kernel, "weights", weights, 1, dtype)
        _shape(kernel, "weights", weights, (n,))
    if dpred is not None:
        _array(kernel, grad_name, dpred, 2, dtype, writable=True)
        _shape(kernel, grad_name, dpred, (n, k))


def labels_in_range(kernel, labels, k, name="labels"):
    """Every class label in [0, k) (O(n): numpy reference, or reporting a bad label a
    compiled kernel found in its loop)."""
    bad = np.flatnonzero((labels < 0) | (labels >= k))
    if bad.size:
        raise ValueError(f"{kernel}: {name} must be class indices in [0, {k}), got "
                         f"{labels[bad[0]]} at position {bad[0]}")


def optimizer(kernel, params, grads, buffers):
    """params (P,) writable; grads and every buffer ``buffers`` names (the state the
    update uses; unused ones are not passed) (P,) of params' dtype."""
    dtype = _array(kernel, "params", params, 1, writable=True)
    _array(kernel, "grads", grads, 1, dtype)
    _shape(kernel, "grads", grads, params.shape)
    for name, buf in buffers.items():
        _array(kernel, name, buf, 1, dtype, writable=True)
        _shape(kernel, name, buf, params.shape)


def sgd_update(params, grads, momentum_buf, momentum):
    optimizer("sgd_update", params, grads,
              {"momentum_buf": momentum_buf} if momentum else {})


def adagrad_update(params, grads, state_sum):
    optimizer("adagrad_update", params, grads, {"state_sum": state_sum})


def rmsprop_update(params, grads, square_avg, momentum_buf, grad_avg, momentum, centered):
    buffers = {"square_avg": square_avg}
    if momentum > 0:
        buffers["momentum_buf"] = momentum_buf
    if centered:
        buffers["grad_avg"] = grad_avg
    optimizer("rmsprop_update", params, grads, buffers)


def adam_update(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad):
    buffers = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if amsgrad:
        buffers["max_exp_avg_sq"] = max_exp_avg_sq
    optimizer("adam_update", params, grads, buffers)


def _loss_and_labels(kernel, names, pred, target, weights, dpred, labels=False):
    """``loss``, then (for class labels) ``labels_in_range``: everything a compiled loss
    kernel may have refused."""
    loss(kernel, names, pred, target, weights, dpred, labels)
    if labels:
        labels_in_range(kernel, target, pred.shape[1])


def softmax_cross_entropy(logits, labels, weights, dlogits):
    """labels int64 (n,) class indices in [0, k), or (n, k) probability rows."""
    _loss_and_labels("softmax_cross_entropy", ("logits", "labels", "dlogits"), logits, labels,
                    weights, dlogits, isinstance(labels, np.ndarray) and labels.ndim == 1)


def multiclass_hinge(scores, labels, weights, dscores):
    _loss_and_labels("multiclass_hinge", ("scores", "labels", "dscores"), scores, labels,
                    weights, dscores, labels=True)


def _layer_stack(kernel, widths, acts, alphas, use_bias):
    """The description of ``L`` dense layers (O(L)): widths int64 (L+1,) each >= 1,
    acts int64 (L,) activation codes, alphas float64 (L,), use_bias int64 (L,).
    Returns the widths as a list of ints and the number of parameters P."""
    _array(kernel, "widths", widths, 1, _INT64)
    n_layers = widths.shape[0] - 1
    widths = [int(w) for w in widths]
    if n_layers < 1 or min(widths) < 1:
        raise ValueError(f"{kernel}: widths must hold at least two widths, each >= 1, got "
                         f"{widths}")
    for name, arr, dt in (("acts", acts, _INT64), ("alphas", alphas, _FLOAT64),
                          ("use_bias", use_bias, _INT64)):
        _array(kernel, name, arr, 1, dt)
        _shape(kernel, name, arr, (n_layers,))
    for act in acts:
        _act(kernel, act)
    n_params = sum(d * k + (k if bias else 0)
                   for d, k, bias in zip(widths[:-1], widths[1:], use_bias))
    return widths, n_params


def dense_stack_forward(x, params, widths, acts, alphas, use_bias, workspace, out):
    """x (n, widths[0]); params (P,) of x's dtype; widths / acts / alphas / use_bias as
    ``_layer_stack``; workspace at least ``dense_stack_workspace_size(n, widths)``
    elements; out (n, widths[L])."""
    kernel = "dense_stack_forward"
    dtype = _array(kernel, "x", x, 2)
    widths, n_params = _layer_stack(kernel, widths, acts, alphas, use_bias)
    n = x.shape[0]
    _shape(kernel, "x", x, (n, widths[0]))
    _array(kernel, "params", params, 1, dtype)
    _shape(kernel, "params", params, (n_params,))
    _array(kernel, "workspace", workspace, 1, dtype, writable=True)
    needed = dense_stack_workspace_size(n, widths)
    if workspace.shape[0] < needed:
        raise ValueError(f"{kernel}: workspace must have at least {needed} elements, got "
                         f"{workspace.shape[0]}")
    _array(kernel, "out", out, 2, dtype, writable=True)
    _shape(kernel, "out", out, (n, widths[-1]))


def train_epoch(spec):
    """Every field of a TrainEpochSpec against the others (O(L)); the sample indices in
    ``order`` and the labels are checked by the kernels in their loop."""
    kernel = "train_epoch"
    dtype = _array(kernel, "X", spec.X, 2)
    _array(kernel, "order", spec.order, 1, _INT64)
    widths, n_params = _layer_stack(kernel, spec.widths, spec.acts, spec.alphas,
                                    spec.use_bias)
    if spec.batch_size < 1:
        raise ValueError(f"{kernel}: batch_size must be >= 1, got {spec.batch_size}")
    n = spec.X.shape[0]
    _shape(kernel, "X", spec.X, (n, widths[0]))
    if spec.loss_code in LABEL_LOSS_CODES:
        _array(kernel, "labels", spec.labels, 1, _INT64)
        _shape(kernel, "labels", spec.labels, (n,))
    else:
        _array(kernel, "targets", spec.targets, 2, dtype)
        _shape(kernel, "targets", spec.targets, (n, widths[-1]))
    if not 0 <= spec.loss_code < 6:
        raise ValueError(f"{kernel}: loss_code must be a code of LOSS_CODES, got "
                         f"{spec.loss_code}")
    for name in ("params", "grads"):
        _array(kernel, name, getattr(spec, name), 1, dtype, writable=True)
        _shape(kernel, name, getattr(spec, name), (n_params,))
    _array(kernel, "workspace", spec.workspace, 1, dtype, writable=True)
    needed = train_epoch_workspace_size(spec.batch_size, widths)
    if spec.workspace.shape[0] < needed:
        raise ValueError(f"{kernel}: workspace must have at least {needed} elements, got "
                         f"{spec.workspace.shape[0]}")
    opt = spec.optimizer
    layouts = list(OPTIMIZER_HYPER.values())
    if not 0 <= opt.code < len(layouts):
        raise ValueError(f"{kernel}: optimizer.code must be a code of OPTIMIZER_CODES, "
                         f"got {opt.code}")
    _array(kernel, "optimizer.hyper", opt.hyper, 1, _FLOAT64)
    _shape(kernel, "optimizer.hyper", opt.hyper, (len(layouts[opt.code]),))
    if len(opt.states) != 3:
        raise ValueError(f"{kernel}: optimizer.states must hold 3 buffers, got "
                         f"{len(opt.states)}")
    for i, state in enumerate(opt.states):
        _array(kernel, f"optimizer.states[{i}]", state, 1, dtype, writable=True)
        _shape(kernel, f"optimizer.states[{i}]", state, (n_params,))
    n_batches = -(-spec.order.shape[0] // spec.batch_size)
    _array(kernel, "lrs", spec.lrs, 1, _FLOAT64)
    if spec.lrs.shape[0] < n_batches:
        raise ValueError(f"{kernel}: lrs must hold one rate per batch ({n_batches}), got "
                         f"{spec.lrs.shape[0]}")
    _array(kernel, "stats", spec.stats, 1, _FLOAT64, writable=True)
    _shape(kernel, "stats", spec.stats, (4,))
    if isinstance(spec.reduce, NodeSum):
        _node_sum(kernel, spec.reduce, spec.grads, spec.lrs.shape[0])
        if not isinstance(spec.reduce.split_rows, (int, np.integer)) or \
                spec.reduce.split_rows < 0:
            raise ValueError(f"{kernel}: reduce.split_rows must be an int >= 0, got "
                             f"{spec.reduce.split_rows!r}")
        if spec.reduce.split_rows:
            _node_split(kernel, spec, widths)
    elif spec.reduce is not None and not callable(spec.reduce):
        raise TypeError(f"{kernel}: reduce must be None, a callable or a NodeSum, got "
                        f"{type(spec.reduce).__name__}")
    if spec.bf16 and spec.reduce is not None:
        raise ValueError(f"{kernel}: a bf16 epoch takes no reduce hook (reduce must be None "
                         f"when bf16 is True)")
    if spec.bf16:
        float32_only(kernel + " (bf16)", spec.X)


def float32_only(kernel, x):
    """The bf16 kernels take float32 (their products round float32 to bf16)."""
    if x.dtype != np.float32:
        raise ValueError(f"{kernel}: the bf16 products take float32 arrays, got {x.dtype}")


def bf16_round(x, out):
    """x and out float32 arrays of one shape (out may be x)."""
    kernel = "bf16_round"
    _array(kernel, "x", x, dtype=np.dtype(np.float32))
    _array(kernel, "out", out, dtype=np.dtype(np.float32), writable=True)
    _shape(kernel, "out", out, x.shape)


def _node_sum(kernel, node, grads, n_steps):
    """A NodeSum's segments hold this rank's ``grads`` and room for every rank's."""
    segments = node.segments
    if not isinstance(segments, tuple) or not segments:
        raise TypeError(f"{kernel}: reduce.segments must be a non-empty tuple of arrays")
    if not 0 <= node.rank < len(segments):
        raise ValueError(f"{kernel}: reduce.rank must be in [0, {len(segments)}), got "
                         f"{node.rank}")
    needed = NODE_DATA + grads.nbytes
    for r, segment in enumerate(segments):
        _array(kernel, f"reduce.segments[{r}]", segment, 1, _UINT8, writable=True)
        if segment.shape[0] < needed:
            raise ValueError(f"{kernel}: reduce.segments[{r}] must hold at least {needed} "
                             f"bytes (flags, loss slot, gradient), got {segment.shape[0]}")
        if segment.ctypes.data % 8:
            raise ValueError(f"{kernel}: reduce.segments[{r}] must start on an 8-byte "
                             f"boundary (its int64 flags)")
    if grads.ctypes.data != segments[node.rank].ctypes.data + NODE_DATA:
        raise ValueError(f"{kernel}: with a NodeSum, grads must be the gradient in this "
                         f"rank's segment (reduce.segments[rank] from byte {NODE_DATA})")
    _array(kernel, "reduce.global_rows", node.global_rows, 1, _FLOAT64)
    if node.global_rows.shape[0] < n_steps:
        raise ValueError(f"{kernel}: reduce.global_rows must hold the rows of every step "
                         f"({n_steps}), got {node.global_rows.shape[0]}")
    if not callable(node.sync):
        raise TypeError(f"{kernel}: reduce.sync must be callable")
    if not isinstance(node.parent, (int, np.integer)) or node.parent < 0:
        raise ValueError(f"{kernel}: reduce.parent must be a process id >= 0 (0: none), "
                         f"got {node.parent!r}")


def _node_split(kernel, spec, widths):
    """A NodeSum's split first layer: a shared region big enough (with room for the
    optimizer's states) on a cache line, and every step's rows of this rank inside its
    global batch (O(steps))."""
    node, opt = spec.reduce, spec.optimizer
    _array(kernel, "reduce.shared", node.shared, 1, _UINT8, writable=True)
    n_states = len(optimizer_states_used(opt.code, opt.hyper))
    needed = node_split_bytes(widths, node.split_rows, spec.X.dtype.itemsize, n_states)
    if node.shared.shape[0] < needed:
        raise ValueError(f"{kernel}: reduce.shared must hold at least {needed} bytes "
                         f"(node_split_bytes with n_states={n_states}), got "
                         f"{node.shared.shape[0]}")
    if node.shared.ctypes.data % 64:
        raise ValueError(f"{kernel}: reduce.shared must start on a 64-byte boundary")
    n_steps = spec.lrs.shape[0]
    _array(kernel, "reduce.row_starts", node.row_starts, 1, _INT64)
    if node.row_starts.shape[0] < n_steps:
        raise ValueError(f"{kernel}: reduce.row_starts must hold every step's first row "
                         f"({n_steps}), got {node.row_starts.shape[0]}")
    steps = np.arange(n_steps)
    rows = np.clip(spec.order.shape[0] - steps * spec.batch_size, 0, spec.batch_size)
    starts, global_rows = node.row_starts[:n_steps], node.global_rows[:n_steps]
    bad = np.flatnonzero(~((starts >= 0) & (starts + rows <= global_rows)
                           & (global_rows <= node.split_rows)))   # NaN rows too
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"{kernel}: step {b}'s rows [{starts[b]}, {starts[b] + rows[b]}) "
                         f"of this rank must lie in its global batch of "
                         f"{global_rows[b]:g} rows, at most reduce.split_rows "
                         f"({node.split_rows})")


def train_epoch_indices(spec):
    """The sample indices of ``order`` in [0, n) and, for a label loss, the labels of
    those samples in [0, widths[-1]) (O(m): the numpy reference, or reporting what a
    compiled kernel found in its loop)."""
    kernel = "train_epoch"
    labels_in_range(kernel, spec.order, spec.X.shape[0], "order")
    if spec.loss_code in LABEL_LOSS_CODES:
        labels_in_range(kernel, spec.labels[spec.order], int(spec.widths[-1]),
                        "labels (of the samples in order)")
