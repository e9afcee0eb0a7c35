"""Layers: forward/backward pairs over the active kernel backend.

A layer works alone (``out = layer.forward(x)``; ``dx = layer.backward(dout)``; then
``layer.dW``, ``layer.db``) and inside a ``Sequential``, which re-points its ``W``/``b``
and ``dW``/``db`` at views of the model's flat parameter and gradient buffers.

The public ``forward``/``backward`` return fresh arrays; ``_forward``/``_backward``
return the layer's reusable buffers (valid until the next call) and are what the model
uses on its hot path.
"""
import numpy as np

from . import kernels
from ._backend import backend_module
from ._validation import (
    check_array,
    check_bool,
    check_choice,
    check_dtype,
    check_float,
    check_int,
    check_seed,
    config_class,
)

INITIALIZERS = ("auto", "he_uniform", "he_normal", "glorot_uniform", "glorot_normal", "zeros")
RELU_FAMILY = ("relu", "leaky_relu", "elu")
#: Activations with a parameter ``alpha`` (leaky_relu slope, elu scale): the others
#: have a kernel default of 0, unused.
ALPHA_ACTIVATIONS = tuple(name for name, code in kernels.ACTIVATIONS.items()
                          if kernels.DEFAULT_ALPHA[code])
_MAX_CACHED_BATCH_SIZES = 4


def _activation_code(name):
    """Activation name (None means identity) -> (name, kernel code)."""
    if name is None:
        name = "identity"
    check_choice(name, "activation", kernels.ACTIVATIONS)
    return name, kernels.ACTIVATIONS[name]


def _activation_alpha(name, alpha):
    """The kernel's ``alpha`` for activation ``name``: ``alpha`` (None: the default) for
    the activations in ALPHA_ACTIVATIONS; for the others alpha must be None."""
    if alpha is None:
        return kernels.DEFAULT_ALPHA[kernels.ACTIVATIONS.get(name, 0)]
    if name not in ALPHA_ACTIVATIONS:
        raise ValueError(f"alpha applies only to the activations {list(ALPHA_ACTIVATIONS)}; "
                         f"activation {name!r} has none, got alpha={alpha!r}")
    return check_float(alpha, "alpha", low=0.0)


def _input_features(input_shape):
    """The input size from a Keras ``input_shape`` (an int or a 1-tuple), or None."""
    if input_shape is None:
        return None
    if isinstance(input_shape, (tuple, list)) and len(input_shape) == 1:
        return check_int(input_shape[0], "input_shape[0]", low=1)
    raise ValueError(f"input_shape must be a tuple of one int (n_features,), got "
                     f"{input_shape!r}")


def _config_alpha(name, alpha):
    """``alpha`` as a config stores it: None for an activation without one."""
    return alpha if name in ALPHA_ACTIVATIONS else None


def init_weights(init, n_in, n_out, activation, rng, dtype):
    """Draw a (n_in, n_out) weight matrix.

    he_*: variance ``2 / n_in``; glorot_*: variance ``2 / (n_in + n_out)``; the uniform
    variants draw from U(-limit, limit) with ``limit = sqrt(3 * variance)``, the normal
    ones from N(0, variance). "auto" is He for the relu family (relu, leaky_relu, elu)
    and Glorot otherwise.

    Parameters
    ----------
    init : str
        One of ``INITIALIZERS``: "auto", "he_uniform", "he_normal", "glorot_uniform",
        "glorot_normal", "zeros".
    n_in, n_out : int
        Input and output sizes.
    activation : str
        The layer's activation name (decides "auto").
    rng : numpy.random.Generator
        Source of the random draws (unused, and may be None, for "zeros").
    dtype : numpy dtype
        dtype of the result.

    Returns
    -------
    ndarray, shape (n_in, n_out)
        C-contiguous, of ``dtype``.

    Raises
    ------
    ValueError
        An unknown ``init``.
    """
    check_choice(init, "init", INITIALIZERS)
    if init == "auto":
        init = "he_uniform" if activation in RELU_FAMILY else "glorot_uniform"
    if init == "zeros":
        return np.zeros((n_in, n_out), dtype=dtype)
    variance = 2.0 / n_in if init.startswith("he") else 2.0 / (n_in + n_out)
    if init.endswith("uniform"):
        limit = np.sqrt(3.0 * variance)
        w = rng.uniform(-limit, limit, size=(n_in, n_out))
    else:
        w = rng.normal(0.0, np.sqrt(variance), size=(n_in, n_out))
    return np.ascontiguousarray(w, dtype=dtype)


