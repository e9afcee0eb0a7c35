"""Full-batch, quasi-Newton, conjugate-gradient, Levenberg-Marquardt and Newton solvers.

A solver is passed to ``model.compile(optimizer=...)`` like any optimizer; then
``fit(X, y, epochs=N)`` runs at most N solver iterations on the whole training set,
with callbacks, progress, History and validation as usual, and stops early on its own
convergence tests (``history.stop_reason`` says why). Solvers work on the flat
parameter vector in float64 and evaluate the network in inference mode (dropout off),
so the objective is deterministic; regularization is included.

scipy is imported when a solver first runs, not with fastnn.

Convergence tests shared by every solver: ``gtol`` on the largest absolute gradient
entry, ``ftol`` on the relative loss change between iterations
(``|f_prev - f| <= ftol * max(|f_prev|, |f|, 1)``).
"""
import contextlib
import math

import numpy as np

from ._backend import backend_module
from ._validation import check_choice, check_float, check_int, config_class
from .layers import Activation, Dense

#: Above this many parameters Newton() refuses (its Hessian is n_params^2 float64).
NEWTON_MAX_PARAMS = 3000


class Objective:
    """The model's training loss as a function of a flat float64 parameter vector.

    Counts evaluations: ``n_evals`` loss+gradient evaluations (a loss-only evaluation
    counts as one too). Caches the last point so f and grad at the same x cost one pass.

    Distributed (``comm``, a ``fastnn.distributed.Communicator``): X, target and weights
    are this rank's part of the training set; the loss and gradient are the
    sample-weighted sums over every rank's part (one Allreduce per evaluation), as are
    the Gauss-Newton matrix J~'J~ and product J~'J~ v. ``n_samples`` and ``mass`` are
    the totals over all ranks.
    """

    def __init__(self, model, X, target, weights, comm=None):
        self.model, self.X, self.target, self.weights = model, X, target, weights
        self.comm = comm
        self.n_evals = 0
        self._cache_x = None
        self._cache_out = None
        local_mass = float(X.shape[0] if weights is None else weights.sum(dtype=np.float64))
        self.n_samples, self.mass = X.shape[0], local_mass
        if comm is not None:
            n_total, mass_total = comm.sum([X.shape[0], local_mass])
            self.n_samples, self.mass = int(n_total), float(mass_total)
        self._local_mass = local_mass

    @property
    def n_params(self):
        """Length of the flat parameter vector x."""
        return self.model.params.size

    def _set(self, x):
        self.model.params[...] = x

    def loss_and_grad(self, x):
        """(loss, gradient float64 copy) at x."""
        if self._cache_x is not None and np.array_equal(x, self._cache_x):
            return self._cache
        loss, out = 0.0, None
        with self._guard():
            self._set(x)
            loss, out = self.model._loss_and_grad(self.X, self.target, self.weights,
                                                  training=False)
        grad = self.model.grads.astype(np.float64)
        if self.comm is not None:
            loss, _ = self.comm.average_gradient(grad, loss, self._local_mass)
        self.n_evals += 1
        self._cache_x = np.array(x, dtype=np.float64, copy=True)
        self._cache = (loss, grad)
        self._cache_out = out.copy()  # (n, n_outputs): small next to the forward pass
        return self._cache

    def _guard(self):
        return contextlib.nullcontext() if self.comm is None else self.comm.guard()

    def output_at(self, x):
        """The network output (n, n_outputs) of the last loss evaluation if it was at
        ``x``, else None."""
        if self._cache_x is None or not np.array_equal(x, self._cache_x):
            return None
        return self._cache_out

    def loss(self, x):
        """The training loss (regularization included) at x."""
        return self.loss_and_grad(x)[0]

    def grad(self, x):
        """The gradient (float64 copy, shape of x) at x."""
        return self.loss_and_grad(x)[1]

    def hessp(self, x, v):
        """Hessian-vector product by central differences of the analytic gradient."""
        norm = np.linalg.norm(v)
        if norm == 0:
            return np.zeros_like(v)
        h = math.sqrt(np.finfo(self.model.dtype).eps) * (1 + np.linalg.norm(x)) / norm
        g_plus = self.grad(x + h * v)
        g_minus = self.grad(x - h * v)
        return (g_plus - g_minus) / (2 * h)

    # ---------------------------------------------------------- least squares (LM)
    def _residual_scale(self):
        """sqrt(2 s_i): mse = sum_i s_i sum_j r_ij^2 = 1/2 ||sqrt(2 s) r||^2, with s_i =
        w_i / (k sum w) over the whole (all ranks') training set."""
        n, k = self.X.shape[0], self.model.n_outputs
        if self.weights is None:
            s = np.full(n, 1.0 / (self.n_samples * k))
        else:
            s = self.weights.astype(np.float64) / (k * self.mass)
        return np.sqrt(2 * s)

    def jacobian(self, x):
        """Scaled residual Jacobian J~ (k*n, P), float64, rows ordered output-major.

        Built by backpropagating each output unit through the network with the
        per-sample kernel ``dense_per_sample_grad`` (no Python loop over samples).
        """
        model = self.model
        self._set(x)
        model._forward(self.X, False)
        n, k = self.X.shape[0], model.n_outputs
        scale = self._residual_scale().astype(model.dtype)
        jac = np.zeros((k * n, self.n_params), dtype=model.dtype)
        dout = np.zeros((n, k), dtype=model.dtype)
        kern = backend_module()
        offsets = _param_offsets(model)
        for j in range(k):
            dout[...] = 0
            dout[:, j] = scale
            model._backward(dout)
            block = jac[j * n:(j + 1) * n]
            for layer, offset in offsets:
                kern.dense_per_sample_grad(layer._x, layer._bufs["dz"], block, offset,
                                           layer.use_bias)
        return jac.astype(np.float64, copy=False)

    def jvp(self, v):
        """J~ v as an (n, k) array, by forward-mode differentiation at the point of the
        last forward pass."""
        model = self.model
        kern = backend_module()
        dtype = model.dtype
        tangent = None
        for layer, offset in _param_offsets(model, all_layers=True):
            if isinstance(layer, Dense):
                d, k = layer.W.shape
                Wv = v[offset:offset + d * k].reshape(d, k).astype(dtype)
                tz = _matmul(layer._x, Wv)
                if tangent is not None:
                    tz += _matmul(tangent, layer.W)
                if layer.use_bias:
                    tz += v[offset + d * k:offset + d * k + k].astype(dtype)
                tangent = np.empty_like(tz)
                kern.activation_backward(layer.act_code, layer._out, tz, tangent, layer.alpha)
            elif isinstance(layer, Activation) and tangent is not None:
                out = np.empty_like(tangent)
                kern.activation_backward(layer.act_code, layer._out, tangent, out, layer.alpha)
                tangent = out
        return tangent * self._residual_scale()[:, None]

    def jtvp(self, u):
        """J~^T u for u of shape (n, k) (a backward pass; regularization excluded)."""
        model = self.model
        dout = np.ascontiguousarray(u * self._residual_scale()[:, None], dtype=model.dtype)
        model._backward(dout)
        return model.grads.astype(np.float64)

    def gauss_newton(self, x):
        """J~'J~ (P, P) at x, summed over the ranks' parts of the training set."""
        A = _gram(self.jacobian(x))
        return A if self.comm is None else self.comm.sum_matrix(A)

    def gauss_newton_product(self, v):
        """J~'J~ v at the point of the last forward pass, summed over the ranks."""
        product = self.jtvp(self.jvp(v))
        return product if self.comm is None else self.comm.sum(product)


