"""Sequential: a stack of layers over one flat parameter buffer, with a Keras-like fit.

The model owns one contiguous parameter vector ``params`` and one gradient vector
``grads`` of the same size; every layer's ``W``/``b`` (and ``dW``/``db``) are views into
them. An optimizer step is then one kernel call over the whole model, a solver gets
the vector without copying, and save/load is one array. ``grads`` is the training
loop's scratch: after ``fit`` it holds no defined values (the fused epoch folds plain
SGD into its backward and may never write it); ``compute_gradients`` gives gradients.
"""

import numpy as np

from . import _model_file, _training, kernels
from ._backend import backend_module, get_backend
from ._labels import ClassLabels
from . import losses as losses_module
from . import metrics as metrics_module
from . import optimizers as optimizers_module
from ._validation import (
    check_array,
    check_features,
    check_int,
    check_sample_weight,
    dot_finite,
)
from .layers import Dense, Dropout, Layer, _BatchBuffers, check_joinable
from .solvers import Solver

_CHUNK_ROWS = 8192


class NotCompiledError(RuntimeError, ValueError):
    """The model was used for training, evaluation or prediction before ``compile``.

    A subclass of both RuntimeError and ValueError, so either ``except`` catches it.
    """


class Sequential:
    """A feed-forward stack of layers trained as one model.

    The layers' weights live in one flat parameter vector ``params`` (and their
    gradients in ``grads``); each layer's ``W``/``b`` are views into it.

    Parameters
    ----------
    layers : list of fastnn.layers.Layer, optional
        The layers, first to last; at least one must be a ``Dense``. A layer belongs to
        one model, once. Consecutive sizes must chain, and all layers share one dtype.
        An empty model takes layers later through ``add``.

    Attributes
    ----------
    layers : list of Layer
        The layers, in order.
    loss : fastnn.losses.Loss or None
        The compiled loss (None before ``compile``).
    optimizer : fastnn.optimizers.Optimizer, fastnn.solvers.Solver or None
        The compiled optimizer or full-batch solver.
    metrics : tuple of str
        The compiled metric names.
    precision : {"fp32", "bf16"}
        The compiled precision of the Dense products (see ``compile``).
    params : ndarray, shape (n_params,)
        The flat parameter buffer (None until the input size is known).
    grads : ndarray, shape (n_params,)
        The flat gradient buffer: scratch after ``fit``; use ``compute_gradients`` for
        gradients.
    dtype : numpy.dtype
        float32 or float64, the dtype of every layer.
    n_features : int or None
        Input width (None until known).
    n_outputs : int
        Output width.
    stop_training : bool
        Set True by a callback to end ``fit`` after the current epoch.
    stop_reason : str or None
        Why the last ``fit`` stopped.

    Raises
    ------
    TypeError
        ``layers`` is not a list of layer instances (e.g. separate arguments, a single
        layer, or a layer class).
    ValueError
        A layer is already in a model, no layer is Dense, the sizes do not chain, the
        dtypes differ, or ``activation="softmax"`` is not on the last Dense layer.

    Examples
    --------
    >>> import fastnn as fn
    >>> model = fn.Sequential([fn.Dense(64, 128, activation="relu"), fn.Dense(128, 10)])
    >>> model.compile(loss="cross_entropy", optimizer="adam", metrics=["accuracy"])
    Sequential([Dense(64, 128, activation='relu'), Dense(128, 10)])
    >>> model.n_params
    9610
    """

    def __init__(self, layers=None, *more_layers):
        if more_layers:
            raise TypeError(f"Sequential takes the layers as one list: "
                            f"Sequential([layer1, layer2, ...]), got {1 + len(more_layers)} "
                            "separate arguments")
        if isinstance(layers, Layer):
            raise TypeError(f"layers must be a list of fastnn layers, got a single "
                            f"{type(layers).__name__}; pass [layer]")
        try:
            layers = list(layers or [])
        except TypeError:
            raise TypeError(f"layers must be a list of fastnn layers, got "
                            f"{type(layers).__name__}") from None
        for i, layer in enumerate(layers):
            check_joinable(layer, f"layers[{i}]", self, layers[:i])
        self.layers = []
        self.loss = None
        self.optimizer = None
        #: The mapping of non-numeric class labels to codes (fastnn._labels.ClassLabels),
        #: made by the first labels the model sees; None for numeric labels.
        self.class_labels = None
        self.metrics = ()
        self.precision = "fp32"
        self.stop_training = False
        self.stop_reason = None
        #: Run each epoch in one fused kernel call when the model allows (see fit).
        self.use_fused_epoch = True
        self._buffers = _BatchBuffers()
        if layers:
            self._build(layers)

    # ------------------------------------------------------------------ structure
    def add(self, layer):
        """Append a layer; the weights of the existing layers are kept.

        Parameters
        ----------
        layer : fastnn.layers.Layer
            A layer instance that is part of no model and fits after the last layer.

        Raises
        ------
        TypeError, ValueError
            As for ``Sequential(layers)``; the model is then left exactly as it was.
        """
        check_joinable(layer, "layer", self, self.layers)
        self._build(self.layers + [layer])

    def _build(self, layers):
        """Make ``layers`` the model's: check that they chain, then point their weights
        into fresh flat buffers (copying the current values). Raises before changing
        anything when they do not fit together.

        A ``Dense(units, ...)`` gets its input size from the layer before it; when the
        first one has none (no ``input_shape``), the model stays unbuilt (no ``params``)
        until ``_check_X`` sees the first batch.
        """
        dense = [layer for layer in layers if isinstance(layer, Dense)]
        if not dense:
            raise ValueError("a Sequential model needs at least one Dense layer")
        dtypes = {layer.dtype for layer in layers}
        if len(dtypes) != 1:
            raise ValueError(f"all layers must share one dtype, got {sorted(d.name for d in dtypes)}")
        for i, layer in enumerate(dense[:-1]):
            if layer.softmax_output:
                raise ValueError("activation 'softmax' goes on the last Dense layer only "
                                 f"(it is folded into cross_entropy); Dense layer {i} has it")
        width = n_features = dense[0].in_features
        inputs = []
        for layer in layers:
            inputs.append(width)
            width = layer.output_features(width)
        dtype = dtypes.pop()
        if n_features is not None:
            for layer, n_in in zip(layers, inputs):
                if isinstance(layer, Dense):
                    layer.build(n_in)
        self.layers, self.dtype, self.n_features, self.n_outputs = layers, dtype, n_features, width
        if n_features is None:
            for layer in layers:
                layer._join(self)
            self.params = self.grads = None
            self.layer_offsets = ()
            return
        total = sum(p.size for layer in layers for p in layer.parameters())
        params = np.empty(total, dtype=dtype)
        grads = np.zeros(total, dtype=dtype)
        self.params, self.grads = params, grads
        offset, offsets = 0, []
        for layer in self.layers:
            layer._join(self)
            offsets.append(offset)
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
        #: Where each layer's parameters start in ``params`` (W, then b), by layer index.
        self.layer_offsets = tuple(offsets)
        self._first_trainable = next(i for i, layer in enumerate(self.layers) if layer.trainable)
        if isinstance(self.optimizer, optimizers_module.Optimizer):
            self.optimizer.build(self.params.size, self.dtype, owner=self)
        elif isinstance(self.optimizer, Solver):
            self.optimizer.check_model(self, self.loss)

    @property
    def n_params(self):
        """Total number of parameters (int), the size of ``params``.

        Raises ValueError while the input size is not known yet.
        """
        self._require_built("n_params")
        return self.params.size

    def parameters(self):
        """The parameter arrays, in ``get_weights()`` order.

        Returns
        -------
        list of ndarray
            ``[W1, b1, W2, b2, ...]`` (b omitted for ``use_bias=False``): views into
            ``params``, not copies; writing to them changes the model.
        """
        return [p for layer in self.layers for p in layer.parameters()]

    # ------------------------------------------------------------------ compile
    def compile(self, loss, optimizer="adam", metrics=None, precision="fp32"):
        """Set the loss, the optimizer (or full-batch solver) and the metrics.

        Compiling again keeps the weights; an optimizer object keeps its state when the
        same model compiles it again.

        Parameters
        ----------
        loss : str, dict or fastnn.losses.Loss
            "cross_entropy", "binary_cross_entropy", "hinge", "mse", "mae", "huber", a
            Keras name (``fastnn.losses.KERAS_ALIASES``), a config dict, or a Loss.
            Losses take logits: put no softmax/sigmoid layer before them (except
            ``Dense(..., activation="softmax")`` last, folded into cross_entropy).
        optimizer : str, fastnn.optimizers.Optimizer or fastnn.solvers.Solver, default "adam"
            A name from ``fastnn.optimizers.OPTIMIZERS`` or ``fastnn.solvers.SOLVERS``,
            or an instance.
        metrics : str or list of str, optional
            "accuracy" (classification losses), "mae", "mse", "r2" (regression losses),
            or their Keras names (``fastnn.metrics.KERAS_ALIASES``).
        precision : {"fp32", "bf16"}, default "fp32"
            "bf16" runs every Dense product (forward ``x @ W``, ``dW = x.T @ dz``,
            ``dx = dz @ W.T``) in bfloat16 with float32 accumulation, in training and
            inference: inputs rounded to bf16 once per batch, weights once per step.
            Master weights, optimizer state, biases, activation derivatives, loss,
            softmax and metrics stay float32. Needs a float32 model and, on the
            compiled backends, a CPU with AVX512_BF16 (no silent fp32 fallback: the
            numpy backend emulates bf16 exactly anywhere, slowly). First-order
            optimizers only: the full-batch solvers refuse it.

        Returns
        -------
        Sequential
            self.

        Raises
        ------
        ValueError, TypeError
            An unknown or unsuitable loss, optimizer, metric or precision (e.g.
            cross_entropy with one output, accuracy with a regression loss, a class
            instead of an instance, bf16 with a solver, a float64 model or a CPU
            without AVX512_BF16). The model is then left as it was.
        """
        self._require_layers("compile")
        precision = _check_precision(precision, self.dtype)
        loss = losses_module.get(loss)
        loss.check_outputs(self.n_outputs)
        last = [layer for layer in self.layers if isinstance(layer, Dense)][-1]
        if last.softmax_output and loss.name != "cross_entropy":
            raise ValueError(f"activation 'softmax' on the last layer needs the "
                             f"cross_entropy loss, into which it is folded; got "
                             f"{loss.name!r} (drop the softmax, or use cross_entropy)")
        metrics = metrics_module.check_metrics(metrics, loss)
        optimizer = optimizers_module.get(optimizer)
        if isinstance(optimizer, Solver):
            optimizer.check_precision(precision)
            optimizer.check_model(self, loss)
        if isinstance(optimizer, optimizers_module.Optimizer) and self.params is not None:
            optimizer.build(self.params.size, self.dtype, owner=self)
        # everything checked: a compile that raises leaves the model as it was
        self.loss, self.metrics, self.optimizer = loss, metrics, optimizer
        self.precision = precision
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
        X = check_features(X, name, self.dtype, self.n_features)
        if self.params is None:  # the first batch gives the input size
            next(layer for layer in self.layers if isinstance(layer, Dense)).build(X.shape[1])
            self._build(self.layers)
        return X

    def _require_built(self, what):
        self._require_layers(what)
        if self.params is None:
            raise ValueError(f"{what} needs the model's input size, which is not known yet: "
                             "give the first layer input_shape=(n_features,) or "
                             "in_features, or call fit/predict first")

    def _prepare(self, X, y, sample_weight, name="X"):
        X = self._check_X(X, name)
        y_name = "y" if name == "X" else name.replace("X", "y")
        y = self._encode_labels(y, y_name)
        target = self.loss.prepare_target(y, X.shape[0], self.n_outputs, self.dtype, y_name)
        weights = check_sample_weight(sample_weight, X.shape[0], self.dtype)
        return X, target, weights

    def _encode_labels(self, y, name):
        """String or other non-numeric class labels -> codes 0..K-1.

        The first such labels the model sees (normally fit's) fix the mapping, kept in
        ``class_labels`` and saved with the model: classes in sorted order, code k for
        ``class_labels.classes[k]``. Numeric labels pass through as class indices.
        """
        if not self._takes_class_labels():
            return y
        if np.asarray(y).dtype.kind not in "USO":
            if self.class_labels is not None:
                raise TypeError(f"{name} must hold labels like the classes the model was "
                                f"trained on {self.class_labels.classes.tolist()}, got "
                                f"numbers")
            return y
        if self.class_labels is None:
            self._set_class_labels(ClassLabels.fit(y, name), name)
        return self.class_labels.encode(y, name)

    def _takes_class_labels(self):
        """True when targets are class labels (a classification loss, not multi-label)."""
        multi_label = self.loss.name == "binary_cross_entropy" and self.n_outputs != 1
        return self.loss.classification and not multi_label

    def _new_class_labels(self, y, name="y"):
        """The ClassLabels ``_encode_labels(y)`` would fix, or None when it fixes none
        (numeric labels, targets that are not class labels, or a mapping already fixed).
        A distributed fit fixes the union of every rank's."""
        if (self.class_labels is not None or not self._takes_class_labels()
                or np.asarray(y).dtype.kind not in "USO"):
            return None
        return ClassLabels.fit(y, name)

    def _set_class_labels(self, labels, name):
        """Fix the label mapping (``class_labels``) if the model has outputs for it."""
        capacity = max(self.n_outputs, 2)
        if len(labels) > capacity:
            raise ValueError(f"{name} has {len(labels)} classes, but the model has "
                             f"{self.n_outputs} output(s), so at most {capacity}")
        self.class_labels = labels

    # ------------------------------------------------------------------ inference
    def _check_inference_X(self, X):
        """``_check_X(X)``, with a short path for an ndarray already as the kernels take
        it (the model's dtype, 2-D, C-contiguous, non-empty, n_features wide): its values
        are checked by ``dot_finite`` (when finite values overflow it, X takes the full
        check). It costs a third of the full check's two reductions on small inputs."""
        if (self.layers and type(X) is np.ndarray and X.dtype == self.dtype and X.ndim == 2
                and X.flags.c_contiguous and X.shape[0] > 0
                and X.shape[1] == self.n_features
                and dot_finite(X)):
            return X
        return self._check_X(X)

    def _dense_stack(self):
        """The model as one ``dense_stack_forward`` call (a ``_DenseStack``, kept while
        the parameter buffer stays the same), or None when a layer is neither Dense nor
        Dropout (identity at inference, so skipped)."""
        stack = self.__dict__.get("_inference_stack")
        bf16 = self.precision == "bf16"
        if stack is not None and stack.params is self.params and stack.bf16 == bf16:
            return stack
        if self.params is None or not all(isinstance(layer, (Dense, Dropout))
                                          for layer in self.layers):
            return None
        self._inference_stack = _DenseStack(
            self.params, [layer for layer in self.layers if isinstance(layer, Dense)], bf16)
        return self._inference_stack

    def _inference_output(self, X, batch_size):
        """The network output for checked ``X`` in inference mode, a new (n, n_outputs)
        array: one kernel call per chunk of ``batch_size`` rows for a stack of Dense
        layers, else layer by layer."""
        stack = self._dense_stack()
        n = X.shape[0]
        if stack is None:
            return np.concatenate([self._forward(X[s], False).copy()
                                   for s in _chunks(n, batch_size)])
        out = np.empty((n, self.n_outputs), self.dtype)
        step = _chunk_rows(batch_size)
        if n <= step:
            stack.forward(X, out)
        else:
            for start in range(0, n, step):
                stop = min(start + step, n)
                stack.forward(X[start:stop], out[start:stop])
        return out

    def forward(self, X, batch_size=None):
        """Raw network output in inference mode (dropout off), without the loss's link.

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Inputs, converted to the model's dtype; must be finite.
        batch_size : int, optional
            Rows per forward pass (default 8192); only memory use depends on it.

        Returns
        -------
        ndarray, shape (n_samples, n_outputs)
            Logits for the classification losses, values for regression; model dtype.
        """
        return self._inference_output(self._check_inference_X(X), batch_size)

    def predict(self, X, batch_size=None):
        """Predictions: the network output through the loss's link.

        Softmax probabilities for cross_entropy, sigmoid probabilities for
        binary_cross_entropy, raw scores for hinge, values for the regression losses.
        A compiled model that has not been trained predicts from its initial random
        weights, as in Keras.

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Inputs, converted to the model's dtype; must be finite.
        batch_size : int, optional
            Rows per forward pass (default 8192); only memory use depends on it.

        Returns
        -------
        ndarray, shape (n_samples, n_outputs)
            In the model's dtype.

        Raises
        ------
        NotCompiledError
            The model was not compiled (the link depends on the loss).
        """
        self._require_compiled("predict")
        out = self._inference_output(self._check_inference_X(X), batch_size)
        return _link_in_place(self.loss, out)

    def predict_classes(self, X, batch_size=None):
        """Predicted classes, not probabilities.

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Inputs, converted to the model's dtype; must be finite.
        batch_size : int, optional
            Rows per forward pass (default 8192).

        Returns
        -------
        ndarray
            cross_entropy and hinge: the argmax class index, int64 (n_samples,).
            binary_cross_entropy: 0/1 per output (logit > 0), int64 (n_samples,) with
            one output, else (n_samples, n_outputs) multi-label. When the model was
            trained on string (or other non-numeric) labels, those labels instead.

        Raises
        ------
        NotCompiledError
            The model was not compiled.
        ValueError
            The loss is a regression loss (use ``predict``).
        """
        self._require_compiled("predict_classes")
        codes = self.loss.classes(self._inference_output(self._check_inference_X(X),
                                                         batch_size))
        return codes if self.class_labels is None else self.class_labels.decode(codes)

    def evaluate(self, X, y, sample_weight=None, batch_size=None):
        """Loss and metrics over the whole set, in inference mode (dropout off).

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Inputs.
        y : array-like
            Targets, as for ``fit``.
        sample_weight : array-like, shape (n_samples,), optional
            Non-negative weights of the loss, ``sum(w_i l_i) / sum(w_i)``; the metrics
            are unweighted.
        batch_size : int, optional
            Rows per forward pass (default 8192); only memory use depends on it.

        Returns
        -------
        dict
            ``{"loss": float, <metric>: float, ...}``; the loss includes the layers'
            l1/l2 regularization.

        Raises
        ------
        NotCompiledError
            The model was not compiled.
        ValueError, TypeError
            X or y of the wrong shape, type or range.
        """
        self._require_compiled("evaluate")
        X, target, weights = self._prepare(X, y, sample_weight)
        return self._evaluate(X, target, weights, batch_size)

    def _evaluate(self, X, target, weights, batch_size=None):
        metrics = metrics_module.build(self.metrics, self.loss)
        total = mass = 0.0
        stack = self._dense_stack()
        for s in _chunks(X.shape[0], batch_size):
            out = self._forward(X[s], False) if stack is None else stack.forward(X[s])
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
        """Loss and its gradient over the whole set, in inference mode (dropout off).

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Inputs.
        y : array-like
            Targets, as for ``fit``.
        sample_weight : array-like, shape (n_samples,), optional
            Non-negative per-sample weights.

        Returns
        -------
        loss : float
            The mean (or weighted) loss plus the l1/l2 regularization.
        grads : list of ndarray
            d(loss)/d(parameter), copies shaped and ordered like ``get_weights()``.

        Raises
        ------
        NotCompiledError
            The model was not compiled.
        """
        self._require_compiled("compute_gradients")
        X, target, weights = self._prepare(X, y, sample_weight)
        loss, _ = self._loss_and_grad(X, target, weights, training=False)
        return loss, [g.copy() for layer in self.layers for g in layer.gradients()]

    # ------------------------------------------------------------------ weights
    def get_weights(self):
        """Copies of the parameters.

        Returns
        -------
        list of ndarray
            ``[W1, b1, W2, b2, ...]``: W (in_features, out_features) and b
            (out_features,) of each Dense layer (b omitted for ``use_bias=False``).
        """
        self._require_built("get_weights")
        return [p.copy() for p in self.parameters()]

    def set_weights(self, weights):
        """Copy new parameter values into the model.

        Parameters
        ----------
        weights : list of array-like
            Shaped and ordered like ``get_weights()``; converted to the model's dtype.

        Raises
        ------
        TypeError
            ``weights`` is not a list (e.g. one ndarray).
        ValueError
            The wrong number of arrays or an array of the wrong shape; nothing is
            changed then.
        """
        self._require_built("set_weights")
        current = self.parameters()
        expected = (f"a list of {len(current)} arrays shaped like get_weights() "
                    f"{[p.shape for p in current]}")
        if isinstance(weights, np.ndarray):
            raise TypeError(f"weights must be {expected}, got one ndarray of shape "
                            f"{weights.shape}")
        try:
            weights = list(weights)
        except TypeError:
            raise TypeError(f"weights must be {expected}, got {type(weights).__name__}"
                            ) from None
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
            class_weight=None, callbacks=(), verbose=1, seed=None, distributed=False):
        """Train the compiled model on (X, y).

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Inputs; converted to the model's dtype. Must be finite.
        y : array-like
            Targets for the compiled loss: integer labels (n_samples,) in [0, n_outputs)
            or probability rows for cross_entropy and hinge; 0/1 values
            (n_samples, n_outputs) for binary_cross_entropy; values (n_samples,) or
            (n_samples, n_outputs) for regression losses.
        epochs : int, default 1
            Passes over the data; for a full-batch solver, the maximum number of solver
            iterations (it may stop earlier on its own convergence test).
        batch_size : int or None, default 32
            Samples per step; None is full-batch gradient descent, 1 is pure SGD.
            Ignored by solvers, which always use the whole set.
        shuffle : bool, default True
            Visit the samples in a fresh random order every epoch.
        replacement : bool, default False
            Draw each epoch's n samples with replacement instead of a permutation.
        validation_data : tuple, optional
            (X_val, y_val) or (X_val, y_val, sample_weight_val), evaluated after every
            epoch into the "val_*" logs.
        validation_split : float in [0, 1), default 0.0
            Hold out this fraction of the last samples (before shuffling) as
            validation data instead.
        sample_weight : array-like, shape (n_samples,), optional
            Non-negative per-sample weights; the loss is sum(w_i l_i) / sum(w_i). A
            mini-batch whose weights are all zero carries no data: it makes no step
            (an epoch drawn with replacement whose every weight is zero raises
            ValueError).
        class_weight : dict or "balanced", optional
            Classification losses only: {class: weight} multiplies each sample's
            weight by its class's; "balanced" uses n_samples / (n_classes * count).
        callbacks : list of fastnn.callbacks.Callback, optional
            Called at the start and end of training, of every epoch and of every batch.
        verbose : int or bool, default 1
            0/False silent; 1/True a progress bar per epoch (tqdm) or a line per epoch;
            2 a line per epoch.
        seed : int, optional
            Seed of the shuffling and sampling (None: fresh randomness each call).
        distributed : bool or "shards", default False
            Data-parallel training on the processes an MPI launcher started
            (``mpiexec -n K python -m mpi4py train.py``; ``pip install 'fastnn[mpi]'``).
            True: every rank passes the same full data set and takes its part of each
            global batch of K * batch_size, so training equals one process with that
            batch size. "shards": every rank passes its own part (and holds out
            ``validation_split`` of it; class_weight="balanced" counts the classes over
            every rank's part). String class labels are coded over every rank's labels.
            Callbacks may differ between ranks (TerminateOnNaN aside): after each epoch
            and at the end every rank takes rank 0's weights and learning rate. The
            fused epoch kernel runs here too when the model allows it; see
            ``fastnn.distributed``.

        Returns
        -------
        History
            Per-epoch logs ("loss", metrics, "val_*"), the epochs run and why training
            stopped (``history.stop_reason``).

        Raises
        ------
        NotCompiledError
            The model was not compiled.
        ValueError, TypeError
            An argument of the wrong shape, type or range (the message names it).
        FloatingPointError
            The loss or the weights became NaN or infinite; the weights of the last
            completed epoch are kept. With a TerminateOnNaN callback training stops
            cleanly instead.

        Examples
        --------
        >>> import fastnn as fn
        >>> X, y = fn.datasets.xor()
        >>> model = fn.Sequential([fn.Dense(2, 8, activation="tanh", seed=0),
        ...                        fn.Dense(8, 2, seed=1)])
        >>> model = model.compile("cross_entropy", fn.optimizers.Adam(lr=0.05),
        ...                       metrics=["accuracy"])
        >>> history = model.fit(X, y, epochs=300, batch_size=None, verbose=0, seed=0)
        >>> history.history["accuracy"][-1]
        1.0
        """
        return _training.fit(self, X, y, epochs, batch_size, shuffle, replacement,
                             validation_data, validation_split, sample_weight,
                             class_weight, callbacks, verbose, seed, distributed)

    # ------------------------------------------------------------------ save / load
    def get_config(self):
        """The architecture as JSON-able data: ``{"layers": [layer.get_config(), ...]}``."""
        return {"layers": [layer.get_config() for layer in self.layers]}

    def save(self, path):
        """Write the model to an .npz file (no pickle), atomically.

        The file holds the architecture, the weights, the compile settings and the
        optimizer state; ``load_model`` reads it back. The data goes to a temp file
        ``.fastnn-<pid>-<random>.tmp`` in the target directory, then is renamed over
        ``path``, so a crash never leaves a half-written model. A save killed before the
        rename leaves its temp file; each later save removes those whose pid is no longer
        a running process (never another live process's; POSIX only).

        Parameters
        ----------
        path : str or path-like
            The file to write.
        """
        self._require_built("save")
        _model_file.write_model(self, path)

    def summary(self, print_fn=print):
        """Print a table of the layers, their output shapes and parameter counts.

        Parameters
        ----------
        print_fn : callable, default print
            Receives the whole table as one str (as Keras' ``print_fn``):
            ``model.summary(print_fn=lines.append)`` keeps it instead of printing.
        """
        print_fn(self._summary_table())

    def _summary_table(self):
        self._require_built("summary")
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
    """Load a model written by ``Sequential.save``.

    Parameters
    ----------
    path : str or path-like
        The .npz file.

    Returns
    -------
    Sequential
        The model with its weights; compiled, with its optimizer state, if it was
        compiled when saved (``fit`` then resumes exactly).

    Raises
    ------
    ValueError
        The file is treated as untrusted: anything but a regular file, a corrupt or
        foreign archive, sizes the file cannot hold, and any configuration or state
        field of the wrong type, out of range or not finite raise ValueError naming the
        file and the field, before large allocations.
    """
    return _model_file.read_model(path, Sequential)


