"""The pieces of an epoch: each step's rows (``_BatchPlan``, ``epoch_order``,
``BatchGather``) and the fused path that runs a whole epoch in one ``train_epoch``
kernel call (``fused_epoch_runner``)."""
import math

import numpy as np

from . import distributed as distributed_module
from . import kernels
from . import optimizers as optimizers_module
from ._backend import backend_module, get_backend
from .callbacks import acts_per_batch
from .layers import Dense


class BatchPlan:
    """Which rows of an epoch's sample order each step of this process takes.

    Step b covers the global batch ``[b * parts * batch, (b + 1) * parts * batch)`` of
    the order (clipped to n); with ``parts`` ranks each takes its contiguous part of it
    (``distributed.split``: sizes differ by at most one, possibly empty in the last
    batch), so the steps are those of one process with batch ``parts * batch``.
    ``n_batches`` may exceed what n needs (a rank's own shard shorter than another's):
    the extra steps are empty on this rank. ``shard_sizes`` are every rank's n when
    each rank steps through its own shard (``parts`` is 1 then, and ``part`` this
    rank: its rows of a step follow those of the ranks before it, ``row_starts``).
    """

    def __init__(self, n, batch, parts=1, part=0, n_batches=None, shard_sizes=None):
        self.n, self.batch, self.parts, self.part = n, batch, parts, part
        self.global_batch = batch * parts
        self.n_batches = math.ceil(n / self.global_batch) if n_batches is None else n_batches
        self.shard_sizes = shard_sizes

    def bounds(self, b):
        start = min(b * self.global_batch, self.n)
        stop = min(start + self.global_batch, self.n)
        if self.parts == 1:
            return start, stop
        part = distributed_module.split(stop - start, self.parts, self.part)
        return start + part.start, start + part.stop

    def positions(self):
        """Where this process's rows of every step sit in the epoch's sample order,
        step after step: int64 (rows of this process in the epoch,)."""
        return np.concatenate([np.arange(*self.bounds(b), dtype=np.int64)
                               for b in range(self.n_batches)] or [np.empty(0, np.int64)])

    def row_starts(self):
        """Where this process's rows of each step start in the step's global batch (the
        ranks' rows in rank order): int64 (n_batches,)."""
        steps = np.arange(self.n_batches, dtype=np.int64)
        if self.shard_sizes is None:
            starts = np.array([self.bounds(b)[0] for b in steps], np.int64)
            return starts - np.minimum(steps * self.global_batch, self.n)
        before = np.asarray(self.shard_sizes[:self.part], np.int64)
        return np.clip(before[None, :] - steps[:, None] * self.batch, 0,
                       self.batch).sum(axis=1, dtype=np.int64)

    def global_rows(self):
        """Rows of each step over every process: float64 (n_batches,)."""
        starts = np.arange(self.n_batches, dtype=np.float64)
        if self.shard_sizes is None:
            return np.clip(self.n - starts * self.global_batch, 0, self.global_batch)
        sizes = np.asarray(self.shard_sizes, np.float64)
        return np.clip(sizes - starts[:, None] * self.batch, 0, self.batch).sum(axis=1)


def epoch_order(rng, n, shuffle, replacement):
    """Sample order for one epoch: None (in order), a permutation, or n draws."""
    if replacement:
        return rng.integers(0, n, size=n)
    if shuffle:
        return rng.permutation(n)
    return None


class BatchGather:
    """Rows of one batch: a view for in-order epochs, otherwise gathered into reusable
    buffers (np.take with out=, no fresh allocation per step)."""

    def __init__(self, X, target, weights):
        self.arrays = (X, target, weights)
        self.buffers = {}

    def __call__(self, order, start, stop):
        if order is None:
            return tuple(None if a is None else a[start:stop] for a in self.arrays)
        idx = order[start:stop]
        m = stop - start
        bufs = self.buffers.get(m)
        if bufs is None:
            bufs = self.buffers[m] = [None if a is None else np.empty((m,) + a.shape[1:], a.dtype)
                                      for a in self.arrays]
        for a, buf in zip(self.arrays, bufs):
            if a is not None:
                np.take(a, idx, axis=0, out=buf)
        return tuple(bufs)


