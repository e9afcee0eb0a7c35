"""The fit loop: epochs of mini-batch steps or solver iterations over a Sequential.

``fit(model, X, y, ...)`` is what ``Sequential.fit`` runs. It validates the arguments
once, splits off validation data, then trains either

- batch by batch: each epoch in one fused ``train_epoch`` kernel call when the model
  allows it (``fused_epoch_runner``), otherwise step by step in Python
  (``_python_epoch_runner``); both return ``(logs, updates made, bad loss or None)``;
- or, for a full-batch solver, one solver iteration per epoch (``_fit_solver``).

A loss or weights that turn NaN/inf put back the weights of the last completed epoch
(``handle_divergence``); callbacks, progress display and ``History`` see the same
per-epoch logs on every path.
"""
import contextlib
import math
import time

import numpy as np

from . import distributed as distributed_module
from . import metrics as metrics_module
from . import optimizers as optimizers_module
from ._backend import get_backend
from ._epochs import BatchGather, BatchPlan, epoch_order, fused_epoch_runner
from ._history import History, _Progress
from ._labels import ClassLabels
from ._validation import all_finite, check_bool, check_float, check_int, check_seed
from .callbacks import (
    CSVLogger,
    ModelCheckpoint,
    TerminateOnNaN,
    acts_per_batch,
    check_callbacks,
    check_training_setup,
)
from .schedules import Schedule
from .solvers import Objective, Solver

#: Callbacks that only write files: a distributed fit runs them on rank 0 alone.
_WRITERS = (ModelCheckpoint, CSVLogger)


def fit(model, X, y, epochs=1, batch_size=32, shuffle=True, replacement=False,
        validation_data=None, validation_split=0.0, sample_weight=None,
        class_weight=None, callbacks=(), verbose=1, seed=None, distributed=False, *,
        prepared=False):
    """Train ``model`` (compiled) and return a History; see ``Sequential.fit``.

    ``prepared=True`` says X, y and sample_weight already are what ``model._prepare``
    returns (X C-contiguous in the model's dtype, finite, n_features wide; y the
    kernel-ready target; the weights checked), so they are not checked again: for a
    caller that has validated them itself (the sklearn estimators, through sklearn's
    checks, for the targets they build)."""
    model._require_compiled("fit")
    comm = distributed_module.communicator(distributed)
    arguments = (X, y, epochs, batch_size, shuffle, replacement, validation_data,
                 validation_split, sample_weight, class_weight, callbacks, verbose, seed,
                 prepared)
    if comm is None:
        with _labels_kept_if_refused(model):
            setup = _setup(model, *arguments)
        return _train(model, setup, None)
    with comm.abort_on_disagreement():
        with _labels_kept_if_refused(model):
            if not prepared:
                _agree_class_labels(model, comm, y)
            setup = None
            with comm.guard():
                setup = _setup(model, *arguments, own_part=comm.mode == "shards")
            setup = _distribute(model, comm, setup)
        return _train(model, setup, comm)


@contextlib.contextmanager
def _labels_kept_if_refused(model):
    """A fit refused before training (bad arguments or data, ranks that disagree)
    leaves ``model.class_labels`` as it found them: the labels it would have fixed
    must not constrain the next fit."""
    before = model.class_labels
    try:
        yield
    except BaseException:
        model.class_labels = before
        raise


def _agree_class_labels(model, comm, y):
    """Non-numeric class labels get one mapping on every rank: the sorted union of the
    ranks' labels (a rank's own part, with distributed="shards", may lack a class, and
    its codes would then mean other classes than on the other ranks)."""
    labels = None
    with comm.guard():
        labels = model._new_class_labels(y)
    gathered = [c for c in comm.gather_values(None if labels is None else labels.classes)
                if c is not None]
    if gathered and model.class_labels is None:
        with comm.guard():
            model._set_class_labels(ClassLabels(np.unique(np.concatenate(gathered))), "y")