class Layer:
    """Base class: a forward/backward pair with optional parameters.

    A layer is part of at most one model, once: ``Sequential`` points the layer's
    weights into its flat buffers and records itself in ``model``. A copy
    (``copy.deepcopy(layer)``) is a new layer, part of no model.
    """

    trainable = False
    dtype = np.dtype(np.float32)
    _model = None

    @property
    def model(self):
        """The Sequential this layer is part of, or None."""
        return self._model

    def _join(self, model):
        """Record that ``model`` (a Sequential) now holds this layer; for Sequential only."""
        self._model = model

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_model", None)  # a copy belongs to no model
        return state

    def parameters(self):
        """The parameter arrays, in get_weights() order."""
        return []

    def gradients(self):
        """The gradient arrays, aligned with parameters()."""
        return []

    def regularization_loss(self):
        """The layer's l1/l2 penalty on its weights (a float; 0.0 without parameters)."""
        return 0.0

    def add_regularization_gradient(self):
        """Add d(regularization)/d(params) to the gradients in place."""

    def output_features(self, n_in):
        """Feature count this layer outputs given ``n_in`` inputs."""
        return n_in

    def _check_input(self, x):
        return check_array(x, "x", self.dtype)

    def forward(self, x, training=True):
        """Compute the layer's output for a batch, keeping what ``backward`` needs.

        Parameters
        ----------
        x : array-like, shape (n, in_features)
            Inputs, converted to the layer's dtype.
        training : bool, default True
            Training mode (dropout active) or inference mode.

        Returns
        -------
        ndarray, shape (n, out_features)
            A new array of the layer's dtype.
        """
        return self._forward(self._check_input(x), check_bool(training, "training")).copy()

    def backward(self, dout):
        """Backpropagate through the last ``forward``: fills ``dW``/``db`` and returns dL/dx.

        Parameters
        ----------
        dout : array-like, shape (n, out_features)
            dL/d(output), shaped like the last forward's output.

        Returns
        -------
        ndarray, shape (n, in_features)
            dL/dx, a new array. Layers with parameters also set ``dW`` (dL/dW) and
            ``db`` (dL/db), without regularization.

        Raises
        ------
        ValueError
            No forward pass was made, or ``dout`` has the wrong shape.
        """
        if getattr(self, "_x", None) is None:
            raise ValueError(f"{type(self).__name__}.backward needs a forward pass first: "
                             "call layer.forward(x) before layer.backward(dout)")
        dout = check_array(dout, "dout", self.dtype)
        expected = self._out.shape
        if dout.shape != expected:
            raise ValueError(f"dout must have the shape of the last output {expected}, "
                             f"got {dout.shape}")
        dx = self._backward(dout, need_dx=True)
        return dx.copy()

    def get_config(self):
        """JSON-able constructor arguments (``"class"`` names the layer type)."""
        return {"class": type(self).__name__}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "class")
        return f"{type(self).__name__}({args})"


def check_joinable(layer, name, model, earlier):
    """Raise unless ``layer`` is a Layer free to join ``model``.

    Free means part of no model and not among ``earlier`` (the layers placed before it
    in ``model``). One instance in two places would train something that save and
    load_model do not reproduce.

    Raises
    ------
    TypeError
        ``layer`` is not a Layer instance (``name`` names it in the message).
    ValueError
        ``layer`` is already in this or another model.
    """
    if isinstance(layer, type) and issubclass(layer, Layer):
        raise TypeError(f"{name} is the class {layer.__name__}; create a layer, "
                        f"{layer.__name__}(...)")
    if not isinstance(layer, Layer):
        raise TypeError(f"{name} must be a fastnn layer, got {type(layer).__name__}")
    if layer.model is model or any(layer is other for other in earlier):
        where = "already in this model"
    elif layer.model is not None:
        where = "already part of another model"
    else:
        return
    raise ValueError(f"{name} {layer!r} is {where}; a layer belongs to one model, once: "
                     "create a new layer, or a copy with copy.deepcopy(layer)")