def fused_epoch_runner(model, X, target, weights, plan, callbacks, comm=None):
    """The fast path: a whole epoch in one ``train_epoch`` kernel call.

    Taken when the model is a stack of Dense layers without regularization, the loss
    and optimizer have a kernel spec (``Loss.kernel_spec``, ``Optimizer.kernel_spec``:
    no gradient clipping, targets in a form the kernel reads), there are no sample
    weights, the only metric is accuracy and no callback needs per-batch calls
    (TerminateOnNaN is honoured), and, distributed, the backend reduces in its own
    loop (numba runs a hooked epoch in the numpy reference, 0.67x of numba's per-step
    path on the MNIST net; the bf16 epoch has no hook: a distributed bf16 fit runs step
    by step). It computes what the general path computes; set
    ``model.use_fused_epoch = False`` to force the general path. The optimizer's kernel
    spec is read once per fit: hyper-parameters changed by a callback in the middle of
    a fit take effect at the next fit (the learning rate and its scale are read every
    epoch). Returns ``run(order)`` like ``_python_epoch_runner``, or None.

    Distributed (``comm``), every rank takes the fused path or none does (a rank with
    sample weights or a batch-level callback sends every rank step by step, since the
    ranks meet in every step's sum). Each rank's call visits its rows of every global step
    (``plan.positions``) and the kernel averages the gradient over the ranks in every
    step: in MPI shared memory when every rank is on this node (the kernel sums and
    updates in the window itself, ``distributed.SharedMemoryReduction``, whose window
    is then the kernel's gradient buffer), else through its ``reduce`` hook, by an
    Iallreduce per layer started as soon as its backward is done
    (``distributed.GradientReduction``); the epoch's loss and hits are summed over the
    ranks.
    """
    dense = [layer for layer in model.layers if isinstance(layer, Dense)]
    optimizer_spec = (model.optimizer.kernel_spec()
                      if isinstance(model.optimizer, optimizers_module.Optimizer) else None)
    loss_spec = model.loss.kernel_spec(target)
    eligible = (
        model.use_fused_epoch and optimizer_spec is not None and loss_spec is not None
        and weights is None
        and (comm is None or (get_backend() != "numba" and model.precision != "bf16"))
        and len(dense) == len(model.layers) and not any(d.l1 or d.l2 for d in dense)
        and set(model.metrics) <= {"accuracy"}
        and not acts_per_batch(callbacks))
    if comm is not None:  # one path for all: a rank's batch callback or weights hold all back
        eligible = comm.sum([0.0 if eligible else 1.0])[0] == 0
    if not eligible:
        return None
    loss_code, loss_param, hits_per_sample = loss_spec
    widths = np.array([dense[0].in_features] + [d.out_features for d in dense], np.int64)
    acts = np.array([d.act_code for d in dense], np.int64)
    alphas = np.array([d.alpha for d in dense], np.float64)
    use_bias = np.array([d.use_bias for d in dense], np.int64)
    batch, n_batches = plan.batch, plan.n_batches
    workspace = np.empty(kernels.train_epoch_workspace_size(batch, widths), model.dtype)
    if target.ndim == 1:
        labels, targets = target, np.empty((0, model.n_outputs), model.dtype)
    else:
        labels, targets = np.empty(0, np.int64), target
    in_order = np.arange(X.shape[0], dtype=np.int64)
    lrs = np.empty(n_batches)
    stats = np.zeros(4)
    optimizer = model.optimizer
    reduction, positions, n_total = None, None, X.shape[0]
    if comm is not None:
        if comm.one_node and distributed_module.SHARED_MEMORY:
            reduction = distributed_module.SharedMemoryReduction.on_node(
                comm, model.grads, plan, widths, len(kernels.optimizer_states_used(
                    optimizer_spec.code, optimizer_spec.hyper)))
        if reduction is None:
            reduction = distributed_module.GradientReduction(comm, model.grads, [
                (start, start + sum(p.size for p in d.parameters()))
                for d, start in zip(dense, model.layer_offsets)], plan)
        positions, n_total = plan.positions(), plan.global_rows().sum()
    # The arguments that stay fixed over the fit; run() sets the per-epoch ones.
    fixed = kernels.TrainEpochSpec(
        X, labels, targets, in_order, batch, widths, acts, alphas, use_bias, model.params,
        model.grads if reduction is None else reduction.grads, workspace, loss_code,
        loss_param, optimizer=optimizer_spec, lrs=None, step=0, stats=stats,
        bf16=model.precision == "bf16")

    def run(order):
        order = in_order if order is None else order
        reduce = None
        if reduction is not None:
            order = order[positions]
            reduce = reduction.epoch()
        backend_module().train_epoch(fixed._replace(
            order=order, lrs=optimizer.upcoming_lrs(n_batches, lrs), step=optimizer.iterations,
            reduce=reduce))
        done = int(stats[2])
        optimizer.iterations += done
        if done < n_batches:
            if reduction is not None:
                reduction.stopped()
            return None, done, (float(stats[3]), done)
        loss_sum, hits = stats[:2] if comm is None else comm.sum(stats[:2])
        logs = {"loss": loss_sum / n_total}
        if model.metrics:
            logs["accuracy"] = hits / (n_total * hits_per_sample)
        return logs, done, None
    return run