class _Setup:
    """fit's validated arguments and data."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _setup(model, X, y, epochs, batch_size, shuffle, replacement, validation_data,
           validation_split, sample_weight, class_weight, callbacks, verbose, seed,
           prepared=False, own_part=False):
    """Validate fit's arguments (raising before any training) into a _Setup.

    ``own_part``: X is this rank's own part of a distributed fit ("shards"), whose
    weight sums _distribute checks over every rank's part."""
    epochs = check_int(epochs, "epochs", low=0)
    if isinstance(verbose, (bool, np.bool_)):
        verbose = int(verbose)
    verbose = check_int(verbose, "verbose", low=0, high=2)
    seed = check_seed(seed)
    if prepared:
        target, weights = y, sample_weight
    else:
        X, target, weights = model._prepare(X, y, sample_weight)
    raw_weights, n_all = weights, X.shape[0]
    weights, labels = _apply_class_weight(model, class_weight, target, weights)
    X, target, weights, val = _split_validation(model, X, target, weights,
                                                validation_data, validation_split,
                                                check_mass=not own_part)
    # "balanced" in a distributed fit on own shards counts every shard's samples:
    # _distribute re-weighs from these (the labels and weights before the split).
    balanced = (labels, raw_weights, X.shape[0] < n_all) \
        if isinstance(class_weight, str) else None
    if isinstance(class_weight, dict):  # validated: int keys, float values
        class_weight = {int(k): float(v) for k, v in class_weight.items()}
    shuffle = check_bool(shuffle, "shuffle")
    replacement = check_bool(replacement, "replacement")
    n = X.shape[0]
    batch_size = None if batch_size is None else check_int(batch_size, "batch_size", low=1)
    batch = n if batch_size is None else min(batch_size, n)
    callbacks = check_callbacks(callbacks)
    for cb in callbacks:
        cb.set_model(model)
    solver = isinstance(model.optimizer, Solver)
    logged = ("loss",) + tuple(model.metrics)
    check_training_setup(callbacks, logged + (tuple("val_" + k for k in logged)
                                              if val is not None else ()), solver)
    return _Setup(epochs=epochs, verbose=verbose, rng=np.random.default_rng(seed), seed=seed,
                  X=X, target=target, weights=weights, val=val, shuffle=shuffle,
                  replacement=replacement, batch=batch, batch_size=batch_size,
                  callbacks=callbacks, solver=solver, plan=BatchPlan(n, batch),
                  class_weight=class_weight, balanced=balanced,
                  split=val is not None and validation_data is None)


def _train(model, setup, comm):
    """Run the validated fit on this process (one rank of it when ``comm`` is set)."""
    loop = _FitLoop(model, setup.callbacks, setup.val, comm,
                    "iteration" if setup.solver else "epoch")
    if comm is not None and not setup.solver:  # a solver keeps its own point
        loop.share_state = setup.callbacks_anywhere
        loop.share_rate = setup.batch_callbacks_anywhere
    verbose = setup.verbose if comm is None or comm.rank == 0 else 0
    with _guarded(comm):
        for cb in loop.callbacks:
            cb.on_train_begin({})
    start = time.perf_counter()
    try:
        if setup.solver:
            loop.progress = _Progress(verbose, setup.epochs, 1, unit="iteration")
            loop.history.n_evaluations = loop.fit_solver(setup.X, setup.target,
                                                         setup.weights, setup.epochs)
        else:
            loop.progress = _Progress(verbose, setup.epochs, setup.plan.n_batches)
            loop.history.n_evaluations = loop.fit_minibatch(setup)
    finally:
        if loop.progress is not None:
            loop.progress.close()
    if model.stop_reason is None:
        model.stop_reason = f"completed {setup.epochs} epochs"
    loop.history.stop_reason = model.stop_reason
    loop.history.seconds = time.perf_counter() - start
    with _guarded(comm):
        for cb in loop.callbacks:
            cb.on_train_end({})
    if comm is not None:
        comm.sync()
        if setup.callbacks_anywhere:
            _take_rank0_state(model, comm)
    return loop.history


def _take_rank0_state(model, comm):
    """Every rank takes rank 0's weights, optimizer state, learning-rate scale and (a
    number) learning rate. Callbacks may differ between the ranks and change these
    (EarlyStopping(restore_best_weights=True) or ReduceLROnPlateau on rank 0 alone): a
    fit with callbacks on any rank calls this after every epoch and at its end, so the
    ranks never drift apart and every rank ends with rank 0's model."""
    comm.broadcast(model.params)
    if isinstance(model.optimizer, optimizers_module.Optimizer):
        for name in sorted(model.optimizer.state):
            comm.broadcast(model.optimizer.state[name])
        _take_rank0_rate(model.optimizer, comm)