class _BatchBuffers:
    """Scratch arrays per batch size, so steady-state steps allocate nothing."""

    def __init__(self):
        self._by_rows = {}

    def get(self, n, shapes, dtype):
        bufs = self._by_rows.get(n)
        if bufs is None:
            if len(self._by_rows) >= _MAX_CACHED_BATCH_SIZES:
                self._by_rows.clear()
            bufs = {name: np.empty((n,) + shape, dtype=dtype) for name, shape in shapes.items()}
            self._by_rows[n] = bufs
        return bufs


class Dense(Layer):
    """Fully connected layer ``a = act(x @ W + b)`` with the activation fused in.

    ``Dense(in_features, out_features, activation)``, or as in Keras
    ``Dense(units, activation, input_shape=(in_features,))``: the input size is then
    inferred from the previous layer in a Sequential, or, for the first layer without
    ``input_shape``, from the first batch the model sees (the layer has no weights
    until then).

    Parameters
    ----------
    in_features, out_features : int
        Input and output sizes (with ``out_features`` omitted, the first argument is the
        number of units and the input size is inferred).
    activation : str or None, default None
        The elementwise ``act``, one of:

        - "identity" (or None): ``z``;
        - "sigmoid": ``1 / (1 + exp(-z))``;
        - "tanh": ``tanh(z)``;
        - "relu": ``max(z, 0)``;
        - "leaky_relu": ``z if z > 0 else alpha * z``;
        - "softplus": ``log(1 + exp(z))``;
        - "elu": ``z if z > 0 else alpha * (exp(z) - 1)``;
        - "softmax": only on the last layer of a model trained with cross_entropy,
          where it is folded into the loss (the model keeps the logits; ``predict``
          returns the softmax probabilities).

        The activation may also be the second positional argument, as in Keras:
        ``Dense(10, "relu")``.
    input_shape : tuple of one int, optional
        Keras-style input size ``(in_features,)``, with ``Dense(units, ...)`` only.
    init : str, default "auto"
        Weight initializer: "he_uniform", "he_normal" (variance ``2 / in_features``),
        "glorot_uniform", "glorot_normal" (variance ``2 / (in_features +
        out_features)``), "zeros"; "auto" is He uniform for relu, leaky_relu and elu,
        Glorot uniform otherwise. Biases start at 0.
    l1, l2 : float >= 0, default 0
        Regularization on W (Keras convention), added to the loss:
        ``l2 * sum(W**2) + l1 * sum(abs(W))``.
    use_bias : bool, default True
        Whether the layer has the bias ``b``.
    dtype : {"float32", "float64"}, default "float32"
        dtype of the weights and of the inputs the layer takes.
    seed : int, optional
        Seed of the weight initialization (None: fresh randomness).
    alpha : float >= 0, optional
        leaky_relu's negative slope (default 0.01) or elu's scale (default 1.0); refused
        for the other activations.

    Attributes
    ----------
    W : ndarray, shape (in_features, out_features)
        The weights (None until the input size is known).
    b : ndarray, shape (out_features,)
        The bias (present but unused with ``use_bias=False``).
    dW : ndarray, shape (in_features, out_features)
        Gradient of W from the last ``backward``.
    db : ndarray, shape (out_features,)
        Gradient of b from the last ``backward``.

    Raises
    ------
    ValueError
        A size < 1, an unknown activation or init, "step" (use fastnn.Perceptron),
        ``alpha`` with an activation that has none, negative l1/l2.
    TypeError
        The activation given twice, or ``input_shape`` together with
        ``Dense(in_features, out_features)``.

    Notes
    -----
    Shapes: x (n, in_features) -> a (n, out_features). Activation derivatives are
    computed from the stored output ``a``.

    Examples
    --------
    >>> import fastnn as fn
    >>> layer = fn.Dense(3, 2, activation="leaky_relu", alpha=0.1, seed=0)
    >>> layer.forward([[1.0, 2.0, 3.0]]).shape
    (1, 2)
    >>> fn.Dense(10, "relu")  # Keras style: the input size comes later
    Dense(None, 10, activation='relu')
    """

    trainable = True

    def __init__(self, in_features, out_features=None, activation=None, *,
                 input_shape=None, init="auto", l1=0.0, l2=0.0, use_bias=True,
                 dtype="float32", seed=None, alpha=None):
        if isinstance(out_features, str):  # Dense(units, "relu"), as in Keras
            if activation is not None:
                raise TypeError(f"activation given twice: {out_features!r} and {activation!r}")
            out_features, activation = None, out_features
        if out_features is None:  # Dense(units, ...): the input size comes later
            out_features, in_features = in_features, _input_features(input_shape)
        elif input_shape is not None:
            raise TypeError("input_shape goes with Dense(units, ...); "
                            "Dense(in_features, out_features) already gives the input size")
        self.in_features = (None if in_features is None
                            else check_int(in_features, "in_features", low=1))
        self.out_features = check_int(out_features, "out_features", low=1)
        #: A softmax on the last layer: computed as identity, folded into cross_entropy.
        self.softmax_output = activation == "softmax"
        self.activation, self.act_code = _activation_code(
            None if self.softmax_output else activation)
        if self.softmax_output:
            self.activation = "softmax"
        if self.activation == "step":
            raise ValueError("activation 'step' has no useful derivative; use it through "
                             "fastnn.Perceptron, or pick one of "
                             f"{sorted(set(kernels.ACTIVATIONS) - {'step'})}")
        self.alpha = _activation_alpha(self.activation, alpha)
        self.init = check_choice(init, "init", INITIALIZERS)
        self.l1 = check_float(l1, "l1", low=0.0)
        self.l2 = check_float(l2, "l2", low=0.0)
        self.use_bias = check_bool(use_bias, "use_bias")
        self.dtype = check_dtype(dtype)
        self.seed = check_seed(seed)
        self.W = self.b = self.dW = self.db = None
        self._buffers = _BatchBuffers()
        self._x = None
        if self.in_features is not None:
            self.build(self.in_features)

    @property
    def built(self):
        """Whether the input size is known and the weights exist (bool)."""
        return self.W is not None

    def build(self, in_features):
        """Set the input size and draw the weights.

        Sequential calls it for layers created as ``Dense(units, ...)``. Building again
        with the same size does nothing.

        Parameters
        ----------
        in_features : int >= 1
            The input size.

        Raises
        ------
        ValueError
            The layer is already built for another input size.
        """
        in_features = check_int(in_features, "in_features", low=1)
        if self.built:
            if in_features != self.in_features:
                raise ValueError(f"this Dense is built for {self.in_features} input "
                                 f"features, got {in_features}")
            return
        self.in_features = in_features
        # A zeros start draws nothing: no generator (seeding one from OS entropy costs
        # ~10 us, a third of building a small layer).
        rng = None if self.init == "zeros" else np.random.default_rng(self.seed)
        self.W = init_weights(self.init, in_features, self.out_features,
                              self.activation, rng, self.dtype)
        self.b = np.zeros(self.out_features, dtype=self.dtype)
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b)

    def parameters(self):
        """``[W, b]`` (``[W]`` without bias; ``[]`` before the layer is built)."""
        if not self.built:
            return []
        return [self.W, self.b] if self.use_bias else [self.W]

    def gradients(self):
        """``[dW, db]``, aligned with ``parameters()``."""
        if not self.built:
            return []
        return [self.dW, self.db] if self.use_bias else [self.dW]

    def output_features(self, n_in):
        """``out_features``; raises ValueError if built for another ``n_in``."""
        if not self.built:
            return self.out_features
        if n_in != self.in_features:
            raise ValueError(f"Dense expects {self.in_features} input features, but the "
                             f"previous layer gives {n_in}")
        return self.out_features

    def regularization_loss(self):
        """``l2 * sum(W**2) + l1 * sum(abs(W))`` as a float (summed in float64)."""
        loss = 0.0
        if self.l2:
            loss += self.l2 * float(np.square(self.W, dtype=np.float64).sum())
        if self.l1:
            loss += self.l1 * float(np.abs(self.W).sum(dtype=np.float64))
        return loss

    def add_regularization_gradient(self):
        """``dW += 2 * l2 * W + l1 * sign(W)``, in place."""
        if self.l2:
            self.dW += (2.0 * self.l2) * self.W
        if self.l1:
            self.dW += self.l1 * np.sign(self.W)

    def _check_input(self, x):
        x = check_array(x, "x", self.dtype)
        if not self.built:
            self.build(x.shape[1])
        if x.shape[1] != self.in_features:
            raise ValueError(f"x has {x.shape[1]} features per sample, but the layer expects "
                             f"{self.in_features}; got shape {x.shape}")
        return x

    def _forward(self, x, training=True):
        n = x.shape[0]
        bufs = self._buffers.get(n, {"out": (self.out_features,), "dz": (self.out_features,),
                                     "dx": (self.in_features,)}, self.dtype)
        out = bufs["out"]
        module = backend_module()
        forward = module.dense_forward_bf16 if self._bf16() else module.dense_forward
        forward(x, self.W, self.b, self.act_code, out, self.alpha)
        self._x, self._out, self._bufs = x, out, bufs
        return out

    def _backward(self, dout, need_dx=True):
        bufs = self._bufs
        dx = bufs["dx"] if need_dx else None
        module = backend_module()
        backward = module.dense_backward_bf16 if self._bf16() else module.dense_backward
        backward(self._x, self.W, self._out, dout, self.act_code, bufs["dz"], dx, self.dW,
                 self.db, self.alpha)
        return dx

    def _bf16(self):
        """Whether the model holding this layer is compiled with precision='bf16'."""
        return getattr(self._model, "precision", "fp32") == "bf16"

    def get_config(self):
        """The constructor arguments as JSON-able data (``layer_from_config`` rebuilds)."""
        return {"class": "Dense", "in_features": self.in_features,
                "out_features": self.out_features, "activation": self.activation,
                "init": self.init, "l1": self.l1, "l2": self.l2, "use_bias": self.use_bias,
                "dtype": self.dtype.name, "seed": self.seed,
                "alpha": _config_alpha(self.activation, self.alpha)}

    def __repr__(self):
        extra = f", activation={self.activation!r}" if self.activation != "identity" else ""
        return f"Dense({self.in_features}, {self.out_features}{extra})"


