"""The implementations ``fastnn bench`` times side by side, one epoch each.

fastnn itself (``Sequential.fit`` on a kernel backend), a plain-numpy MLP written the way
a careful numpy user would (``NumpyMLP``, the hand-written baseline), PyTorch eager on
the CPU, and only the epoch's matmuls through scipy's sgemm (the ceiling a training step
on this BLAS can reach). Each runner returns ``(reset, epoch)``: ``reset()`` restores
the initial weights and optimizer state, ``epoch(X, y)`` trains one epoch and returns
its loss. All start from ``initial_weights`` and visit the batches in the order
``numpy.random.default_rng(SEED).permutation(n)``, as ``fit`` does.
"""
import contextlib
import math

import numpy as np

OPTIMIZERS = ("sgd", "adam")
#: Learning rates: fastnn's (and torch's) SGD / Adam defaults.
LEARNING_RATES = {"sgd": 0.01, "adam": 1e-3}
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
SEED = 0
#: Batches of the untimed warm-up epoch (numba compilation, buffer allocation).
WARMUP_BATCHES = 3


def initial_weights(sizes, dtype=np.float32, seed=SEED):
    """[W1, b1, W2, b2, ...] of a ReLU MLP, drawn as fastnn's default ("auto") init:
    He uniform (limit sqrt(6/d)) for the hidden layers, Glorot uniform (limit
    sqrt(6/(d+k))) for the output layer; biases zero. Layer i uses rng(seed + i)."""
    weights = []
    last = len(sizes) - 2
    for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:])):
        limit = math.sqrt(6.0 / (d + k) if i == last else 6.0 / d)
        w = np.random.default_rng(seed + i).uniform(-limit, limit, size=(d, k))
        weights += [np.ascontiguousarray(w, dtype=dtype), np.zeros(k, dtype=dtype)]
    return weights