def _matmul(a, b):
    """a @ b for C-contiguous a (n, d), b (d, k) through scipy's BLAS (the one BLAS the
    compiled backends use), with no copies: (a b)^T = b^T a^T in column-major terms."""
    from scipy.linalg.blas import get_blas_funcs

    gemm = get_blas_funcs("gemm", (a, b))
    return gemm(1.0, b.T, a.T).T


def _gram(J):
    """J^T J through scipy's BLAS, for a C-contiguous J (no copy of J)."""
    from scipy.linalg.blas import get_blas_funcs

    gemm = get_blas_funcs("gemm", (J,))
    return gemm(1.0, J.T, J.T, trans_b=True)


def _param_offsets(model, all_layers=False):
    """[(layer, offset of its first parameter in the flat vector)] for Dense layers
    (every layer with ``all_layers``), from the model's layout."""
    return [(layer, offset) for layer, offset in zip(model.layers, model.layer_offsets)
            if all_layers or isinstance(layer, Dense)]


def _l2_curvature(model):
    """Diagonal of the regularizer's Hessian: 2*l2 on each regularized weight."""
    diag = np.zeros(model.params.size)
    for layer, offset in _param_offsets(model):
        if layer.l2:
            diag[offset:offset + layer.W.size] = 2 * layer.l2
    return diag