class Activation(Layer):
    """Elementwise activation layer ``a = act(z)``; its backward uses the stored ``a``.

    Parameters
    ----------
    name : str or None
        "identity" (None), "sigmoid", "tanh", "relu", "leaky_relu", "softplus" or
        "elu" (the formulas are listed under ``Dense``).
    alpha : float >= 0, optional
        leaky_relu's slope (default 0.01) or elu's scale (default 1.0); refused for the
        others.
    dtype : {"float32", "float64"}, default "float32"
        dtype of the inputs.

    Raises
    ------
    ValueError
        An unknown name, "step", or ``alpha`` for an activation without one.

    Notes
    -----
    Shapes: any (n, features) -> the same shape.
    """

    def __init__(self, name, alpha=None, *, dtype="float32"):
        self.activation, self.act_code = _activation_code(name)
        if self.activation == "step":
            raise ValueError("activation 'step' has no useful derivative; use fastnn.Perceptron")
        self.alpha = _activation_alpha(self.activation, alpha)
        self.dtype = check_dtype(dtype)
        self._buffers = _BatchBuffers()
        self._x = None

    def _forward(self, x, training=True):
        bufs = self._buffers.get(x.shape[0], {"out": x.shape[1:], "dx": x.shape[1:]},
                                 self.dtype)
        out = bufs["out"]
        backend_module().activation_forward(self.act_code, x, out, self.alpha)
        self._x, self._out, self._bufs = x, out, bufs
        return out

    def _backward(self, dout, need_dx=True):
        dx = self._bufs["dx"]
        backend_module().activation_backward(self.act_code, self._out, dout, dx, self.alpha)
        return dx

    def get_config(self):
        """The constructor arguments as JSON-able data (``layer_from_config`` rebuilds)."""
        return {"class": "Activation", "name": self.activation,
                "alpha": _config_alpha(self.activation, self.alpha), "dtype": self.dtype.name}

    def __repr__(self):
        return f"Activation({self.activation!r})"


