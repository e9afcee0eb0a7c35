"""fastnn.kernels: the compiled hot paths behind one contract.

Every backend module (``_numpy``, ``_numba``, ``_cython``) exposes the same functions
with the same positional arguments. Outputs are preallocated by the caller; a kernel
returns None or a scalar loss. Every kernel checks its arguments' shapes, dtypes and
lengths in O(1), and the class labels and sample indices it reads inside its loop, and
raises the same ValueError on every backend (``_checks``), so no call reads or writes
out of bounds; values are not validated (the API validates them once, at its
boundary). Arrays are C-contiguous float32 or float64, one dtype per call; integer
class labels are int64. Weights are stored (n_in, n_out): ``x @ w + b``.

This package never imports ``fastnn``: the API depends on the kernels, not back.
"""
import importlib
from typing import NamedTuple

# The integer codes kernels take, defined here once; every backend imports them. They
# are a fixed part of the contract: a code is never renumbered (a new one is appended).

# Activation codes (the ``act`` argument).
IDENTITY, STEP, SIGMOID, TANH, RELU, LEAKY_RELU, SOFTPLUS, ELU = range(8)

#: Activation name -> the integer code kernels take.
ACTIVATIONS = {
    "identity": IDENTITY,
    "step": STEP,
    "sigmoid": SIGMOID,
    "tanh": TANH,
    "relu": RELU,
    "leaky_relu": LEAKY_RELU,
    "softplus": SOFTPLUS,
    "elu": ELU,
}

#: Default ``alpha`` per activation code (leaky_relu slope, elu alpha; unused otherwise).
DEFAULT_ALPHA = (0.0, 0.0, 0.0, 0.0, 0.0, 0.01, 0.0, 1.0)

# Loss codes (``TrainEpochSpec.loss_code``).
CROSS_ENTROPY, MSE, MAE, HUBER, BINARY_CROSS_ENTROPY, HINGE = range(6)

#: Loss name -> the integer code ``train_epoch`` takes.
LOSS_CODES = {
    "cross_entropy": CROSS_ENTROPY,
    "mse": MSE,
    "mae": MAE,
    "huber": HUBER,
    "binary_cross_entropy": BINARY_CROSS_ENTROPY,
    "hinge": HINGE,
}

#: Loss codes whose targets are int64 class labels (the others take float targets).
LABEL_LOSS_CODES = (CROSS_ENTROPY, HINGE)

# Optimizer codes (``OptimizerSpec.code``).
SGD, ADAGRAD, RMSPROP, ADAM = range(4)

#: Optimizer name -> the integer code ``train_epoch`` takes.
OPTIMIZER_CODES = {"sgd": SGD, "adagrad": ADAGRAD, "rmsprop": RMSPROP, "adam": ADAM}

#: Optimizer name -> the layout of its float64 ``OptimizerSpec.hyper`` array (the
#: learning rate is not in it: ``TrainEpochSpec.lrs`` holds one per update; booleans
#: are 0.0 / 1.0).
OPTIMIZER_HYPER = {
    "sgd": ("momentum", "dampening", "weight_decay", "nesterov"),
    "adagrad": ("lr_decay", "weight_decay", "eps"),
    "rmsprop": ("alpha", "eps", "weight_decay", "momentum", "centered"),
    "adam": ("beta1", "beta2", "eps", "weight_decay", "decoupled", "amsgrad"),
}


class OptimizerSpec(NamedTuple):
    """The optimizer of a ``train_epoch`` call (``Optimizer.kernel_spec()`` builds it).

    ``code`` from ``OPTIMIZER_CODES``; ``hyper`` float64 laid out as
    ``OPTIMIZER_HYPER[name]``; ``states`` three (P,) buffers of the params' dtype, the
    optimizer's state in the order of its update kernel's arguments (unused ones are
    never touched and may alias a used one).
    """

    code: int
    hyper: object
    states: tuple


