"""Sequential: a stack of layers over one flat parameter buffer, with a Keras-like fit.

The model owns one contiguous parameter vector ``params`` and one gradient vector
``grads`` of the same size; every layer's ``W``/``b`` (and ``dW``/``db``) are views into
them. An optimizer step is then one kernel call over the whole model, a solver gets
the vector without copying, and save/load is one array. ``grads`` is the training
loop's scratch: after ``fit`` it holds no defined values (the fused epoch folds plain
SGD into its backward and may never write it); ``compute_gradients`` gives gradients.
"""
import math
import sys
import time

import numpy as np

from . import _model_file, kernels
from . import losses as losses_module
from . import metrics as metrics_module
from . import optimizers as optimizers_module
from ._validation import (
    all_finite,
    check_array,
    check_features,
    check_float,
    check_int,
    check_sample_weight,
    check_seed,
)
from .callbacks import Callback, TerminateOnNaN
from ._backend import backend_module
from .layers import Dense, Layer, _BatchBuffers
from .solvers import Objective, Solver

_CHUNK_ROWS = 8192


class NotCompiledError(RuntimeError, ValueError):
    """The model was used for training/evaluation before ``compile``."""


class History:
    """What ``fit`` returns: ``history`` maps "loss", metrics and "val_*" to per-epoch
    lists; ``epoch`` lists the epoch indices run; ``stop_reason`` says why fit ended."""

    def __init__(self):
        self.history = {}
        self.epoch = []
        self.stop_reason = None

    def append(self, epoch, logs):
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def plot(self, path=None, keys=None):
        """Plot the per-epoch curves with matplotlib (``pip install fastnn[plot]``).

        Saves to ``path`` when given; returns the matplotlib Figure.
        """
        try:
            if path is None:
                import matplotlib.pyplot as plt
            else:  # draw off-screen without switching the process's matplotlib backend
                from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("History.plot needs matplotlib: pip install 'fastnn[plot]'"
                              ) from exc
        keys = [k for k in (keys or self.history) if not k.startswith("val_") and k != "lr"]
        size = (4.5 * max(len(keys), 1), 3.5)
        fig = plt.figure(figsize=size) if path is None else Figure(figsize=size)
        axes = fig.subplots(1, max(len(keys), 1), squeeze=False)
        epochs = [e + 1 for e in self.epoch]
        for ax, key in zip(axes[0], keys):
            ax.plot(epochs, self.history[key], label=key)
            if "val_" + key in self.history:
                ax.plot(epochs, self.history["val_" + key], label="val_" + key)
            ax.set_xlabel("epoch")
            ax.set_title(key)
            ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"