def _named_activation(name, has_alpha=False):
    default = kernels.DEFAULT_ALPHA[kernels.ACTIVATIONS[name]]

    if has_alpha:
        def __init__(self, alpha=default, *, dtype="float32"):
            Activation.__init__(self, name, alpha, dtype=dtype)
    else:
        def __init__(self, *, dtype="float32"):
            Activation.__init__(self, name, dtype=dtype)

    return __init__


class ReLU(Activation):
    """``max(z, 0)``. Keyword: ``dtype`` ("float32" or "float64")."""
    __init__ = _named_activation("relu")


class LeakyReLU(Activation):
    """``z if z > 0 else alpha * z``.

    Parameters
    ----------
    alpha : float >= 0, default 0.01
        The slope for negative inputs.
    dtype : {"float32", "float64"}, default "float32"
        dtype of the inputs (keyword only).
    """
    __init__ = _named_activation("leaky_relu", has_alpha=True)


class Sigmoid(Activation):
    """``1 / (1 + exp(-z))``. Keyword: ``dtype`` ("float32" or "float64")."""
    __init__ = _named_activation("sigmoid")


class Tanh(Activation):
    """``tanh(z)``. Keyword: ``dtype`` ("float32" or "float64")."""
    __init__ = _named_activation("tanh")


