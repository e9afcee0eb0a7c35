"""Learning-rate schedules: ``schedule(t) -> lr`` where ``t`` counts the updates made
so far *including the current one* (so the first update uses ``t = 1``).

Pass one as an optimizer's ``lr``: ``fn.optimizers.SGD(lr=fn.schedules.InverseSqrt(0.5))``.
Every schedule takes the initial rate ``lr`` first; all steps are counted in updates.
"""
import math

from ._validation import check_float, check_int, config_class


class Schedule:
    """Base class: ``schedule(t)`` is the rate of update number ``t`` (from 1).

    Subclasses define ``__call__(t)`` and ``_params()``. Every schedule validates
    ``lr > 0`` (a float) and its other parameters at construction, raising ValueError
    or TypeError naming the argument.
    """

    def get_config(self):
        """JSON-able ``{"name": <class name>, <parameters>}``; ``from_config`` rebuilds it."""
        return {"name": type(self).__name__, **self._params()}

    def _params(self):
        return {"lr": self.lr}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """``lr_t = lr``, a constant rate.

    Parameters
    ----------
    lr : float > 0
        The rate.
    """

    def __init__(self, lr):
        self.lr = check_float(lr, "lr", low=0.0, low_open=True)

    def __call__(self, t):
        """The learning rate (float) of update number ``t`` (an int >= 1)."""
        return self.lr


class InverseSqrt(Schedule):
    """``lr_t = lr / sqrt(t)``: the 1/sqrt(number of updates) step size.

    Parameters
    ----------
    lr : float > 0
        The rate of the first update.

    Examples
    --------
    >>> import fastnn as fn
    >>> fn.schedules.InverseSqrt(0.5)(4)
    0.25
    """

    def __init__(self, lr):
        self.lr = check_float(lr, "lr", low=0.0, low_open=True)

    def __call__(self, t):
        """The learning rate (float) of update number ``t`` (an int >= 1)."""
        return self.lr / math.sqrt(t)


class InverseTime(Schedule):
    """``lr_t = lr / (1 + k * t)``.

    Parameters
    ----------
    lr : float > 0
        The initial rate.
    k : float >= 0, default 1.0
        The decay rate.
    """

    def __init__(self, lr, k=1.0):
        self.lr = check_float(lr, "lr", low=0.0, low_open=True)
        self.k = check_float(k, "k", low=0.0)

    def __call__(self, t):
        """The learning rate (float) of update number ``t`` (an int >= 1)."""
        return self.lr / (1.0 + self.k * t)

    def _params(self):
        return {"lr": self.lr, "k": self.k}


class StepDecay(Schedule):
    """``lr_t = lr * gamma ** floor((t - 1) / step_size)``.

    Parameters
    ----------
    lr : float > 0
        The initial rate.
    step_size : int >= 1
        Updates between two decays.
    gamma : float > 0, default 0.1
        The factor of each decay.
    """

    def __init__(self, lr, step_size, gamma=0.1):
        self.lr = check_float(lr, "lr", low=0.0, low_open=True)
        self.step_size = check_int(step_size, "step_size", low=1)
        self.gamma = check_float(gamma, "gamma", low=0.0, low_open=True)

    def __call__(self, t):
        """The learning rate (float) of update number ``t`` (an int >= 1)."""
        return self.lr * self.gamma ** ((t - 1) // self.step_size)

    def _params(self):
        return {"lr": self.lr, "step_size": self.step_size, "gamma": self.gamma}


class ExponentialDecay(Schedule):
    """``lr_t = lr * gamma ** (t - 1)``.

    Parameters
    ----------
    lr : float > 0
        The initial rate.
    gamma : float > 0
        The factor per update.
    """

    def __init__(self, lr, gamma):
        self.lr = check_float(lr, "lr", low=0.0, low_open=True)
        self.gamma = check_float(gamma, "gamma", low=0.0, low_open=True)

    def __call__(self, t):
        """The learning rate (float) of update number ``t`` (an int >= 1)."""
        return self.lr * self.gamma ** (t - 1)

    def _params(self):
        return {"lr": self.lr, "gamma": self.gamma}


class CosineDecay(Schedule):
    """``lr_t = eta_min + (lr - eta_min) * (1 + cos(pi * min(t - 1, T_max) / T_max)) / 2``.

    Parameters
    ----------
    lr : float > 0
        The initial rate.
    T_max : int >= 1
        Updates over which the rate falls to ``eta_min`` (and stays there).
    eta_min : float in [0, lr], default 0.0
        The final rate.
    """

    def __init__(self, lr, T_max, eta_min=0.0):
        self.lr = check_float(lr, "lr", low=0.0, low_open=True)
        self.T_max = check_int(T_max, "T_max", low=1)
        self.eta_min = check_float(eta_min, "eta_min", low=0.0, high=self.lr)

    def __call__(self, t):
        """The learning rate (float) of update number ``t`` (an int >= 1)."""
        progress = min(t - 1, self.T_max) / self.T_max
        return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2

    def _params(self):
        return {"lr": self.lr, "T_max": self.T_max, "eta_min": self.eta_min}


SCHEDULES = {cls.__name__: cls for cls in
             (Constant, InverseSqrt, InverseTime, StepDecay, ExponentialDecay, CosineDecay)}


def from_config(config):
    """Rebuild a schedule from ``get_config()`` (a dict); ValueError for an unknown name."""
    cls, kwargs = config_class(config, SCHEDULES, "schedule")
    return cls(**kwargs)