def _take_rank0_rate(optimizer, comm):
    """Every rank takes rank 0's learning-rate scale and (a number) learning rate: after
    every step when a rank has a callback acting per batch (a warm-up, say)."""
    rate = None if isinstance(optimizer.lr, Schedule) else optimizer.lr
    rate, optimizer.lr_scale = comm.broadcast_object(
        (rate, optimizer.lr_scale) if comm.rank == 0 else None)
    if rate is not None:
        optimizer.lr = rate


#: What _guarded gives a fit on one process (nullcontext is stateless, so reusable).
_UNGUARDED = contextlib.nullcontext()


def _guarded(comm):
    """Around rank-local work in a distributed fit: an exception is shared with every
    rank at the next collective instead of leaving them waiting in it."""
    return _UNGUARDED if comm is None else comm.guard()


def _distribute(model, comm, setup):
    """Make every rank's fit consistent, then give each rank its part of the data.

    Checks that model, compile settings, fit arguments (and, with the full data set on
    every rank, the data) agree; shares a seed drawn on rank 0 when none was given;
    broadcasts rank 0's parameters and optimizer state. With the full data set the
    validation set is split between the ranks, and a solver trains on this rank's
    contiguous part; in "shards" mode each rank shuffles its own part (seeded by the
    shared seed and its rank) and an epoch has as many steps as the largest part needs.
    """
    comm.check_same({} if setup is None else _description(model, comm, setup))
    # callbacks may differ between ranks: _take_rank0_state keeps the ranks together
    callbacks = comm.gather_values((bool(setup.callbacks), acts_per_batch(setup.callbacks)))
    setup.callbacks_anywhere = any(some for some, _ in callbacks)
    setup.batch_callbacks_anywhere = any(per_batch for _, per_batch in callbacks)
    seed = setup.seed
    if seed is None:
        seed = comm.broadcast_object(int(np.random.SeedSequence().entropy % 2 ** 63)
                                     if comm.rank == 0 else None)
    setup.rng = np.random.default_rng(seed if comm.mode == "full" else [seed, comm.rank])
    comm.broadcast(model.params)
    if isinstance(model.optimizer, optimizers_module.Optimizer):
        for name in sorted(model.optimizer.state):
            comm.broadcast(model.optimizer.state[name])
    if comm.mode == "shards":  # every rank takes the same number of steps
        if setup.balanced is not None:
            _balance_over_shards(model, comm, setup)
        _check_shard_masses(comm, setup)
        sizes = comm.gather_values(setup.X.shape[0])
        batch = setup.batch_size or max(sizes)
        setup.plan = BatchPlan(setup.X.shape[0], batch, part=comm.rank,
                               n_batches=math.ceil(max(sizes) / batch), shard_sizes=sizes)
        return setup
    if setup.val is not None:
        part = distributed_module.split(setup.val[0].shape[0], comm.size, comm.rank)
        setup.val = tuple(None if a is None else a[part] for a in setup.val)
    n = setup.X.shape[0]
    if setup.solver:
        if n < comm.size:
            comm.raise_agreed(ValueError(f"a distributed solver needs at least one training "
                                         f"sample per rank: {n} samples for {comm.size} ranks"))
        part = distributed_module.split(n, comm.size, comm.rank)
        setup.X, setup.target = setup.X[part], setup.target[part]
        setup.weights = None if setup.weights is None else setup.weights[part]
    setup.plan = BatchPlan(n, setup.batch, parts=comm.size, part=comm.rank)
    return setup


def _check_shard_masses(comm, setup):
    """Own parts: the training parts, and the validation parts split off them, must
    weigh something over all the ranks together (one rank's part may weigh nothing)."""
    train_mass = setup.X.shape[0] if setup.weights is None else setup.weights.sum()
    val_mass = 1.0  # validation_data: its weights were checked on their own
    if setup.split:
        X_val, _, w_val = setup.val
        val_mass = X_val.shape[0] if w_val is None else w_val.sum()
    train_mass, val_mass = comm.sum([train_mass, val_mass])
    try:
        _check_split_mass(train_mass, val_mass, "validation parts (the last samples of "
                                                "every rank's part)")
    except ValueError as exc:
        comm.raise_agreed(exc)