class Softplus(Activation):
    """``log(1 + exp(z))``. Keyword: ``dtype`` ("float32" or "float64")."""
    __init__ = _named_activation("softplus")


class ELU(Activation):
    """``z if z > 0 else alpha * (exp(z) - 1)``.

    Parameters
    ----------
    alpha : float >= 0, default 1.0
        The scale of the negative part.
    dtype : {"float32", "float64"}, default "float32"
        dtype of the inputs (keyword only).
    """
    __init__ = _named_activation("elu", has_alpha=True)


class Identity(Activation):
    """``z`` (a no-op layer). Keyword: ``dtype`` ("float32" or "float64")."""
    __init__ = _named_activation("identity")


class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``rate`` and scale
    the survivors by ``1 / (1 - rate)``; identity at inference.

    Parameters
    ----------
    rate : float in [0, 1)
        Probability of dropping each unit.
    seed : int, optional
        Seed of the dropout masks, for reproducibility (keyword only).
    dtype : {"float32", "float64"}, default "float32"
        dtype of the inputs (keyword only).

    Notes
    -----
    Shapes: any (n, features) -> the same shape. Solvers and ``evaluate``/``predict``
    run in inference mode, where dropout is off.
    """

    def __init__(self, rate, *, seed=None, dtype="float32"):
        self.rate = check_float(rate, "rate", low=0.0, high=1.0, high_open=True)
        self.seed = check_seed(seed)
        self.dtype = check_dtype(dtype)
        self._rng = np.random.default_rng(self.seed)
        self._x = None

    def _forward(self, x, training=True):
        self._x = x
        if not training or self.rate == 0.0:
            self._mask = None
            self._out = x
            return x
        keep = self._rng.random(x.shape, dtype=np.float64) >= self.rate
        self._mask = keep.astype(self.dtype) * self.dtype.type(1.0 / (1.0 - self.rate))
        self._out = x * self._mask
        return self._out

    def _backward(self, dout, need_dx=True):
        return dout if self._mask is None else dout * self._mask

    def get_config(self):
        """The constructor arguments as JSON-able data (``layer_from_config`` rebuilds)."""
        return {"class": "Dropout", "rate": self.rate, "seed": self.seed,
                "dtype": self.dtype.name}

    def __repr__(self):
        return f"Dropout({self.rate})"


LAYER_CLASSES = {"Dense": Dense, "Activation": Activation, "Dropout": Dropout}


def layer_from_config(config):
    """Rebuild a layer from ``layer.get_config()``.

    Parameters
    ----------
    config : dict
        ``{"class": "Dense" | "Activation" | "Dropout", <constructor arguments>}``.

    Returns
    -------
    Layer
        A new layer (fresh weights for Dense, drawn from its ``seed``).
    """
    cls, config = config_class(config, LAYER_CLASSES, "layer class", key="class")
    cls_name = cls.__name__
    activation = config.get("name" if cls_name == "Activation" else "activation")
    if activation not in ALPHA_ACTIVATIONS and config.get("alpha") == 0.0:
        config["alpha"] = None  # files saved before configs stored None for no alpha
    if cls_name == "Activation":
        return Activation(config["name"], config.get("alpha"), dtype=config["dtype"])
    return cls(**config)