class Solver:
    """Base class: ``minimize(objective, x0, max_iter, on_iteration) -> reason``.

    ``on_iteration(x, loss)`` is called after every iteration with the new point and
    returns True to stop (callbacks asked for it).
    """

    name = None
    #: Losses the solver accepts (None: any).
    losses = None

    def __init__(self, gtol=1e-6, ftol=1e-10):
        self.gtol = check_float(gtol, "gtol", low=0.0)
        self.ftol = check_float(ftol, "ftol", low=0.0)
        self.iterations = 0

    def check_precision(self, precision):
        """Raise ValueError unless ``precision`` is "fp32": a solver's line searches,
        curvature pairs and Hessian products need float32 / float64 gradients, not
        products rounded to bf16."""
        if precision != "fp32":
            raise ValueError(f"{type(self).__name__} needs precision='fp32' (second-order "
                             f"and line-search solvers need exact float32 / float64 "
                             f"gradients), got precision={precision!r}; use a first-order "
                             f"optimizer (e.g. 'sgd', 'adam') for bf16")

    def check_model(self, model, loss):
        """Raise ValueError if this solver cannot train ``model`` with ``loss``."""
        if self.losses is not None and loss.name not in self.losses:
            raise ValueError(f"{type(self).__name__} needs a sum-of-squares loss "
                             f"{list(self.losses)}, got {loss.name!r}")

    def _converged(self, f_prev, f, g):
        gmax = float(np.max(np.abs(g)))
        if gmax <= self.gtol:
            return f"converged: max |gradient| {gmax:.3g} <= gtol {self.gtol:.3g}"
        if f_prev is not None and abs(f_prev - f) <= self.ftol * max(abs(f_prev), abs(f), 1.0):
            return f"converged: relative loss change <= ftol {self.ftol:.3g}"
        return None

    def _params(self):
        return {"gtol": self.gtol, "ftol": self.ftol}

    def get_config(self):
        """The solver's name and settings, as ``from_config`` takes them."""
        return {"name": self.name, **self._params()}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


class _OwnLoop(Solver):
    """Solvers written here: one ``_iterate`` per fit epoch."""

    def minimize(self, objective, x0, max_iter, on_iteration):
        """Iterate from ``x0`` until converged, ``max_iter`` iterations or
        ``on_iteration`` asks to stop; returns the reason (None when asked to stop)."""
        x = np.array(x0, dtype=np.float64)
        f, g = objective.loss_and_grad(x)
        self._start(objective, x)
        reason = self._converged(None, f, g)
        for _ in range(max_iter):
            if reason:
                break
            x_new, f_new, failure = self._iterate(objective, x, f, g)
            if failure:
                return failure
            self.iterations += 1
            g_new = objective.grad(x_new)
            reason = self._converged(f, f_new, g_new)
            x, f, g = x_new, f_new, g_new
            if on_iteration(x, f):
                return None
        return reason or f"reached the maximum of {max_iter} iterations"

    def _start(self, objective, x):
        pass


def _backtracking(objective, x, f, g, direction, max_steps=40, c1=1e-4):
    """Armijo backtracking along a descent direction; (x_new, f_new) or None."""
    slope = float(g @ direction)
    if slope >= 0:
        direction, slope = -g, -float(g @ g)
    t = 1.0
    for _ in range(max_steps):
        x_new = x + t * direction
        f_new = objective.loss(x_new)
        if math.isfinite(f_new) and f_new <= f + c1 * t * slope:
            return x_new, f_new
        t *= 0.5
    return None