class TrainEpochSpec(NamedTuple):
    """The arguments of ``train_epoch(spec)``: what one epoch of mini-batch training of
    ``L`` dense layers reads and writes (see ``_numpy.train_epoch`` for the math).

    A fit builds one with the fields that stay fixed and ``_replace``s the per-epoch
    ones (``order``, ``optimizer``, ``lrs``, ``step``) before each call.

    X (n, widths[0]) float; labels int64 (n,) for the label losses (LABEL_LOSS_CODES),
    else targets (n, widths[L]) of X's dtype (the unused one may be empty); order int64
    (m,) the samples to visit, in batches of batch_size (the last may be smaller);
    widths int64 (L+1,); acts int64 (L,) activation codes; alphas float64 (L,) resolved
    alphas; use_bias int64 (L,) 0 / 1; params and grads (P,) holding, per layer,
    W (widths[l], widths[l+1]) row-major then b (widths[l+1],) if use_bias[l]; workspace
    at least ``train_epoch_workspace_size(batch_size, widths)`` elements; loss_code from
    LOSS_CODES with loss_param (huber delta, hinge margin, else 0.0); optimizer an
    OptimizerSpec; lrs float64 (number of batches,) the rate of each update; step the
    updates made before this epoch (update b is number step + b + 1); stats float64 (4,)
    the output (see ``train_epoch``); bf16 True runs every Dense product in bfloat16
    with float32 accumulation (float32 arrays only; see ``dense_forward_bf16``); reduce
    None or the gradient reduction of a data-parallel epoch, not with bf16: a callable
    (the ``REDUCE_*`` protocol below) or a ``NodeSum``.
    """

    X: object
    labels: object
    targets: object
    order: object
    batch_size: int
    widths: object
    acts: object
    alphas: object
    use_bias: object
    params: object
    grads: object
    workspace: object
    loss_code: int
    loss_param: float
    optimizer: OptimizerSpec
    lrs: object
    step: int
    stats: object
    bf16: bool = False
    reduce: object = None


# The calls ``train_epoch`` makes to ``TrainEpochSpec.reduce``, a callable
# ``reduce(phase, layer, value, rows) -> float`` that makes the gradient of each batch
# the mean over the global batch of every process (one rank's part of it is the batch
# here). With it, the epoch has ``len(lrs)`` steps: the batches of ``order``, then
# empty ones (a rank whose part ran out still takes part in every reduction), and
# plain SGD is not folded into the backward (the gradient must reach ``grads``).
# Per step: REDUCE_LOSS after the loss, with the local mean loss as ``value`` (0.0
# for no rows) and the local ``rows``; it returns the factor (this part's share of
# the global mass) the loss gradient is scaled by, so the sum of the ranks' gradients
# is the global mean. REDUCE_START with each ``layer`` (last first) once its W and b
# gradient in ``grads`` is complete: start its reduction. REDUCE_WAIT with each layer
# (last first) before its update: the reduced gradient must be in ``grads`` on
# return; the value returned is the global loss of the step, the same on every rank,
# and a non-finite one at the first wait ends the epoch before any update (``stats[3]``
# holds it; ``reduce`` completes the reductions it started). An exception in
# ``reduce`` ends the epoch and is raised by train_epoch.
REDUCE_LOSS, REDUCE_START, REDUCE_WAIT = range(3)


# The flags of a NodeSum segment (int64 at byte 8 * flag): the number of the last step
# in which its rank had written its gradient (READY), summed its own chunk (REDUCED),
# and finished reading the other segments (DONE); the first step of its last epoch with
# a split first layer (INIT: its columns of the shared first layer written), and how many
# such epochs it has ended (RELEASED: the shared first layer copied out). The loss slot
# (float64) follows at byte NODE_LOSS, the gradient at byte NODE_DATA, on cache lines
# of its own.
NODE_READY, NODE_REDUCED, NODE_DONE, NODE_INIT, NODE_RELEASED = range(5)
NODE_LOSS, NODE_DATA = 40, 64
#: NodeSum.stream_below's default (bytes/s): a rank whose string move of its block of
#: W1 ran slower streams its writes for the others. Measured per 400 KB: 6-13 us (31-73
#: GB/s) near or far on a Zen 5 VM and near on a Zen 4 one; 100-230 us (2-4 GB/s) far on
#: that Zen 4.
STREAM_BELOW = 10e9