class Sequential:
    """A feed-forward stack of layers trained as one model.

    Example::

        model = fn.Sequential([fn.Dense(64, 128, activation="relu"), fn.Dense(128, 10)])
        model.compile(loss="cross_entropy", optimizer="adam", metrics=["accuracy"])
        model.fit(X, y, epochs=20, batch_size=32)
    """

    def __init__(self, layers=None):
        layers = list(layers or [])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] must be a fastnn layer, got {type(layer).__name__}")
        self.layers = layers
        self.loss = None
        self.optimizer = None
        self.metrics = ()
        self.stop_training = False
        self.stop_reason = None
        #: Run each epoch in one fused kernel call when the model allows (see fit).
        self.use_fused_epoch = True
        self._buffers = _BatchBuffers()
        if layers:
            self._build()

    # ------------------------------------------------------------------ structure
    def add(self, layer):
        """Append a layer (weights of the existing layers are kept)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"layer must be a fastnn layer, got {type(layer).__name__}")
        self.layers.append(layer)
        self._build()

    def _build(self):
        dense = [layer for layer in self.layers if isinstance(layer, Dense)]
        if not dense:
            raise ValueError("a Sequential model needs at least one Dense layer")
        dtypes = {layer.dtype for layer in self.layers}
        if len(dtypes) != 1:
            raise ValueError(f"all layers must share one dtype, got {sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop()
        width = self.n_features = dense[0].in_features
        for layer in self.layers:
            width = layer.output_features(width)
        self.n_outputs = width
        arrays = [p for layer in self.layers for p in layer.parameters()]
        total = sum(p.size for p in arrays)
        self.params = np.empty(total, dtype=self.dtype)
        self.grads = np.zeros(total, dtype=self.dtype)
        offset = 0
        for layer in self.layers:
            if not isinstance(layer, Dense):
                continue
            views = {}
            for name, grad_name in (("W", "dW"), ("b", "db")):
                if name == "b" and not layer.use_bias:
                    continue
                arr = getattr(layer, name)
                view = self.params[offset:offset + arr.size].reshape(arr.shape)
                view[...] = arr
                views[name] = view
                views[grad_name] = self.grads[offset:offset + arr.size].reshape(arr.shape)
                offset += arr.size
            for name, view in views.items():
                setattr(layer, name, view)
        self._first_trainable = next(i for i, layer in enumerate(self.layers) if layer.trainable)
        if isinstance(self.optimizer, optimizers_module.Optimizer):
            self.optimizer.build(self.params.size, self.dtype, owner=self)

    @property
    def n_params(self):
        """Total number of trainable parameters."""
        return self.params.size

    def parameters(self):
        """The per-layer parameter views, in get_weights() order (not copies)."""
        return [p for layer in self.layers for p in layer.parameters()]

    def zero_grad(self):
        self.grads[...] = 0

    # ------------------------------------------------------------------ compile
    def compile(self, loss, optimizer="adam", metrics=None):
        """Set the loss (name or fastnn.losses.Loss), optimizer (name or object) and
        metric names ("accuracy", "mae", "mse", "r2")."""
        self._require_layers("compile")
        loss = losses_module.get(loss)
        loss.check_outputs(self.n_outputs)
        self.metrics = metrics_module.check_metrics(metrics, loss)
        self.loss = loss
        optimizer = optimizers_module.get(optimizer)
        if isinstance(optimizer, Solver):
            optimizer.check_model(self)
        self.optimizer = optimizer
        if isinstance(optimizer, optimizers_module.Optimizer):
            optimizer.build(self.params.size, self.dtype, owner=self)
        return self

    def _require_layers(self, what):
        if not self.layers:
            raise ValueError(f"{what} needs a model with layers; this Sequential is empty: "
                             "add a fastnn.Dense layer first")

    def _require_compiled(self, what):
        _require_compiled_model(self, what)

    # ------------------------------------------------------------------ passes
    def _forward(self, x, training):
        for layer in self.layers:
            x = layer._forward(x, training)
        return x

    def _backward(self, dout):
        for i in range(len(self.layers) - 1, self._first_trainable - 1, -1):
            dout = self.layers[i]._backward(dout, need_dx=i > self._first_trainable)

    def _regularization_loss(self):
        return sum(layer.regularization_loss() for layer in self.layers)

    def _loss_and_grad(self, x, target, weights, training):
        """Forward, loss, backward: fills ``self.grads``; returns loss (+ regularization)."""
        out = self._forward(x, training)
        dout = self._buffers.get(x.shape[0], {"dout": (self.n_outputs,)}, self.dtype)["dout"]
        loss = self.loss(out, target, weights, dout)
        self._backward(dout)
        for layer in self.layers:
            if layer.trainable and (layer.l1 or layer.l2):
                loss += layer.regularization_loss()
                layer.add_regularization_gradient()
        return loss, out

    def _check_X(self, X, name="X"):
        self._require_layers("the forward pass")
        return check_features(X, name, self.dtype, self.n_features)

    def _prepare(self, X, y, sample_weight, name="X"):
        X = self._check_X(X, name)
        target = self.loss.prepare_target(y, X.shape[0], self.n_outputs, self.dtype,
                                          "y" if name == "X" else name.replace("X", "y"))
        weights = check_sample_weight(sample_weight, X.shape[0], self.dtype)
        return X, target, weights

    # ------------------------------------------------------------------ inference
    def forward(self, X, batch_size=None):
        """Raw network output (logits for classification losses), shape (n, n_outputs)."""
        X = self._check_X(X)
        return np.concatenate([self._forward(X[s], False).copy()
                               for s in _chunks(X.shape[0], batch_size)])

    def predict(self, X, batch_size=None):
        """Output through the loss's link: softmax / sigmoid probabilities for
        cross_entropy / binary_cross_entropy, raw scores for hinge, values for regression."""
        self._require_compiled("predict")
        X = self._check_X(X)
        return np.concatenate([self.loss.link(self._forward(X[s], False))
                               for s in _chunks(X.shape[0], batch_size)])

    def evaluate(self, X, y, sample_weight=None, batch_size=None):
        """{"loss": ..., metric: ...} over the whole set (loss includes regularization)."""
        self._require_compiled("evaluate")
        X, target, weights = self._prepare(X, y, sample_weight)
        return self._evaluate(X, target, weights, batch_size)

    def _evaluate(self, X, target, weights, batch_size=None):
        metrics = metrics_module.build(self.metrics, self.loss)
        total = mass = 0.0
        for s in _chunks(X.shape[0], batch_size):
            out = self._forward(X[s], False)
            w = None if weights is None else weights[s]
            chunk_mass = float(out.shape[0] if w is None else w.sum(dtype=np.float64))
            if chunk_mass > 0:
                total += self.loss(out, target[s], w, None) * chunk_mass
                mass += chunk_mass
            for metric in metrics:
                metric.update(out, target[s])
        logs = {"loss": total / mass + self._regularization_loss()}
        logs.update({m.name: m.result() for m in metrics})
        return logs

    def compute_gradients(self, X, y, sample_weight=None):
        """(loss, grads) over the whole set in inference mode (dropout off); loss and
        grads include regularization; grads are copies aligned with get_weights()."""
        self._require_compiled("compute_gradients")
        X, target, weights = self._prepare(X, y, sample_weight)
        loss, _ = self._loss_and_grad(X, target, weights, training=False)
        return loss, [g.copy() for layer in self.layers for g in layer.gradients()]

    # ------------------------------------------------------------------ weights
    def get_weights(self):
        """Copies of the parameters: [W1, b1, W2, b2, ...] (b omitted when use_bias=False)."""
        return [p.copy() for p in self.parameters()]

    def set_weights(self, weights):
        """Load a list shaped like get_weights() (values are copied in)."""
        current = self.parameters()
        weights = list(weights)
        if len(weights) != len(current):
            raise ValueError(f"weights must be a list of {len(current)} arrays, got "
                             f"{len(weights)}")
        checked = []
        for i, (w, p) in enumerate(zip(weights, current)):
            arr = check_array(w, f"weights[{i}]", self.dtype, ndim=p.ndim)
            if arr.shape != p.shape:
                raise ValueError(f"weights[{i}] must have shape {p.shape}, got {arr.shape}")
            checked.append(arr)
        for arr, p in zip(checked, current):
            p[...] = arr

    # ------------------------------------------------------------------ training
    def fit(self, X, y, epochs=1, batch_size=32, shuffle=True, replacement=False,
            validation_data=None, validation_split=0.0, sample_weight=None,
            class_weight=None, callbacks=(), verbose=1, seed=None):
        """Train with the compiled optimizer; returns a History.

        ``batch_size=None`` is full-batch gradient descent, 1 is pure SGD, anything else
        mini-batch. Each epoch visits the data in a fresh permutation (without
        replacement) or, with ``replacement=True``, draws as many samples with
        replacement. ``seed`` makes shuffling reproducible.
        """
        self._require_compiled("fit")
        epochs = check_int(epochs, "epochs", low=0)
        verbose = check_int(verbose, "verbose", low=0, high=2)
        rng = np.random.default_rng(check_seed(seed))
        X, target, weights = self._prepare(X, y, sample_weight)
        weights = self._apply_class_weight(class_weight, target, weights)
        validation_split = check_float(validation_split, "validation_split", low=0.0,
                                       high=1.0, high_open=True)
        if validation_data is not None and validation_split:
            raise ValueError("pass either validation_data or validation_split, not both")
        val = None
        if validation_split:
            n_val = int(round(X.shape[0] * validation_split))
            if not 1 <= n_val < X.shape[0]:
                raise ValueError(f"validation_split={validation_split} leaves {n_val} "
                                 f"validation samples out of {X.shape[0]}; need 1..n-1")
            cut = X.shape[0] - n_val
            val = (X[cut:], target[cut:], None if weights is None else weights[cut:])
            X, target = X[:cut], target[:cut]
            weights = None if weights is None else weights[:cut]
            if weights is not None and weights.sum() <= 0:
                raise ValueError("sample_weight is all zero on the training part")
        elif validation_data is not None:
            val = self._prepare_validation(validation_data)

        n = X.shape[0]
        batch = n if batch_size is None else min(check_int(batch_size, "batch_size", low=1), n)
        n_batches = math.ceil(n / batch)
        callbacks = list(callbacks or ())
        for i, cb in enumerate(callbacks):
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks[{i}] must be a fastnn.callbacks.Callback, "
                                f"got {type(cb).__name__}")
            cb.set_model(self)
        terminate_on_nan = any(isinstance(cb, TerminateOnNaN) for cb in callbacks)

        history = History()
        self.history = history
        self.stop_training, self.stop_reason = False, None
        progress = _Progress(verbose, epochs, n_batches if not isinstance(
            self.optimizer, Solver) else 1)
        for cb in callbacks:
            cb.on_train_begin({})
        start = time.perf_counter()
        try:
            if isinstance(self.optimizer, Solver):
                history.n_evaluations = self._fit_solver(
                    X, target, weights, val, epochs, callbacks, progress, history,
                    terminate_on_nan)
            else:
                history.n_evaluations = self._fit_minibatch(
                    X, target, weights, val, epochs, batch, shuffle, replacement, rng,
                    callbacks, progress, history, terminate_on_nan)
        finally:
            progress.close()
        if self.stop_reason is None:
            self.stop_reason = f"completed {epochs} epochs"
        history.stop_reason = self.stop_reason
        history.seconds = time.perf_counter() - start
        for cb in callbacks:
            cb.on_train_end({})
        return history

    def _epoch_logs(self, logs, val):
        if val is not None:
            logs.update({"val_" + k: v for k, v in self._evaluate(*val).items()})
        return logs

    def _end_epoch(self, epoch, logs, callbacks, progress, history):
        for cb in callbacks:
            cb.on_epoch_end(epoch, logs)
        history.append(epoch, logs)
        progress.epoch_done(epoch, logs)

    def _fit_minibatch(self, X, target, weights, val, epochs, batch, shuffle, replacement,
                       rng, callbacks, progress, history, terminate_on_nan):
        """The first-order loop: one optimizer step per mini-batch, each epoch either in
        one fused kernel call (see ``_fused_epoch_runner``) or batch by batch in Python.
        Returns the number of gradient evaluations."""
        n = X.shape[0]
        n_batches = math.ceil(n / batch)
        run_fused = self._fused_epoch_runner(X, target, weights, batch, callbacks)
        run_epoch = run_fused or self._python_epoch_runner(X, target, weights, batch,
                                                           callbacks, progress)
        steps = 0
        for epoch in range(epochs):
            for cb in callbacks:
                cb.on_epoch_begin(epoch, {})
            epoch_start_params = self.params.copy()
            order = _epoch_order(rng, n, shuffle, replacement)
            logs, done, bad_loss = run_epoch(order)
            steps += done
            if bad_loss is not None:
                self._handle_divergence(bad_loss, epoch, done, epoch_start_params,
                                        terminate_on_nan, callbacks)
                return steps
            if run_fused is not None:
                progress.batch_done(n_batches)
            if not all_finite(self.params):
                # a finite loss can still come with an update that overflows the weights
                self._handle_divergence(None, epoch, n_batches - 1, epoch_start_params,
                                        terminate_on_nan, callbacks)
                return steps
            self._end_epoch(epoch, self._epoch_logs(logs, val), callbacks, progress, history)
            if self.stop_training:
                break
        return steps

    def _python_epoch_runner(self, X, target, weights, batch, callbacks, progress):
        """The general path: ``run(order) -> (logs, updates made, bad loss or None)``."""
        n = X.shape[0]
        n_batches = math.ceil(n / batch)
        gather = _BatchGather(X, target, weights)

        def run(order):
            metrics = metrics_module.build(self.metrics, self.loss)
            total = mass = 0.0
            for b in range(n_batches):
                xb, yb, wb = gather(order, b * batch, min((b + 1) * batch, n))
                loss, out = self._loss_and_grad(xb, yb, wb, training=True)
                if not math.isfinite(loss):
                    return None, b, loss
                self.optimizer.step(self.params, self.grads)
                batch_mass = float(xb.shape[0] if wb is None else wb.sum(dtype=np.float64))
                total += loss * batch_mass
                mass += batch_mass
                for metric in metrics:
                    metric.update(out, yb)
                for cb in callbacks:
                    cb.on_batch_end(b, {"loss": loss})
                progress.batch_done()
            logs = {"loss": total / mass if mass else float("nan")}
            logs.update({m.name: m.result() for m in metrics if m.count})
            return logs, n_batches, None
        return run

    def _fused_epoch_runner(self, X, target, weights, batch, callbacks):
        """The fast path: a whole epoch in one ``train_epoch`` kernel call.

        Taken when the model is a stack of Dense layers without regularization, the
        loss and optimizer are ones the kernel knows (no gradient clipping), there are no
        sample weights, the only metric is accuracy and no callback needs per-batch
        calls (TerminateOnNaN is honoured). It computes what the general path computes;
        set ``model.use_fused_epoch = False`` to force the general path.
        Returns ``run(order)`` like ``_python_epoch_runner``, or None.
        """
        dense = [layer for layer in self.layers if isinstance(layer, Dense)]
        spec = (self.optimizer.kernel_spec()
                if isinstance(self.optimizer, optimizers_module.Optimizer) else None)
        eligible = (
            self.use_fused_epoch and spec is not None and weights is None
            and len(dense) == len(self.layers) and not any(d.l1 or d.l2 for d in dense)
            and self.loss.name in kernels.LOSSES
            and not (self.loss.uses_labels and target.ndim != 1)
            and set(self.metrics) <= {"accuracy"}
            and all(isinstance(cb, TerminateOnNaN)
                    or type(cb).on_batch_end is Callback.on_batch_end for cb in callbacks))
        if not eligible:
            return None
        n = X.shape[0]
        n_batches = math.ceil(n / batch)
        widths = np.array([dense[0].in_features] + [d.out_features for d in dense], np.int64)
        acts = np.array([d.act_code for d in dense], np.int64)
        alphas = np.array([d.alpha for d in dense], np.float64)
        use_bias = np.array([d.use_bias for d in dense], np.int64)
        workspace = np.empty(kernels.train_epoch_workspace_size(batch, widths), self.dtype)
        if target.ndim == 1:
            labels, targets = target, np.empty((0, self.n_outputs), self.dtype)
        else:
            labels, targets = np.empty(0, np.int64), target
        loss_code = kernels.LOSSES[self.loss.name]
        loss_param = getattr(self.loss, "delta", getattr(self.loss, "margin", 0.0))
        per_sample_hits = self.n_outputs if self.loss.name == "binary_cross_entropy" else 1
        in_order = np.arange(n, dtype=np.int64)
        stats = np.zeros(4)

        def run(order):
            order = in_order if order is None else order
            code, hyper, states = self.optimizer.kernel_spec()
            lrs = self.optimizer.upcoming_lrs(n_batches)
            backend_module().train_epoch(
                X, labels, targets, order, batch, widths, acts, alphas, use_bias,
                self.params, self.grads, workspace, loss_code, loss_param, code, hyper, lrs,
                states[0], states[1], states[2], self.optimizer.iterations, stats)
            done = int(stats[2])
            self.optimizer.iterations += done
            if done < n_batches:
                return None, done, float(stats[3])
            logs = {"loss": stats[0] / order.shape[0]}
            if self.metrics:
                logs["accuracy"] = stats[1] / (order.shape[0] * per_sample_hits)
            return logs, done, None
        return run

    def _fit_solver(self, X, target, weights, val, epochs, callbacks, progress, history,
                    terminate_on_nan):
        """Full-batch solver: fit epoch = one solver iteration. Returns the number of
        loss/gradient evaluations."""
        objective = Objective(self, X, target, weights)
        last_good = self.params.copy()
        epoch = 0

        def on_iteration(x, loss):
            nonlocal epoch
            for cb in callbacks:
                cb.on_epoch_begin(epoch, {})
            self.params[...] = x
            if not math.isfinite(loss):
                self._handle_divergence(loss, epoch, 0, last_good, terminate_on_nan, callbacks)
                return True
            last_good[...] = self.params
            logs = self._evaluate(X, target, weights) if self.metrics else {"loss": loss}
            for cb in callbacks:
                cb.on_batch_end(0, {"loss": logs["loss"]})
            progress.batch_done()
            self._end_epoch(epoch, self._epoch_logs(logs, val), callbacks, progress, history)
            epoch += 1
            return self.stop_training

        reason = self.optimizer.minimize(objective, self.params.astype(np.float64), epochs,
                                         on_iteration)
        if reason is not None and self.stop_reason is None:
            self.stop_reason = reason
        return objective.n_evals

    def _handle_divergence(self, loss, epoch, batch, epoch_start_params, terminate_on_nan,
                           callbacks):
        """Put back the weights of the last completed epoch; stop cleanly (TerminateOnNaN)
        or raise.

        ``loss`` is the non-finite batch loss, or None when the loss was finite but the
        update made the weights non-finite. Weights that are still finite but already
        give a non-finite loss are not kept either: they predict inf/NaN.
        """
        self.params[...] = epoch_start_params
        what = "the weights became NaN or infinite" if loss is None else f"loss became {loss}"
        message = (f"{what} at epoch {epoch + 1}, batch {batch + 1}; training stopped and "
                   "the last finite weights (from the end of the last completed epoch) were "
                   "kept (try a lower learning rate, gradient clipping or input scaling)")
        if not terminate_on_nan:
            raise FloatingPointError(message)
        self.stop_training = True
        self.stop_reason = message
        if loss is not None:
            for cb in callbacks:
                cb.on_batch_end(batch, {"loss": loss})

    def _prepare_validation(self, validation_data):
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise TypeError("validation_data must be a tuple (X_val, y_val) or "
                            "(X_val, y_val, sample_weight_val)")
        Xv, yv = validation_data[0], validation_data[1]
        wv = validation_data[2] if len(validation_data) == 3 else None
        return self._prepare(Xv, yv, wv, name="X_val")

    def _apply_class_weight(self, class_weight, target, weights):
        if class_weight is None:
            return weights
        if not isinstance(class_weight, dict):
            raise TypeError(f"class_weight must be a dict {{class: weight}}, got "
                            f"{type(class_weight).__name__}")
        if target.ndim == 1:
            labels = target
        elif target.shape[1] == 1:
            labels = target[:, 0].astype(np.int64)
        else:
            raise ValueError("class_weight needs integer labels or a single 0/1 target column")
        factors = np.ones(max(self.n_outputs, 2), dtype=np.float64)
        for cls, w in class_weight.items():
            if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or \
                    not 0 <= cls < factors.size:
                raise ValueError(f"class_weight key {cls!r} is not a class in "
                                 f"[0, {factors.size - 1}]")
            factors[cls] = check_float(w, f"class_weight[{cls}]", low=0.0)
        combined = factors[labels].astype(self.dtype)
        if weights is not None:
            combined *= weights
        if combined.sum() <= 0:
            raise ValueError("class_weight and sample_weight give every sample zero weight")
        return np.ascontiguousarray(combined)

    # ------------------------------------------------------------------ save / load
    def get_config(self):
        return {"layers": [layer.get_config() for layer in self.layers]}

    def save(self, path):
        """Write the model (architecture, weights, compile settings and optimizer state)
        to an .npz file, atomically: the data goes to a temp file
        ``.fastnn-<pid>-<random>.tmp`` in the target directory, then is renamed over
        ``path``, so a crash never leaves a half-written model. A save killed before the
        rename leaves its temp file; each later save removes those whose pid is no longer
        a running process (never another live process's; POSIX only). No pickle."""
        self._require_layers("save")
        _model_file.write_model(self, path)

    def summary(self):
        """A table of the layers, their output shapes and parameter counts (a str)."""
        self._require_layers("summary")
        rows = [("Layer", "Output shape", "Params")]
        width = self.n_features
        for layer in self.layers:
            width = layer.output_features(width)
            rows.append((repr(layer), f"(None, {width})",
                         f"{sum(p.size for p in layer.parameters()):,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        line = "-" * (sum(widths) + 4)
        out = [line]
        for j, r in enumerate(rows):
            out.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}")
            if j == 0:
                out.append(line)
        out += [line, f"Total params: {self.n_params:,} ({self.dtype.name})", line]
        return "\n".join(out)

    def __repr__(self):
        return "Sequential([" + ", ".join(repr(layer) for layer in self.layers) + "])"


def load_model(path):
    """Load a model written by ``Sequential.save`` (compiled, with optimizer state,
    if it was compiled when saved).

    The file is treated as untrusted: anything but a regular file, a corrupt or foreign
    archive, sizes the file cannot hold, and any configuration or state field of the
    wrong type, out of range or not finite raise ValueError naming the file and the
    field, before large allocations (see ``fastnn._model_file``).
    """
    return _model_file.read_model(path, Sequential)


# ---------------------------------------------------------------------- helpers
def _require_compiled_model(model, what):
    if not isinstance(model, Sequential):
        raise TypeError(f"{what} needs a fastnn.Sequential model, got {type(model).__name__}")
    if model.loss is None:
        raise NotCompiledError(f"{what} needs a compiled model: call "
                               "model.compile(loss=..., optimizer=...) first")


def _chunks(n, batch_size):
    step = _CHUNK_ROWS if batch_size is None else check_int(batch_size, "batch_size", low=1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _epoch_order(rng, n, shuffle, replacement):
    """Sample order for one epoch: None (in order), a permutation, or n draws."""
    if replacement:
        return rng.integers(0, n, size=n)
    if shuffle:
        return rng.permutation(n)
    return None


class _BatchGather:
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


class _Progress:
    """verbose=1: a tqdm bar over all batches when tqdm is installed, else one line per
    epoch; verbose=2: one line per epoch; verbose=0: silent."""

    def __init__(self, verbose, epochs, n_batches):
        self.verbose, self.epochs = verbose, epochs
        self.bar = None
        if verbose == 1:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=epochs * n_batches, unit="batch", leave=True,
                                file=sys.stderr, dynamic_ncols=True)

    def batch_done(self, count=1):
        if self.bar is not None:
            self.bar.update(count)

    def epoch_done(self, epoch, logs):
        text = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
            self.bar.set_postfix_str(text)
        elif self.verbose:
            print(f"epoch {epoch + 1}/{self.epochs} - {text}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