class GradientDescent(_OwnLoop):
    """Plain full-batch gradient descent: x <- x - lr * grad L(x)."""

    name = "gradient_descent"

    def __init__(self, lr=0.1, gtol=1e-6, ftol=0.0):
        super().__init__(gtol, ftol)
        self.lr = check_float(lr, "lr", low=0.0, low_open=True)

    def _iterate(self, objective, x, f, g):
        x_new = x - self.lr * g
        return x_new, objective.loss(x_new), None

    def _params(self):
        return {"lr": self.lr, **super()._params()}


class ConjugateGradient(_OwnLoop):
    """Nonlinear conjugate gradient with a strong-Wolfe line search.

    beta: "polak-ribiere" (PR+, beta = max(0, g'(g - g_prev) / g_prev'g_prev)) or
    "fletcher-reeves" (beta = g'g / g_prev'g_prev); restarts along -g when the
    direction is not a descent direction or the line search fails.
    """

    name = "conjugate_gradient"

    def __init__(self, beta="polak-ribiere", gtol=1e-6, ftol=1e-10):
        super().__init__(gtol, ftol)
        self.beta = check_choice(beta, "beta", ("polak-ribiere", "fletcher-reeves"))

    def _start(self, objective, x):
        self._direction = None
        self._g_prev = None
        self._f_older = None

    def _iterate(self, objective, x, f, g):
        d = self._direction
        if d is not None:
            gp = self._g_prev
            if self.beta == "fletcher-reeves":
                beta = float(g @ g) / float(gp @ gp)
            else:
                beta = max(0.0, float(g @ (g - gp)) / float(gp @ gp))
            d = -g + beta * d
            if float(g @ d) >= 0:
                d = -g
        else:
            d = -g
        from scipy.optimize import line_search

        step = line_search(objective.loss, objective.grad, x, d, gfk=g,
                           old_fval=f, old_old_fval=self._f_older, c2=0.1)
        alpha = step[0]
        if alpha is None:
            d = -g
            found = _backtracking(objective, x, f, g, d)
            if found is None:
                return x, f, "stopped: line search found no decrease"
            x_new, f_new = found
        else:
            x_new = x + alpha * d
            f_new = objective.loss(x_new)
        self._direction, self._g_prev, self._f_older = d, g, f
        return x_new, f_new, None

    def _params(self):
        return {"beta": self.beta, **super()._params()}