# ---------------------------------------------------------------------- helpers
def _require_compiled_model(model, what):
    if not isinstance(model, Sequential):
        raise TypeError(f"{what} needs a fastnn.Sequential model, got {type(model).__name__}")
    if model.loss is None:
        raise NotCompiledError(f"{what} needs a compiled model: call "
                               "model.compile(loss=..., optimizer=...) first")


#: The precisions ``compile`` takes.
PRECISIONS = ("fp32", "bf16")


def _check_precision(precision, dtype):
    """``precision`` checked against the model's ``dtype`` and, for "bf16" on a
    compiled backend, the CPU (AVX512_BF16)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return precision
    if dtype != np.float32:
        raise ValueError(f"precision='bf16' needs a float32 model (its products round "
                         f"float32 to bf16 and accumulate in float32), got dtype "
                         f"{dtype.name}; build the layers with dtype='float32'")
    backend = get_backend()
    if backend != "numpy" and not bf16_supported():
        raise ValueError(f"precision='bf16' on the {backend} backend needs a CPU with "
                         "AVX512_BF16 (vdpbf16ps: AMD Zen 4, Intel Cooper Lake, Sapphire "
                         "Rapids and later) and the Cython kernels built for it; this "
                         "machine has none. Use precision='fp32', or the numpy backend "
                         "(fastnn.set_backend('numpy')), which emulates bf16 exactly")
    return precision


def bf16_supported():
    """Whether the compiled backends can run precision='bf16' here (bool): the CPU has
    AVX512_BF16 and the Cython kernels (which numba's bf16 calls run too) are built."""
    try:
        return bool(kernels.load("cython").bf16_available())
    except ImportError:
        return False


def _chunk_rows(batch_size):
    """Rows per forward pass: ``batch_size`` checked, or _CHUNK_ROWS for None."""
    return _CHUNK_ROWS if batch_size is None else check_int(batch_size, "batch_size", low=1)


def _chunks(n, batch_size):
    step = _chunk_rows(batch_size)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _DenseStack:
    """A model's Dense layers as the arguments of ``dense_stack_forward``, with the
    workspace of the last chunk size (so repeated calls of one size allocate only
    their output).

    Parameters
    ----------
    params : ndarray, shape (n_params,)
        The model's flat parameter buffer: per Dense layer W then b, the kernel's layout
        (the other layers have no parameters).
    dense : list of Dense
        The model's Dense layers, in order.
    bf16 : bool, default False
        Run the products in bfloat16 (``dense_stack_forward_bf16``).
    """

    def __init__(self, params, dense, bf16=False):
        self.params = params
        self.bf16 = bf16
        self.widths = np.array([dense[0].in_features] + [d.out_features for d in dense],
                               np.int64)
        self.acts = np.array([d.act_code for d in dense], np.int64)
        self.alphas = np.array([d.alpha for d in dense], np.float64)
        self.use_bias = np.array([d.use_bias for d in dense], np.int64)
        self.n_outputs = dense[-1].out_features
        self._rows = -1
        self._workspace = None

    def forward(self, x, out=None):
        """``out`` (n, n_outputs) = the stack's output for checked ``x`` (n, n_features),
        in one kernel call; a new array when ``out`` is None. Returns ``out``."""
        n = x.shape[0]
        if n != self._rows:
            self._workspace = np.empty(kernels.dense_stack_workspace_size(n, self.widths),
                                       self.params.dtype)
            self._rows = n
        if out is None:
            out = np.empty((n, self.n_outputs), self.params.dtype)
        module = backend_module()
        forward = module.dense_stack_forward_bf16 if self.bf16 else module.dense_stack_forward
        forward(x, self.params, self.widths, self.acts, self.alphas, self.use_bias,
                self._workspace, out)
        return out


def _link_in_place(loss, out):
    """``loss.link(out)`` computed in ``out`` itself (a fresh output array) by one
    kernel call for the built-in links (identity, softmax, sigmoid); a link defined
    elsewhere gets ``out`` and returns its own array."""
    link = type(loss).link
    if link is losses_module.Loss.link:
        return out
    if link is losses_module.CrossEntropy.link:
        backend_module().softmax_forward(out, out)
        return out
    if link is losses_module.BinaryCrossEntropy.link:
        backend_module().activation_forward(kernels.ACTIVATIONS["sigmoid"], out, out, None)
        return out
    return loss.link(out)
