"""First-order optimizers: small state machines over the model's flat buffers.

Each ``step(params, grads)`` is one update-kernel call over the whole flat parameter
vector. Update rules and defaults follow the algorithm boxes in torch.optim's
documentation (SGD with momentum/dampening/nesterov/weight_decay, Adagrad, RMSprop,
Adam, AdamW), except SGD's default ``lr=0.01``. ``lr`` is a float or a
``fastnn.schedules`` schedule; ``clipnorm`` optionally rescales the gradient so its
global L2 norm is at most ``clipnorm`` before the update.
"""
import math
import numbers

import numpy as np

from . import kernels, schedules
from ._backend import backend_module
from ._validation import check_bool, check_float, config_class
from .solvers import SOLVERS, Solver


def _check_lr(lr):
    if isinstance(lr, schedules.Schedule):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a positive number or a fastnn.schedules schedule, "
                        f"got {type(lr).__name__}")
    return check_float(lr, "lr", low=0.0, low_open=True)


class Optimizer:
    """Base class of the first-order optimizers: one update kernel over the flat buffers.

    Subclasses name their state buffers (``state_names``) and implement ``_update``.

    Parameters
    ----------
    lr : float > 0 or fastnn.schedules.Schedule
        The learning rate, or a schedule of it over the updates.
    clipnorm : float > 0, optional
        Rescale the gradient so its global L2 norm is at most ``clipnorm`` before each
        update.

    Attributes
    ----------
    iterations : int
        Updates made so far.
    lr_scale : float
        Multiplier on the (scheduled) rate; ReduceLROnPlateau lowers it.
    state : dict of str to ndarray
        The state buffers, each (n_params,) of the model's dtype.
    """

    name = None
    state_names = ()

    def __init__(self, lr, clipnorm=None):
        self.lr = lr
        self.clipnorm = None if clipnorm is None else check_float(
            clipnorm, "clipnorm", low=0.0, low_open=True)
        self.iterations = 0
        #: Multiplier on the (scheduled) rate; ReduceLROnPlateau lowers it.
        self.lr_scale = 1.0
        self.state = {}
        self._owner = None

    @property
    def lr(self):
        """The learning rate: a positive float or a fastnn.schedules schedule."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _check_lr(value)

    def build(self, n_params, dtype, owner=None):
        """Allocate zeroed state for ``n_params`` parameters of the model ``owner``.

        The state is kept when the same model builds again with the same size (compile
        called twice); an optimizer moved to another model starts afresh (state and
        update count), so two models never share one optimizer's momentum.

        Parameters
        ----------
        n_params : int
            Size of the flat parameter vector.
        dtype : numpy dtype
            The model's dtype.
        owner : object, optional
            The model (compared by identity).
        """
        fits = owner is self._owner and all(
            name in self.state and self.state[name].shape == (n_params,)
            and self.state[name].dtype == dtype for name in self.state_names)
        if not fits:
            self.state = {name: np.zeros(n_params, dtype=dtype) for name in self.state_names}
            if owner is not self._owner:
                self.iterations = 0
                self.lr_scale = 1.0
        self._owner = owner

    def current_lr(self, t=None):
        """The rate for update number ``t`` (from 1; default: the next update).

        ``lr`` (or ``lr(t)`` for a schedule) times ``lr_scale``, as a float.
        """
        t = self.iterations + 1 if t is None else t
        base = self.lr(t) if isinstance(self.lr, schedules.Schedule) else self.lr
        return base * self.lr_scale

    def step(self, params, grads):
        """One in-place update of the flat ``params`` from the flat ``grads``.

        Parameters
        ----------
        params : ndarray, shape (n_params,)
            Updated in place.
        grads : ndarray, shape (n_params,)
            The gradient, same dtype; rescaled in place when ``clipnorm`` applies.
        """
        if self.clipnorm is not None:
            norm = math.sqrt(float(np.dot(grads, grads)))
            if norm > self.clipnorm:
                grads *= grads.dtype.type(self.clipnorm / norm)
        self.iterations += 1
        self._update(backend_module(), params, grads, self.current_lr(self.iterations),
                     self.iterations)

    def _hyper(self):
        """The hyper-parameters besides ``lr`` and ``clipnorm``, as the constructor takes
        them (get_config and repr read this one table)."""
        return {}

    def upcoming_lrs(self, n, out=None):
        """The rates of the next ``n`` updates, a float64 (n,) array (for fused kernels):
        written into ``out`` (float64 (n,)) when given, which is returned."""
        if out is None:
            out = np.empty(n, dtype=np.float64)
        if not isinstance(self.lr, schedules.Schedule):  # one rate: no call per update
            out.fill(self.lr * self.lr_scale)
            return out
        t0 = self.iterations
        out[...] = [self.current_lr(t) for t in range(t0 + 1, t0 + n + 1)]
        return out

    def kernel_spec(self):
        """The ``kernels.OptimizerSpec`` (code, hyper, states) of ``train_epoch``, or None
        when this optimizer needs work the fused kernel does not do (gradient clipping)."""
        if self.clipnorm is not None:
            return None
        # the kernel's hyper-parameters are attributes of the same names
        hyper = np.array([float(getattr(self, name))
                          for name in kernels.OPTIMIZER_HYPER[self.kernel]])
        states = [self.state[name] for name in self.state_names]
        states += [states[0]] * (3 - len(states))  # unused slots: never touched
        return kernels.OptimizerSpec(kernels.OPTIMIZER_CODES[self.kernel], hyper,
                                     tuple(states))

    def get_config(self):
        """JSON-able ``{"name", "lr", "clipnorm", <hyper-parameters>}``; ``from_config``
        rebuilds the optimizer (without its state)."""
        lr = self.lr.get_config() if isinstance(self.lr, schedules.Schedule) else self.lr
        return {"name": self.name, "lr": lr, "clipnorm": self.clipnorm, **self._hyper()}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in
                         {"lr": self.lr, **self._hyper()}.items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and weight decay.

    As torch.optim.SGD: ``g = grad + weight_decay * p``; with momentum
    ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` at the first update) and
    ``g = g + momentum * buf`` (nesterov) or ``g = buf``; then ``p -= lr * g``.

    Parameters
    ----------
    lr : float > 0 or fastnn.schedules.Schedule, default 0.01
        The learning rate, or a schedule of it over the updates.
    momentum : float >= 0, default 0.0
        Momentum factor.
    dampening : float in [0, 1], default 0.0
        Dampening of the momentum.
    nesterov : bool, default False
        Nesterov momentum (needs momentum > 0 and dampening 0).
    weight_decay : float >= 0, default 0.0
        L2 penalty added to the gradient.
    clipnorm : float > 0, optional
        Rescale the gradient so its global L2 norm is at most ``clipnorm`` before each
        update (this keeps fit off the fused epoch kernel).

    Raises
    ------
    ValueError
        A value out of range, or nesterov without momentum or with dampening.
    """

    name = "sgd"
    state_names = ("momentum_buffer",)

    def __init__(self, lr=0.01, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, clipnorm=None):
        super().__init__(lr, clipnorm)
        self.momentum = check_float(momentum, "momentum", low=0.0)
        self.dampening = check_float(dampening, "dampening", low=0.0, high=1.0)
        self.weight_decay = check_float(weight_decay, "weight_decay", low=0.0)
        self.nesterov = check_bool(nesterov, "nesterov")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0, got "
                             f"momentum={self.momentum}, dampening={self.dampening}")

    kernel = "sgd"

    def _update(self, k, params, grads, lr, t):
        k.sgd_update(params, grads, self.state["momentum_buffer"], lr, self.momentum,
                     self.dampening, self.weight_decay, self.nesterov, t)

    def _hyper(self):
        return {"momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}


class Adagrad(Optimizer):
    """Adagrad: per-parameter rates ``lr / sqrt(sum of squared gradients)``.

    As torch.optim.Adagrad: ``g = grad + weight_decay * p``;
    ``lr_t = lr / (1 + (t - 1) * lr_decay)``; ``sum += g**2``;
    ``p -= lr_t * g / (sqrt(sum) + eps)``.

    Parameters
    ----------
    lr : float > 0 or fastnn.schedules.Schedule, default 0.01
        The learning rate, or a schedule of it over the updates.
    lr_decay : float >= 0, default 0.0
        Decay of the rate over the updates.
    weight_decay : float >= 0, default 0.0
        L2 penalty added to the gradient.
    eps : float >= 0, default 1e-10
        Added to the denominator.
    clipnorm : float > 0, optional
        Rescale the gradient so its global L2 norm is at most ``clipnorm`` before each
        update (this keeps fit off the fused epoch kernel).
    """

    name = "adagrad"
    state_names = ("sum",)

    def __init__(self, lr=0.01, lr_decay=0.0, weight_decay=0.0, eps=1e-10, clipnorm=None):
        super().__init__(lr, clipnorm)
        self.lr_decay = check_float(lr_decay, "lr_decay", low=0.0)
        self.weight_decay = check_float(weight_decay, "weight_decay", low=0.0)
        self.eps = check_float(eps, "eps", low=0.0)

    kernel = "adagrad"

    def _update(self, k, params, grads, lr, t):
        k.adagrad_update(params, grads, self.state["sum"], lr, self.lr_decay,
                         self.weight_decay, self.eps, t)

    def _hyper(self):
        return {"lr_decay": self.lr_decay, "weight_decay": self.weight_decay, "eps": self.eps}


class RMSprop(Optimizer):
    """RMSprop with optional momentum and centering.

    As torch.optim.RMSprop: ``g = grad + weight_decay * p``;
    ``v = alpha * v + (1 - alpha) * g**2``; centered: ``m = alpha * m + (1 - alpha) * g``
    and the denominator uses ``v - m**2``; ``d = sqrt(v) + eps``; with momentum
    ``buf = momentum * buf + g / d`` and ``p -= lr * buf``, else ``p -= lr * g / d``.

    Parameters
    ----------
    lr : float > 0 or fastnn.schedules.Schedule, default 0.01
        The learning rate, or a schedule of it over the updates.
    alpha : float in [0, 1], default 0.99
        Smoothing constant of the squared-gradient average.
    eps : float >= 0, default 1e-8
        Added to the denominator.
    weight_decay : float >= 0, default 0.0
        L2 penalty added to the gradient.
    momentum : float >= 0, default 0.0
        Momentum factor.
    centered : bool, default False
        Normalize by an estimate of the gradient's variance instead of its second moment.
    clipnorm : float > 0, optional
        Rescale the gradient so its global L2 norm is at most ``clipnorm`` before each
        update (this keeps fit off the fused epoch kernel).
    """

    name = "rmsprop"
    state_names = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(self, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, clipnorm=None):
        super().__init__(lr, clipnorm)
        self.alpha = check_float(alpha, "alpha", low=0.0, high=1.0)
        self.eps = check_float(eps, "eps", low=0.0)
        self.weight_decay = check_float(weight_decay, "weight_decay", low=0.0)
        self.momentum = check_float(momentum, "momentum", low=0.0)
        self.centered = check_bool(centered, "centered")

    kernel = "rmsprop"

    def _update(self, k, params, grads, lr, t):
        s = self.state
        k.rmsprop_update(params, grads, s["square_avg"], s["momentum_buffer"], s["grad_avg"],
                         lr, self.alpha, self.eps, self.weight_decay, self.momentum,
                         self.centered)

    def _hyper(self):
        return {"alpha": self.alpha, "eps": self.eps, "weight_decay": self.weight_decay,
                "momentum": self.momentum, "centered": self.centered}


class Adam(Optimizer):
    """Adam (L2 weight decay added to the gradient); optional AMSGrad.

    As torch.optim.Adam: ``g = grad + weight_decay * p``;
    ``m = beta1 * m + (1 - beta1) * g``; ``v = beta2 * v + (1 - beta2) * g**2``;
    ``p -= lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)`` (AMSGrad uses
    the running maximum of v).

    Parameters
    ----------
    lr : float > 0 or fastnn.schedules.Schedule, default 1e-3
        The learning rate, or a schedule of it over the updates.
    betas : (float, float) in [0, 1), default (0.9, 0.999)
        Decay rates of the first and second moment averages.
    eps : float >= 0, default 1e-8
        Added to the denominator.
    weight_decay : float >= 0, default 0.0
        L2 penalty added to the gradient.
    amsgrad : bool, default False
        Use the AMSGrad variant.
    clipnorm : float > 0, optional
        Rescale the gradient so its global L2 norm is at most ``clipnorm`` before each
        update (this keeps fit off the fused epoch kernel).

    Raises
    ------
    TypeError
        ``betas`` is not a pair.
    ValueError
        A value out of range.
    """

    name = "adam"
    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, clipnorm=None):
        super().__init__(lr, clipnorm)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (check_float(betas[0], "betas[0]", low=0.0, high=1.0, high_open=True),
                      check_float(betas[1], "betas[1]", low=0.0, high=1.0, high_open=True))
        self.eps = check_float(eps, "eps", low=0.0)
        self.weight_decay = check_float(weight_decay, "weight_decay", low=0.0)
        self.amsgrad = check_bool(amsgrad, "amsgrad")

    kernel = "adam"

    @property
    def beta1(self):
        """``betas[0]``, the first-moment decay rate."""
        return self.betas[0]

    @property
    def beta2(self):
        """``betas[1]``, the second-moment decay rate."""
        return self.betas[1]

    def _update(self, k, params, grads, lr, t):
        s = self.state
        k.adam_update(params, grads, s["exp_avg"], s["exp_avg_sq"], s["max_exp_avg_sq"], lr,
                      self.betas[0], self.betas[1], self.eps, self.weight_decay,
                      self.decoupled, self.amsgrad, t)

    def _hyper(self):
        return {"betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "amsgrad": self.amsgrad}


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p *= 1 - lr * weight_decay`` before the step.

    As torch.optim.AdamW; the parameters are Adam's, with ``weight_decay`` default 0.01
    applied as above instead of through the gradient.
    """

    name = "adamw"
    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 amsgrad=False, clipnorm=None):
        super().__init__(lr, betas, eps, weight_decay, amsgrad, clipnorm)


#: Names accepted by ``compile(optimizer=...)``, with their default settings.
OPTIMIZERS = {
    "sgd": lambda: SGD(),
    "momentum": lambda: SGD(momentum=0.9),
    "nesterov": lambda: SGD(momentum=0.9, nesterov=True),
    "adagrad": lambda: Adagrad(),
    "rmsprop": lambda: RMSprop(),
    "adam": lambda: Adam(),
    "adamw": lambda: AdamW(),
}

_CLASSES = {cls.name: cls for cls in (SGD, Adagrad, RMSprop, Adam, AdamW)}


def get(optimizer):
    """An optimizer or solver from a name or an instance.

    Parameters
    ----------
    optimizer : str, Optimizer or fastnn.solvers.Solver
        A name in ``OPTIMIZERS`` ("sgd", "momentum", "nesterov", "adagrad", "rmsprop",
        "adam", "adamw"; default settings) or ``fastnn.solvers.SOLVERS``, or an
        instance, returned as is.

    Returns
    -------
    Optimizer or fastnn.solvers.Solver

    Raises
    ------
    ValueError
        An unknown name.
    TypeError
        Neither a name nor an instance (a class must be called).
    """
    names = sorted(OPTIMIZERS) + sorted(SOLVERS)
    if isinstance(optimizer, str):
        if optimizer in OPTIMIZERS:
            return OPTIMIZERS[optimizer]()
        if optimizer in SOLVERS:
            return SOLVERS[optimizer]()
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {names}")
    if isinstance(optimizer, (Optimizer, Solver)):
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, (Optimizer, Solver)):
        raise TypeError(f"optimizer must be an instance, got the class "
                        f"{optimizer.__name__}: call it, {optimizer.__name__}()")
    raise TypeError(f"optimizer must be a name (one of {names}) or an optimizer object, "
                    f"got {type(optimizer).__name__}")


def from_config(config):
    """Rebuild an optimizer (fresh state) from ``get_config()``."""
    cls, kwargs = config_class(config, _CLASSES, "optimizer")
    if isinstance(kwargs.get("lr"), dict):
        kwargs["lr"] = schedules.from_config(kwargs["lr"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(**kwargs)