class LevenbergMarquardt(_OwnLoop):
    """Levenberg-Marquardt for the mse loss: solve ``(J'J + D + mu I) delta = -g``.

    J is the scaled residual Jacobian (so ``J'J`` is the Gauss-Newton Hessian of the
    mse), D the l2 regularizer's curvature and g the exact gradient. A step that lowers
    the loss is taken and mu is multiplied by ``mu_decrease``; otherwise by
    ``mu_increase`` and the step is solved again, until mu exceeds ``mu_max``.

    ``matrix_free``: False builds J with the per-sample kernel and solves by Cholesky;
    True never forms J and solves the damped system by conjugate gradient with ``J v``
    (forward mode) and ``J' u`` (backprop) products; "auto" goes matrix-free when J
    would take more than ``max_dense_bytes``.
    """

    name = "levenberg_marquardt"
    losses = ("mse",)

    def __init__(self, mu=1e-3, mu_increase=10.0, mu_decrease=0.1, mu_max=1e10,
                 matrix_free="auto", max_dense_bytes=2 ** 30, cg_tol=1e-12, gtol=1e-6,
                 ftol=1e-12):
        super().__init__(gtol, ftol)
        self.mu = check_float(mu, "mu", low=0.0, low_open=True)
        self.mu_increase = check_float(mu_increase, "mu_increase", low=1.0, low_open=True)
        self.mu_decrease = check_float(mu_decrease, "mu_decrease", low=0.0, high=1.0,
                                       low_open=True, high_open=True)
        self.mu_max = check_float(mu_max, "mu_max", low=self.mu)
        if matrix_free not in ("auto", True, False):
            raise ValueError(f"matrix_free must be 'auto', True or False, got {matrix_free!r}")
        self.matrix_free = matrix_free
        self.max_dense_bytes = check_int(max_dense_bytes, "max_dense_bytes", low=1)
        self.cg_tol = check_float(cg_tol, "cg_tol", low=0.0, low_open=True)

    def _start(self, objective, x):
        self._mu = self.mu
        n_rows = objective.n_samples * objective.model.n_outputs
        dense_bytes = 8 * (n_rows * objective.n_params + objective.n_params ** 2)
        self.uses_matrix_free = (self.matrix_free is True or
                                 (self.matrix_free == "auto" and
                                  dense_bytes > self.max_dense_bytes))
        self._curvature = _l2_curvature(objective.model)

    def _iterate(self, objective, x, f, g):
        if self.uses_matrix_free:
            solve = self._matrix_free_solver(objective, x)
        else:
            A = objective.gauss_newton(x)
            A[np.diag_indices_from(A)] += self._curvature
            solve = lambda mu: _damped_cholesky_solve(A, g, mu)  # noqa: E731
        while True:
            delta = solve(self._mu)
            x_new = x + delta
            f_new = objective.loss(x_new)
            if math.isfinite(f_new) and f_new < f:
                self._mu = max(self._mu * self.mu_decrease, 1e-20)
                return x_new, f_new, None
            self._mu *= self.mu_increase
            if self._mu > self.mu_max:
                return x, f, (f"stopped: mu {self._mu:.3g} exceeded mu_max {self.mu_max:.3g} "
                              "(no damped step lowers the loss)")
            if self.uses_matrix_free:
                solve = self._matrix_free_solver(objective, x)

    def _matrix_free_solver(self, objective, x):
        _, g = objective.loss_and_grad(x)
        objective._set(x)
        objective.model._forward(objective.X, False)
        curvature = self._curvature

        def solve(mu):
            def matvec(v):
                return objective.gauss_newton_product(v) + (curvature + mu) * v
            return -_conjugate_gradient(matvec, g, self.cg_tol)
        return solve

    def _params(self):
        return {"mu": self.mu, "mu_increase": self.mu_increase, "mu_decrease": self.mu_decrease,
                "mu_max": self.mu_max, "matrix_free": self.matrix_free,
                "max_dense_bytes": self.max_dense_bytes, "cg_tol": self.cg_tol,
                **super()._params()}


def _damped_cholesky_solve(A, g, mu):
    """delta solving (A + mu I) delta = -g by Cholesky."""
    from scipy.linalg import cho_factor, cho_solve

    M = A.copy()
    M[np.diag_indices_from(M)] += mu
    return -cho_solve(cho_factor(M, lower=True, check_finite=False), g, check_finite=False)