def _balance_over_shards(model, comm, setup):
    """class_weight="balanced" on own shards: weigh the classes by their counts over
    every rank's shard, as one process would over the concatenated shards."""
    labels, raw_weights, split = setup.balanced
    n_classes = max(model.n_outputs, 2)
    counts = comm.sum(class_counts(labels, n_classes))
    # The same classes and labels as the local "balanced" of _setup, which passed; only
    # the factors change (positive for every class present), so no check can fail here.
    weights, _ = _apply_class_weight(model, "balanced", labels, raw_weights, counts)
    n = setup.X.shape[0]
    setup.weights = weights[:n]
    if split:
        setup.val = setup.val[:2] + (weights[n:],)


def _description(model, comm, setup):
    """What must agree between the ranks before the first step."""
    optimizer = model.optimizer
    # Initial weights and dropout seeds may differ: rank 0's weights are broadcast and
    # each rank draws its own dropout masks.
    layers = [{k: v for k, v in layer.get_config().items() if k != "seed"}
              for layer in model.layers]
    description = {**{f"layers[{i}]": config for i, config in enumerate(layers)},
        "n_layers": len(layers), "dtype": model.dtype.name,
        "n_features": model.n_features, "loss": model.loss.get_config(),
        "metrics": list(model.metrics), "optimizer": optimizer.get_config(),
        "optimizer_iterations": optimizer.iterations, "backend": get_backend(),
        "epochs": setup.epochs, "batch_size": setup.batch_size, "shuffle": setup.shuffle,
        "replacement": setup.replacement, "seed": setup.seed,
        "class_weight": setup.class_weight, "validation": setup.val is not None,
        "classes": None if model.class_labels is None else model.class_labels.classes.tolist(),
        "TerminateOnNaN": any(isinstance(cb, TerminateOnNaN) for cb in setup.callbacks)}
    if comm.mode == "full":
        description["n_samples"] = setup.X.shape[0]
        description["data checksum"] = distributed_module.fingerprint(
            setup.X, setup.target, setup.weights, *(setup.val or ()))
    return description


def _split_validation(model, X, target, weights, validation_data, validation_split,
                      check_mass=True):
    """(X, target, weights, val) with val = (X_val, target_val, weights_val) or None;
    with ``check_mass``, ValueError if the weights of either part are all zero."""
    validation_split = check_float(validation_split, "validation_split", low=0.0,
                                   high=1.0, high_open=True)
    if validation_data is not None and validation_split:
        raise ValueError("pass either validation_data or validation_split, not both")
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise TypeError("validation_data must be a tuple (X_val, y_val) or "
                            "(X_val, y_val, sample_weight_val)")
        wv = validation_data[2] if len(validation_data) == 3 else None
        val = model._prepare(validation_data[0], validation_data[1], wv, name="X_val")
        return X, target, weights, val
    if not validation_split:
        return X, target, weights, None
    n_val = int(round(X.shape[0] * validation_split))
    if not 1 <= n_val < X.shape[0]:
        raise ValueError(f"validation_split={validation_split} leaves {n_val} "
                         f"validation samples out of {X.shape[0]}; need 1..n-1")
    cut = X.shape[0] - n_val
    val = (X[cut:], target[cut:], None if weights is None else weights[cut:])
    if weights is not None:
        if check_mass:
            _check_split_mass(weights[:cut].sum(), weights[cut:].sum(),
                              f"validation part (the last {n_val} samples)")
        weights = weights[:cut]
    return X[:cut], target[:cut], weights, val


def _check_split_mass(train_mass, val_mass, validation):
    """ValueError if the training part or the ``validation`` part weighs nothing."""
    for mass, what in ((train_mass, "training part"), (val_mass, validation)):
        if mass <= 0:
            raise ValueError(f"the sample weights (sample_weight times class_weight) are "
                             f"all zero on the {what}")