class NodeSum(NamedTuple):
    """``TrainEpochSpec.reduce`` of a data-parallel epoch whose K ranks share memory
    (one node): the kernel sums the gradient itself, in the ranks' segments, and
    fuses the update into the sum. No Python runs between steps.

    segments: K writable uint8 arrays, rank r's segment (readable by every rank): five
    int64 flags (NODE_READY, NODE_REDUCED, NODE_DONE, NODE_INIT, NODE_RELEASED), the
    loss slot at byte NODE_LOSS, and from byte NODE_DATA the gradient, which is
    ``grads`` on this rank (``TrainEpochSpec.grads`` must be that very memory). rank: this rank. global_rows:
    float64 (len(lrs),) the rows of each step over every rank. spin: seconds a wait
    polls the flags before it sleeps between polls. sync: a callable that orders this
    process's loads and stores against the other ranks' (MPI ``Win.Sync``), called by
    the numpy reference around every flag; the compiled kernels use atomics instead.
    split_rows, shared, row_starts: the first layer split by columns (below), or 0.
    parent: the pid of this rank's launcher, or 0: a wait that has polled for ``spin``
    checks between its sleeps that it is still this process's parent, and once it is
    not (the launcher was killed; the ranks waited for may never come) the epoch ends
    and train_epoch raises RuntimeError (``LAUNCHER_GONE``). stream_below: bytes per
    second (the Cython kernel, split first layer with a private block of W1): a rank
    whose publish of its block (64 KiB or more) with a string move ran slower writes
    its block, dz, gradient and inputs for the others with streaming stores until its
    next timed publish (every 32 steps and the first of an epoch); 0 never streams, inf
    always does (any block). It changes no value, only where the cache lines go.

    Step s (= this rank's DONE flag + 1), after the loss: wait until every DONE flag
    is >= s - 1 (nobody still reads this segment), put rows x loss in the loss slot,
    scale the loss gradient by rows / global_rows[b]; backward into the segment; raise
    READY and wait for every READY; the global loss is the sum of the loss slots in
    rank order / global_rows[b]; add the other segments' chunk ``chunk(P, K, rank)`` to
    this segment's, in rank order, and raise REDUCED; then, unless the global loss is
    not finite (the epoch ends there, ``stats[3]`` holding it), run the optimizer step
    on each chunk of the parameters with its owner's summed chunk as the gradient (this
    rank's at once, the others' once their REDUCED is raised); raise DONE. Every chunk
    is summed once, by its owner, and every rank updates from the same bits, so the
    parameters stay bit-identical on every rank.

    Split first layer (``split_rows`` > 0; any optimizer): the first layer (W1 (d, k)
    then b1, P1 values) is not summed but computed over the whole global batch, each
    rank its columns ``chunk(k, K, rank)``, in ``shared``: one region of
    ``node_split_bytes(widths, split_rows, itemsize, n_states)`` bytes that every rank
    sees (the same memory), holding W1 by column blocks (rank r's columns [c0, c1) =
    ``chunk(k, K, r)`` as a C-ordered (d, c1 - c0) block from element d * c0), b1, the
    optimizer's used states of them laid out alike (``optimizer_states_used``:
    ``n_states`` of them), the global batch's inputs (two (split_rows, d) slots, step s
    in slot s % 2) and its dz (split_rows, k). Rank r's rows of step b are rows ``row_starts[b]`` on of the global
    batch (int64, (len(lrs),)); the ranks' rows tile rows [0, global_rows[b]),
    global_rows[b] <= split_rows. The epoch starts, once every RELEASED flag has reached this rank's
    (every rank has copied out the epochs before), with each rank copying its columns
    of W1 and b1, and of the used states, into ``shared`` and raising INIT to its first
    step; every rank waits for every INIT. Each step gathers its inputs into the slot, waits until
    every DONE is >= s - 1 (the first layer of the step before is written), runs the
    forward with the shared first layer, puts ``dz = dout * act'(a1)`` of its rows
    into the shared dz, and then takes the steps above over the parameters after P1;
    once the global loss is known to be finite and this rank's chunk is updated, it
    updates its columns over the global batch before DONE: plain SGD as ``W1[:, c] =
    (1 - lr wd) W1[:, c] - lr x.T @ dz[:, c]`` and ``b1[c] -= lr (dz[:, c].sum(0) + wd
    b1[c])`` (the update folded into the gemm, as one process folds it), any other
    optimizer by its step from ``x.T @ dz[:, c]`` and ``dz[:, c].sum(0)`` on the
    columns and their states in ``shared``. At the end every rank waits for every DONE,
    copies the shared first layer into ``params`` and its states into the optimizer's,
    and raises RELEASED by one. dW1 (most of the gradient of a wide input layer) is
    never summed. (The Cython kernel keeps its block of W1 (up to 1 MiB), its dz and its gradient
    in private memory and copies each into ``shared`` or its segment whole: a rank that
    writes into cache lines another CPU has just read waits for each line, which costs
    4-5x as much when the CPUs sit in different core complexes.)
    """

    segments: tuple
    rank: int
    global_rows: object
    spin: float
    sync: object
    split_rows: int = 0
    shared: object = None
    row_starts: object = None
    parent: int = 0
    stream_below: float = STREAM_BELOW


