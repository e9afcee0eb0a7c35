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
    """Base class. Subclasses name their state buffers and implement ``_update``."""

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
        """The rate for update number ``t`` (default: the next update)."""
        t = self.iterations + 1 if t is None else t
        base = self.lr(t) if isinstance(self.lr, schedules.Schedule) else self.lr
        return base * self.lr_scale

    def step(self, params, grads):
        """One in-place update of the flat ``params`` from the flat ``grads``."""
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

    def upcoming_lrs(self, n):
        """float64 array of the rates of the next ``n`` updates (for fused kernels)."""
        t0 = self.iterations
        return np.array([self.current_lr(t) for t in range(t0 + 1, t0 + n + 1)])

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
        lr = self.lr.get_config() if isinstance(self.lr, schedules.Schedule) else self.lr
        return {"name": self.name, "lr": lr, "clipnorm": self.clipnorm, **self._hyper()}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in
                         {"lr": self.lr, **self._hyper()}.items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and weight decay."""

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
    """Adagrad: per-parameter rates lr / sqrt(sum of squared gradients)."""

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
    """RMSprop with optional momentum and centering."""

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
    """Adam (L2 weight decay added to the gradient); optional AMSGrad."""

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
        return self.betas[0]

    @property
    def beta2(self):
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
    """Adam with decoupled weight decay: p *= 1 - lr * weight_decay before the step."""

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
    """An optimizer or solver from a name (OPTIMIZERS, fastnn.solvers.SOLVERS) or an
    Optimizer / fastnn.solvers.Solver instance."""
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
    """Rebuild an optimizer from ``get_config()``."""
    cls, kwargs = config_class(config, _CLASSES, "optimizer")
    if isinstance(kwargs.get("lr"), dict):
        kwargs["lr"] = schedules.from_config(kwargs["lr"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(**kwargs)