def _apply_class_weight(model, class_weight, target, weights, counts=None):
    """(per-sample weights scaled by ``class_weight[label]``, a new contiguous array;
    the labels), or (``weights``, None) without class_weight. "balanced" weighs class c
    by n / (n_classes * count_c) from ``counts`` (float64 (max(n_outputs, 2),)),
    by default this data's."""
    if class_weight is None:
        return weights, None
    balanced = isinstance(class_weight, str) and class_weight == "balanced"
    if isinstance(class_weight, str) and not balanced:
        raise ValueError(f"class_weight must be a dict {{class: weight}} or 'balanced', "
                         f"got {class_weight!r}")
    if not (balanced or isinstance(class_weight, dict)):
        raise TypeError(f"class_weight must be a dict {{class: weight}} or 'balanced', "
                        f"got {type(class_weight).__name__}")
    if not model.loss.classification:
        raise ValueError(f"class_weight needs a classification loss (cross_entropy, "
                         f"binary_cross_entropy or hinge), but the model's loss is "
                         f"{model.loss.name!r}; weight samples with sample_weight instead")
    if target.ndim == 1:
        labels = target
    elif target.shape[1] == 1 and np.all((target == 0) | (target == 1)):
        labels = target[:, 0].astype(np.int64)
    else:
        raise ValueError("class_weight needs integer labels or a single 0/1 target column, "
                         f"got targets of shape {target.shape}"
                         + ("" if target.shape[1] != 1 else " with values other than 0 and 1"))
    factors = np.ones(max(model.n_outputs, 2), dtype=np.float64)
    if balanced:  # scikit-learn's n_samples / (n_classes * count)
        if counts is None:
            counts = class_counts(labels, factors.size)
        present = counts > 0
        factors[present] = counts.sum() / (np.count_nonzero(present) * counts[present])
        class_weight = {}
    for cls, w in class_weight.items():
        if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or \
                not 0 <= cls < factors.size:
            raise ValueError(f"class_weight key {cls!r} is not a class in "
                             f"[0, {factors.size - 1}]")
        factors[cls] = check_float(w, f"class_weight[{cls}]", low=0.0)
    combined = factors[labels].astype(model.dtype)
    if weights is not None:
        combined *= weights
    if combined.sum() <= 0:
        raise ValueError("class_weight and sample_weight give every sample zero weight")
    return np.ascontiguousarray(combined), labels


def class_counts(labels, n_classes):
    """How many of ``labels`` each class in [0, n_classes) has, as float64."""
    return np.bincount(labels, minlength=n_classes).astype(np.float64)