class NumpyMLP:
    """A ReLU MLP with softmax cross-entropy, trained in plain numpy, carefully.

    The baseline fastnn is measured against: parameters and gradients in one flat
    buffer each (views per layer), activations and deltas preallocated per batch size,
    ``np.matmul(out=)``, ReLU and its mask in place, the softmax-CE gradient fused in
    one buffer, SGD / Adam updated in place with one scratch buffer.

    Shape:
        weights: [W1 (d0, d1), b1 (d1,), W2 (d1, d2), ...]; X (n, d0); y int64 (n,).
    """

    def __init__(self, weights, optimizer="sgd", lr=None):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.dtype = weights[0].dtype
        self.optimizer = optimizer
        self.lr = LEARNING_RATES[optimizer] if lr is None else lr
        total = sum(w.size for w in weights)
        self.params = np.empty(total, dtype=self.dtype)
        self.grads = np.empty(total, dtype=self.dtype)
        self.W, self.b, self.dW, self.db = [], [], [], []
        offset = 0
        for i, w in enumerate(weights):
            view, grad = (buf[offset:offset + w.size].reshape(w.shape)
                          for buf in (self.params, self.grads))
            view[...] = w
            offset += w.size
            (self.W if i % 2 == 0 else self.b).append(view)
            (self.dW if i % 2 == 0 else self.db).append(grad)
        self.sizes = [self.W[0].shape[0]] + [w.shape[1] for w in self.W]
        self.scratch = np.empty(total, dtype=self.dtype)
        self.exp_avg = np.zeros(total, dtype=self.dtype)
        self.exp_avg_sq = np.zeros(total, dtype=self.dtype)
        self.t = 0
        self._buffers = {}

    def get_weights(self):
        return [p.copy() for pair in zip(self.W, self.b) for p in pair]

    def _batch_buffers(self, n):
        bufs = self._buffers.get(n)
        if bufs is None:
            widths = self.sizes[1:]
            bufs = self._buffers[n] = {
                "x": np.empty((n, self.sizes[0]), dtype=self.dtype),
                "y": np.empty(n, dtype=np.int64),
                "rows": np.arange(n),
                "act": [np.empty((n, k), dtype=self.dtype) for k in widths],
                "delta": [np.empty((n, k), dtype=self.dtype) for k in widths],
                "mask": [np.empty((n, k), dtype=bool) for k in widths[:-1]],
                "rowmax": np.empty(n, dtype=self.dtype),
                "rowsum": np.empty(n, dtype=self.dtype),
            }
        return bufs

    def _loss_and_grad(self, bufs):
        """Forward, fused softmax-CE loss and gradient, backward into ``self.grads``."""
        x, y, rows = bufs["x"], bufs["y"], bufs["rows"]
        act, delta, mask = bufs["act"], bufs["delta"], bufs["mask"]
        last = len(self.W) - 1
        a = x
        for i, (w, b) in enumerate(zip(self.W, self.b)):
            z = act[i]
            np.matmul(a, w, out=z)
            z += b
            if i < last:
                np.maximum(z, 0, out=z)
            a = z
        logits, dz = act[last], delta[last]
        rowmax, rowsum = bufs["rowmax"], bufs["rowsum"]
        np.max(logits, axis=1, out=rowmax)
        np.subtract(logits, rowmax[:, None], out=dz)
        loss = -float(np.mean(dz[rows, y], dtype=np.float64))
        np.exp(dz, out=dz)
        np.sum(dz, axis=1, out=rowsum)
        loss += float(np.mean(np.log(rowsum), dtype=np.float64))
        dz /= rowsum[:, None]
        dz[rows, y] -= 1
        dz *= self.dtype.type(1.0 / x.shape[0])
        for i in range(last, -1, -1):
            a_prev = x if i == 0 else act[i - 1]
            np.matmul(a_prev.T, delta[i], out=self.dW[i])
            np.sum(delta[i], axis=0, out=self.db[i])
            if i > 0:
                np.matmul(delta[i], self.W[i].T, out=delta[i - 1])
                np.greater(a_prev, 0, out=mask[i - 1])
                np.multiply(delta[i - 1], mask[i - 1], out=delta[i - 1])
        return loss

    def _update(self):
        """One in-place step over the flat buffers (torch.optim.SGD / Adam rules)."""
        p, g, tmp = self.params, self.grads, self.scratch
        dt = self.dtype.type
        if self.optimizer == "sgd":
            np.multiply(g, dt(self.lr), out=tmp)
            p -= tmp
            return
        self.t += 1
        beta1, beta2 = ADAM_BETAS
        m, v = self.exp_avg, self.exp_avg_sq
        m *= dt(beta1)
        np.multiply(g, dt(1 - beta1), out=tmp)
        m += tmp
        v *= dt(beta2)
        np.multiply(g, g, out=tmp)
        tmp *= dt(1 - beta2)
        v += tmp
        np.sqrt(v, out=tmp)
        tmp *= dt(1 / math.sqrt(1 - beta2 ** self.t))
        tmp += dt(ADAM_EPS)
        np.divide(m, tmp, out=tmp)
        tmp *= dt(self.lr / (1 - beta1 ** self.t))
        p -= tmp

    def fit_epoch(self, X, y, batch_size, seed=SEED):
        """One epoch over ``X`` in the order ``default_rng(seed).permutation(n)`` (as
        ``Sequential.fit(seed=seed)``); returns the sample-weighted mean batch loss."""
        n = X.shape[0]
        order = np.random.default_rng(seed).permutation(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            bufs = self._batch_buffers(idx.size)
            np.take(X, idx, axis=0, out=bufs["x"])
            np.take(y, idx, out=bufs["y"])
            loss = self._loss_and_grad(bufs)
            self._update()
            total += loss * idx.size
        return total / n


def impl_label(impl, backend=None):
    """The name of an implementation in tables: "fastnn[cython]", "numpy MLP" (the
    hand-written baseline, not fastnn's numpy backend), "torch", "matmuls"."""
    if impl in ("fastnn", "fastnn-bf16"):
        return f"fastnn[{backend}]" + (" bf16" if impl == "fastnn-bf16" else "")
    if impl == "torch-bf16":
        return "torch autocast-bf16"
    return "numpy MLP" if impl == "numpy" else impl


def _fastnn_runner(cfg, weights, threads):
    import fastnn as fn

    fn.set_backend(cfg["backend"])
    fn.set_num_threads(threads)
    sizes = cfg["sizes"]
    last = len(sizes) - 2
    model = fn.Sequential([fn.Dense(d, k, activation=None if i == last else "relu",
                                    dtype=weights[0].dtype)
                           for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:]))])

    def reset():
        model.set_weights(weights)
        lr = LEARNING_RATES[cfg["optimizer"]]
        optimizer = (fn.optimizers.SGD(lr=lr) if cfg["optimizer"] == "sgd" else
                     fn.optimizers.Adam(lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS))
        model.compile(loss="cross_entropy", optimizer=optimizer,
                      precision="bf16" if cfg["impl"] == "fastnn-bf16" else "fp32")

    def epoch(X, y):
        history = model.fit(X, y, epochs=1, batch_size=cfg["batch"], shuffle=True,
                            verbose=0, seed=SEED)
        return history.history["loss"][0]

    return reset, epoch