#: The error of a NodeSum wait that found its launcher gone (``NodeSum.parent``).
LAUNCHER_GONE = ("train_epoch: this rank's launcher (process {}) is gone while it waited "
                 "for the other ranks: the job was stopped from outside (mpiexec killed?), "
                 "and this rank stops too")


def optimizer_states_used(code, hyper):
    """The slots of ``OptimizerSpec.states`` that optimizer ``code`` with ``hyper``
    reads and writes, in order (the others are never touched): SGD's momentum buffer
    (momentum != 0); AdaGrad's sum; RMSProp's square average, momentum buffer
    (momentum > 0) and gradient average (centered); Adam's two moments and their
    running maximum (amsgrad)."""
    if code == OPTIMIZER_CODES["sgd"]:
        return (0,) if hyper[0] != 0 else ()
    if code == OPTIMIZER_CODES["adagrad"]:
        return (0,)
    if code == OPTIMIZER_CODES["rmsprop"]:
        return (0,) + ((1,) if hyper[3] > 0 else ()) + ((2,) if hyper[4] != 0 else ())
    return (0, 1) + ((2,) if hyper[5] != 0 else ())


def node_split_layout(widths, split_rows, itemsize, n_states=0):
    """The byte offsets in a NodeSum's ``shared`` region of the first layer (W1 by the
    ranks' column blocks, then b1), of its ``n_states`` optimizer states laid out
    alike (``optimizer_states_used``, in that order), of the two input slots and dz,
    and the region's size: each part on whole cache lines (b1 follows W1 whether or
    not the layer has a bias)."""
    d, k = int(widths[0]), int(widths[1])

    def lines(n):
        return -(-n * itemsize // 64) * 64

    states = lines(d * k + k)
    inputs = states + n_states * lines(d * k + k)
    dz = inputs + lines(2 * split_rows * d)
    return 0, states, inputs, dz, dz + lines(split_rows * k)


def node_split_bytes(widths, split_rows, itemsize, n_states=0):
    """Bytes of a NodeSum's ``shared`` region (``node_split_layout``)."""
    return node_split_layout(widths, split_rows, itemsize, n_states)[-1]


def chunk(n, parts, index):
    """The (start, stop) of ``range(n)`` that part ``index`` of ``parts`` gets:
    contiguous, sizes differing by at most one, the larger parts first (np.array_split's
    rule)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def train_epoch_workspace_size(batch_size, widths):
    """Elements of the ``workspace`` that ``train_epoch`` needs: every layer's output for
    one batch plus two gradient buffers of the widest layer."""
    return batch_size * (sum(widths) + 2 * max(widths))


def dense_stack_workspace_size(n, widths):
    """Elements of the ``workspace`` that ``dense_stack_forward`` needs for ``n`` rows:
    two buffers of the widest hidden layer, between which the hidden outputs alternate
    (0 for a single layer, which writes straight into ``out``)."""
    hidden = widths[1:-1]
    return 2 * n * max(hidden) if len(hidden) else 0


#: Backend names in the order ``default_backend`` tries them (see README: Backends).
BACKENDS = ("cython", "numba", "numpy")

_loaded = {}


def load(name):
    """Return the backend module ``name`` ("numba", "cython" or "numpy").

    Raises ValueError for an unknown name and ImportError (naming the reason) for a
    known backend that cannot be imported on this machine.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}._{name}")
        except ImportError as exc:
            raise ImportError(f"fastnn backend {name!r} cannot be loaded: {exc}") from exc
    return _loaded[name]


def available_backends():
    """Names of the backends that import on this machine, fastest first."""
    names = []
    for name in BACKENDS:
        try:
            load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def default_backend():
    """The fastest backend that loads (the ones after it are not imported)."""
    for name in BACKENDS:
        try:
            load(name)
        except ImportError:
            continue
        return name
    raise ImportError("no fastnn backend can be loaded")  # _numpy always loads