class _FitLoop:
    """The state one ``fit`` call shares between its epochs: model, callbacks, progress
    display, History, validation set and, in a distributed fit, the communicator."""

    def __init__(self, model, callbacks, val, comm, unit):
        self.model, self.val, self.comm = model, val, comm
        self.share_state = False  # _take_rank0_state after every epoch
        self.share_rate = False   # _take_rank0_rate after every step
        if comm is not None and comm.rank != 0:  # rank 0 alone writes files
            callbacks = [cb for cb in callbacks if not isinstance(cb, _WRITERS)]
        self.callbacks = callbacks
        self.terminate_on_nan = any(isinstance(cb, TerminateOnNaN) for cb in callbacks)
        self.history = History(unit, writes_files=comm is None or comm.rank == 0)
        self.progress = None
        model.history = self.history
        model.stop_training, model.stop_reason = False, None

    def end_epoch(self, epoch, logs):
        """Add validation logs, then tell callbacks, History and the progress display.
        In a distributed fit every rank ends up with the same logs and the same
        decision to stop (any rank's callback stopping stops them all)."""
        model, comm = self.model, self.comm
        if self.val is not None:
            logs.update({"val_" + k: v for k, v in _evaluate(model, comm, self.val).items()})
        with _guarded(comm):
            for cb in self.callbacks:
                cb.on_epoch_end(epoch, logs)
                if model.stop_training and model.stop_reason is None:
                    model.stop_reason = (f"stopped by {type(cb).__name__} after "
                                         f"{self.history.unit} {epoch + 1}")
            self.history.append(epoch, logs)
            self.progress.epoch_done(epoch, logs)
        if comm is not None:
            model.stop_training, model.stop_reason = comm.agree_stop(model.stop_training,
                                                                     model.stop_reason)
            if self.share_state:
                _take_rank0_state(model, comm)

    def begin_epoch(self, epoch):
        with _guarded(self.comm):
            for cb in self.callbacks:
                cb.on_epoch_begin(epoch, {})
            self.progress.epoch_begin(epoch)

    def handle_divergence(self, loss, batch, epoch, epoch_start_params):
        """Put back the weights of the last completed epoch; stop cleanly (TerminateOnNaN)
        or raise FloatingPointError.

        ``loss`` is the non-finite batch loss, or None when the loss was finite but the
        update made the weights non-finite. Weights that are still finite but already
        give a non-finite loss are not kept either: they predict inf/NaN.
        """
        model, comm = self.model, self.comm
        model.params[...] = epoch_start_params
        what = "the weights became NaN or infinite" if loss is None else f"loss became {loss}"
        if comm is not None and loss is not None and comm.nonfinite_ranks:
            what += (f" (on the batch part of rank "
                     f"{', '.join(map(str, comm.nonfinite_ranks))} of {comm.size})")
        message = (f"{what} at epoch {epoch + 1}, batch {batch + 1}; training stopped and "
                   "the last finite weights (from the end of the last completed epoch) were "
                   "kept (try a lower learning rate, gradient clipping or input scaling)")
        if not self.terminate_on_nan:
            _raise_agreed(comm, FloatingPointError(message))
        model.stop_training = True
        model.stop_reason = message
        if loss is not None:
            with _guarded(comm):
                for cb in self.callbacks:
                    cb.on_batch_end(batch, {"loss": loss})

    # ------------------------------------------------------------ mini-batch training
    def fit_minibatch(self, setup):
        """The first-order loop: one optimizer step per mini-batch, each epoch either in
        one fused kernel call (which, distributed, averages each layer's gradient over
        the ranks in mid-epoch) or batch by batch in Python. Returns the number of
        gradient evaluations."""
        model, plan = self.model, setup.plan
        run_fused = fused_epoch_runner(model, setup.X, setup.target, setup.weights, plan,
                                       self.callbacks, self.comm)
        run_epoch = run_fused or self._python_epoch_runner(setup.X, setup.target,
                                                           setup.weights, plan)
        steps = 0
        for epoch in range(setup.epochs):
            self.begin_epoch(epoch)
            epoch_start_params = model.params.copy()
            order = epoch_order(setup.rng, plan.n, setup.shuffle, setup.replacement)
            logs, done, bad = run_epoch(order)
            steps += done
            if bad is not None:
                self.handle_divergence(*bad, epoch, epoch_start_params)
                return steps
            if run_fused is not None:
                self.progress.batch_done(plan.n_batches)
            if not all_finite(model.params):
                # a finite loss can still come with an update that overflows the weights
                self.handle_divergence(None, plan.n_batches - 1, epoch, epoch_start_params)
                return steps
            self.end_epoch(epoch, logs)
            if model.stop_training:
                break
        return steps

    def _python_epoch_runner(self, X, target, weights, plan):
        """The general path: ``run(order) -> (logs, updates made, None or (the
        non-finite loss, its batch))``.

        A batch whose sample weights are all zero makes no step; an epoch whose every
        batch weighs nothing (possible only when drawing with replacement) raises
        ValueError. Distributed, each rank computes the gradient of its part of the
        global batch and ``Communicator.average_gradient`` makes the global one (and the
        global weight); metrics are summed over the ranks at the end of the epoch."""
        model, callbacks, progress, comm = self.model, self.callbacks, self.progress, self.comm
        gather = BatchGather(X, target, weights)

        def run(order):
            metrics = metrics_module.build(model.metrics, model.loss)
            total = mass = 0.0
            steps = 0
            for b in range(plan.n_batches):
                xb, yb, wb = gather(order, *plan.bounds(b))
                if comm is None:
                    batch_mass = float(xb.shape[0] if wb is None else wb.sum(dtype=np.float64))
                    loss, out = (model._loss_and_grad(xb, yb, wb, training=True)
                                 if batch_mass else (0.0, None))
                else:  # the global mass: the same on every rank
                    loss, out, batch_mass = _distributed_step(model, comm, xb, yb, wb)
                if batch_mass == 0:  # every weight zero: no loss, no gradient, no step
                    with _guarded(comm):
                        progress.batch_done()
                    continue
                if not math.isfinite(loss):
                    return None, steps, (loss, b)
                model.optimizer.step(model.params, model.grads)
                steps += 1
                total += loss * batch_mass
                mass += batch_mass
                with _guarded(comm):
                    for metric in metrics if out is not None else ():
                        metric.update(out, yb)
                    for cb in callbacks:
                        cb.on_batch_end(b, {"loss": loss})
                    progress.batch_done()
                if self.share_rate:  # (a failed callback stops every rank at the next sum)
                    _take_rank0_rate(model.optimizer, comm)
            if not steps:  # mass is global: every rank raises
                _raise_agreed(comm, ValueError(
                    "every sample drawn in this epoch has sample weight 0 (sample_weight "
                    "times class_weight), so no step was made; draw without replacement "
                    "(replacement=False visits every sample) or weigh fewer samples 0"))
            if comm is not None:
                comm.reduce_metrics(metrics, model.n_outputs)
            logs = {"loss": total / mass}
            logs.update({m.name: m.result() for m in metrics if m.count})
            return logs, steps, None
        return run

    # ------------------------------------------------------------ full-batch solvers
    def fit_solver(self, X, target, weights, epochs):
        """Full-batch solver: fit epoch = one solver iteration. Returns the number of
        loss/gradient evaluations."""
        model = self.model
        objective = Objective(model, X, target, weights, self.comm)
        last_good = model.params.copy()
        epoch = 0

        def on_iteration(x, loss):
            nonlocal epoch
            self.begin_epoch(epoch)
            model.params[...] = x
            if not math.isfinite(loss):
                self.handle_divergence(loss, 0, epoch, last_good)
                return True
            last_good[...] = model.params
            logs = {"loss": loss}
            if model.metrics:
                logs.update(_solver_metrics(model, objective, x, target, self.comm))
            with _guarded(self.comm):
                for cb in self.callbacks:
                    cb.on_batch_end(0, {"loss": loss})
            self.end_epoch(epoch, logs)
            epoch += 1
            return model.stop_training

        reason = model.optimizer.minimize(objective, model.params.astype(np.float64), epochs,
                                          on_iteration)
        if reason is not None and model.stop_reason is None:
            model.stop_reason = reason
        return objective.n_evals