def _numpy_runner(cfg, weights, threads):
    import fastnn as fn

    fn.set_num_threads(threads)  # the same BLAS limit fastnn runs under
    state = {}

    def reset():
        state["mlp"] = NumpyMLP(weights, cfg["optimizer"])

    def epoch(X, y):
        return state["mlp"].fit_epoch(X, y, cfg["batch"], seed=SEED)

    return reset, epoch


def _torch_runner(cfg, weights, threads):
    import torch

    import fastnn as fn

    torch.set_num_threads(threads)
    fn.set_num_threads(threads)
    dtype = torch.float64 if weights[0].dtype == np.float64 else torch.float32
    state = {}
    # torch-bf16: the forward and loss under CPU autocast (Linear in bf16, fp32 master
    # weights, optimizer and loss), the usual mixed-precision recipe.
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg["impl"] == "torch-bf16"
                else contextlib.nullcontext())

    def reset():
        layers = []
        for i in range(0, len(weights), 2):
            w, b = weights[i], weights[i + 1]
            linear = torch.nn.Linear(w.shape[0], w.shape[1], dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
                linear.bias.copy_(torch.from_numpy(b))
            layers += [linear, torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1])
        lr = LEARNING_RATES[cfg["optimizer"]]
        state["optimizer"] = (torch.optim.SGD(model.parameters(), lr=lr)
                              if cfg["optimizer"] == "sgd" else
                              torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS,
                                               eps=ADAM_EPS))
        state["model"] = model

    def epoch(X, y):
        model, optimizer = state["model"], state["optimizer"]
        criterion = torch.nn.CrossEntropyLoss()
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        n, batch = X.shape[0], cfg["batch"]
        order = torch.from_numpy(np.random.default_rng(SEED).permutation(n))
        total = 0.0
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = Xt.index_select(0, idx), yt.index_select(0, idx)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.numel()
        return total / n

    return reset, epoch


def _matmuls_runner(cfg, weights, threads):
    """Only the epoch's matmuls, at the net's shapes, through scipy's sgemm (the BLAS the
    compiled backends call) on preallocated buffers: the ceiling a training step built on
    this BLAS can reach at these shapes. Row-major calls made the way fastnn makes them:
    per layer z = a W (forward), dW = a^T dz, and dx = dz W^T for all but the first."""
    import fastnn as fn
    from scipy.linalg import blas

    fn.set_num_threads(threads)
    gemm = blas.dgemm if weights[0].dtype == np.float64 else blas.sgemm
    sizes, batch, n = cfg["sizes"], cfg["batch"], cfg["samples"]
    rng = np.random.default_rng(SEED)

    def buffers(rows):
        acts = [rng.standard_normal((rows, d)).astype(weights[0].dtype) for d in sizes]
        return acts, [np.empty_like(a) for a in acts]

    Ws = [w for w in weights[0::2]]
    dWs = [np.empty_like(w) for w in Ws]
    by_rows = {rows: buffers(rows) for rows in {batch, n % batch} if rows}

    def step(rows):
        # A row-major (r, c) array is its (c, r) transpose in column-major order, so
        # row-major C = A B is column-major C^T = B^T A^T: operands swap.
        acts, grads = by_rows[rows]
        for i, W in enumerate(Ws):
            gemm(1.0, W.T, acts[i].T, c=acts[i + 1].T, overwrite_c=1)  # z = a W
        for i in reversed(range(len(Ws))):
            gemm(1.0, grads[i + 1].T, acts[i].T, trans_b=1, c=dWs[i].T,
                 overwrite_c=1)                                      # dW = a^T dz
            if i:
                gemm(1.0, Ws[i].T, grads[i + 1].T, trans_a=1, c=grads[i].T,
                     overwrite_c=1)                                  # dx = dz W^T

    def reset():
        pass

    def epoch(X, y):
        for _ in range(len(X) // batch):
            step(batch)
        if len(X) % batch:
            step(len(X) % batch)
        return float("nan")

    return reset, epoch


#: impl name -> runner(cfg, weights, threads) -> (reset, epoch)
RUNNERS = {"fastnn": _fastnn_runner, "numpy": _numpy_runner, "torch": _torch_runner,
           "matmuls": _matmuls_runner, "fastnn-bf16": _fastnn_runner,
           "torch-bf16": _torch_runner}