def _conjugate_gradient(matvec, b, rtol, max_iter=None):
    """Solve M x = b for symmetric positive definite M given only x -> M x."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = (rtol ** 2) * rr
    for _ in range(max_iter or 10 * b.size):
        if rr <= stop:
            break
        Mp = matvec(p)
        alpha = rr / float(p @ Mp)
        x += alpha * p
        r -= alpha * Mp
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


class Newton(_OwnLoop):
    """Newton's method with the full Hessian (small models only).

    H comes from central differences of the analytic gradient (2 gradient evaluations
    per parameter), symmetrized. The step solves ``|H| d = -g`` with H's eigenvalues
    replaced by ``max(|lambda|, damping)`` — a descent direction even where the loss
    is not convex — followed by an Armijo backtracking line search.
    """

    name = "newton"

    def __init__(self, damping=1e-6, max_params=NEWTON_MAX_PARAMS, gtol=1e-6, ftol=1e-12):
        super().__init__(gtol, ftol)
        self.damping = check_float(damping, "damping", low=0.0, low_open=True)
        self.max_params = check_int(max_params, "max_params", low=1)

    def check_model(self, model, loss):
        super().check_model(model, loss)
        if model.params is not None and model.n_params > self.max_params:
            raise ValueError(f"Newton forms the full {model.n_params}x{model.n_params} Hessian; "
                             f"the model has {model.n_params} parameters, above max_params="
                             f"{self.max_params}. Use NewtonCG or LBFGS for larger models")

    def _iterate(self, objective, x, f, g):
        n = x.size
        H = np.empty((n, n))
        eye = np.eye(n)
        for i in range(n):
            H[:, i] = objective.hessp(x, eye[i])
        H = (H + H.T) / 2
        from scipy.linalg import eigh

        eigval, eigvec = eigh(H)
        d = -eigvec @ ((eigvec.T @ g) / np.maximum(np.abs(eigval), self.damping))
        found = _backtracking(objective, x, f, g, d)
        if found is None:
            return x, f, "stopped: line search found no decrease"
        return found[0], found[1], None

    def _params(self):
        return {"damping": self.damping, "max_params": self.max_params, **super()._params()}


class _Scipy(Solver):
    """Solvers delegated to scipy.optimize.minimize on the flat float64 vector."""

    method = None

    def minimize(self, objective, x0, max_iter, on_iteration):
        """Run scipy.optimize.minimize from ``x0`` for at most ``max_iter`` iterations;
        returns the reason it stopped (None when ``on_iteration`` asked to stop)."""
        if max_iter == 0:  # scipy would still take a step
            return "reached the maximum of 0 iterations"
        stopped = []

        def callback(intermediate_result):
            self.iterations += 1
            if on_iteration(intermediate_result.x, float(intermediate_result.fun)):
                stopped.append(True)
                raise StopIteration

        from scipy.optimize import minimize

        kwargs = {"jac": True}
        if self.method == "Newton-CG":
            kwargs["hessp"] = objective.hessp
        result = minimize(objective.loss_and_grad, np.array(x0, np.float64),
                          method=self.method, callback=callback,
                          options=self._options(max_iter), **kwargs)
        objective._set(result.x)
        if stopped:
            return None
        if result.nit >= max_iter and not result.success:
            return f"reached the maximum of {max_iter} iterations"
        prefix = "converged" if result.success else "stopped"
        return f"{prefix}: {result.message}"


class LBFGS(_Scipy):
    """Limited-memory BFGS (scipy's L-BFGS-B) keeping ``history`` correction pairs."""

    name = "lbfgs"
    method = "L-BFGS-B"

    def __init__(self, history=10, tol=1e-6, max_ls=20, ftol=1e-12):
        super().__init__(tol, ftol)
        self.history = check_int(history, "history", low=1)
        self.max_ls = check_int(max_ls, "max_ls", low=1)

    def _options(self, max_iter):
        return {"maxiter": max_iter, "maxcor": self.history, "gtol": self.gtol,
                "ftol": self.ftol, "maxls": self.max_ls, "maxfun": 100 * max_iter + 100}

    def _params(self):
        return {"history": self.history, "tol": self.gtol, "max_ls": self.max_ls,
                "ftol": self.ftol}


class BFGS(_Scipy):
    """BFGS with a dense inverse-Hessian approximation (scipy), for small models."""

    name = "bfgs"
    method = "BFGS"

    def __init__(self, gtol=1e-6):
        super().__init__(gtol, 0.0)

    def _options(self, max_iter):
        return {"maxiter": max_iter, "gtol": self.gtol}

    def _params(self):
        return {"gtol": self.gtol}


class NewtonCG(_Scipy):
    """Truncated Newton (scipy's Newton-CG) with Hessian-vector products from central
    differences of the analytic gradient."""

    name = "newton_cg"
    method = "Newton-CG"

    def __init__(self, xtol=1e-8):
        super().__init__(0.0, 0.0)
        self.xtol = check_float(xtol, "xtol", low=0.0, low_open=True)

    def _options(self, max_iter):
        return {"maxiter": max_iter, "xtol": self.xtol}

    def _params(self):
        return {"xtol": self.xtol}


#: Names accepted by ``compile(optimizer=...)``, with default settings.
SOLVERS = {cls.name: cls for cls in (GradientDescent, LBFGS, BFGS, ConjugateGradient,
                                     LevenbergMarquardt, Newton, NewtonCG)}


def from_config(config):
    """Rebuild a solver from ``get_config()``."""
    cls, kwargs = config_class(config, SOLVERS, "solver")
    return cls(**kwargs)