def _raise_agreed(comm, exc):
    """Raise ``exc``, which (in a distributed fit) every rank raises at this point."""
    if comm is not None:
        comm.raise_agreed(exc)
    raise exc


def _distributed_step(model, comm, xb, yb, wb):
    """This rank's part of one global step: ``(global loss, this rank's network output
    or None, global sample-weight mass)``; ``model.grads`` holds the global gradient."""
    loss, out, mass = 0.0, None, 0.0
    if xb.shape[0]:
        with comm.guard():
            mass = float(xb.shape[0] if wb is None else wb.sum(dtype=np.float64))
            loss, out = model._loss_and_grad(xb, yb, wb, training=True)
    loss, total = comm.average_gradient(model.grads, loss, mass)
    return loss, out, total


def _evaluate(model, comm, val):
    """Validation logs: ``model._evaluate`` on one process; distributed, the loss and
    metrics over every rank's part of the validation set."""
    if comm is None:
        return model._evaluate(*val)
    X, target, weights = val
    metrics = metrics_module.build(model.metrics, model.loss)
    total = mass = 0.0
    with comm.guard():
        if X.shape[0]:
            out = model._forward(X, False)
            mass = float(X.shape[0] if weights is None else weights.sum(dtype=np.float64))
            if mass > 0:
                total = model.loss(out, target, weights, None) * mass
            for metric in metrics:
                metric.update(out, target)
    total, mass = comm.sum([total, mass])
    comm.reduce_metrics(metrics, model.n_outputs)
    logs = {"loss": total / mass + model._regularization_loss()}
    logs.update({m.name: m.result() for m in metrics})
    return logs


def _solver_metrics(model, objective, x, target, comm):
    """Metrics at the solver's new point ``x``, from the network output of the
    objective's last evaluation when that was at ``x`` (every solver evaluates its
    accepted point last, so this is the usual case); otherwise one inference pass.
    Distributed, over every rank's part of the training set."""
    out = objective.output_at(x)
    if out is None:
        logs = _evaluate(model, comm, (objective.X, target, objective.weights))
        logs.pop("loss")
        return logs
    metrics = metrics_module.build(model.metrics, model.loss)
    with _guarded(comm):
        for metric in metrics:
            metric.update(out, target)
    if comm is not None:
        comm.reduce_metrics(metrics, model.n_outputs)
    return {m.name: m.result() for m in metrics}
