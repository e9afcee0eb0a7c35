"""Typed stub of the Cython kernels (kernels/_cython.pyx).

Same functions and positional arguments as ``kernels/_numpy.py``. Arrays are
C-contiguous float32 or float64 (one dtype per call; inputs may be read-only);
integer class labels are int64. Outputs are preallocated and written in place.
"""
from typing import Optional, Union

import numpy as np
import numpy.typing as npt

from . import TrainEpochSpec

_Float = Union[npt.NDArray[np.float32], npt.NDArray[np.float64]]
_Labels = npt.NDArray[np.int64]

def set_num_threads(n: int) -> None: ...

# GEMM routing: "auto" (own kernel where it beats BLAS for the shape), "avx512",
# "avx2" (that own kernel for every product) or "blas"
def set_gemm_path(path: str) -> None: ...
def gemm_path() -> str: ...
def gemm_paths_available() -> list[str]: ...
def gemm_choice(ta: str, tb: str, m: int, n: int, k: int, dtype: npt.DTypeLike) -> str: ...
def gemm(
    ta: str, tb: str, alpha: float, a: _Float, b: _Float, beta: float, c: _Float,
    repeat: int = 1,
) -> None: ...

# Activations (act: a code from fastnn.kernels.ACTIVATIONS)
def activation_forward(
    act: int, z: _Float, out: _Float, alpha: Optional[float] = None
) -> None: ...
def activation_backward(
    act: int, a: _Float, dout: _Float, out: _Float, alpha: Optional[float] = None
) -> None: ...
def softmax_forward(z: _Float, out: _Float) -> None: ...

# Dense layer: x (n, d), w (d, k), b (k,), out / a / dout / dz (n, k)
def dense_forward(
    x: _Float, w: _Float, b: _Float, act: int, out: _Float,
    alpha: Optional[float] = None,
) -> None: ...
def dense_backward(
    x: _Float, w: _Float, a: _Float, dout: _Float, act: int, dz: _Float,
    dx: Optional[_Float], dw: _Float, db: _Float, alpha: Optional[float] = None,
) -> None: ...
def dense_stack_forward(
    x: _Float, params: _Float, widths: npt.NDArray[np.int64], acts: npt.NDArray[np.int64],
    alphas: npt.NDArray[np.float64], use_bias: npt.NDArray[np.int64], workspace: _Float,
    out: _Float,
) -> None: ...

# Losses: return the (weighted) mean loss; the gradient output None means loss only
def softmax_cross_entropy(
    logits: _Float, labels: Union[_Labels, _Float], weights: Optional[_Float],
    dlogits: Optional[_Float],
) -> float: ...
def sigmoid_binary_cross_entropy(
    pred: _Float, target: _Float, weights: Optional[_Float], dpred: Optional[_Float]
) -> float: ...
def mean_squared_error(
    pred: _Float, target: _Float, weights: Optional[_Float], dpred: Optional[_Float]
) -> float: ...
def mean_absolute_error(
    pred: _Float, target: _Float, weights: Optional[_Float], dpred: Optional[_Float]
) -> float: ...
def huber(
    pred: _Float, target: _Float, delta: float, weights: Optional[_Float],
    dpred: Optional[_Float],
) -> float: ...
def multiclass_hinge(
    scores: _Float, labels: _Labels, margin: float, weights: Optional[_Float],
    dscores: Optional[_Float],
) -> float: ...

# Optimizer steps over flat 1-D buffers, in place; unused state buffers may be None
def sgd_update(
    params: _Float, grads: _Float, momentum_buf: Optional[_Float], lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, step: int,
) -> None: ...
def adagrad_update(
    params: _Float, grads: _Float, state_sum: _Float, lr: float, lr_decay: float,
    weight_decay: float, eps: float, step: int,
) -> None: ...
def rmsprop_update(
    params: _Float, grads: _Float, square_avg: _Float,
    momentum_buf: Optional[_Float], grad_avg: Optional[_Float], lr: float,
    alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool,
) -> None: ...
def adam_update(
    params: _Float, grads: _Float, exp_avg: _Float, exp_avg_sq: _Float,
    max_exp_avg_sq: Optional[_Float], lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, step: int,
) -> None: ...

# Per-sample dense gradients as Jacobian rows: x (n, d), dz (n, k), jac (n, P)
def dense_per_sample_grad(
    x: _Float, dz: _Float, jac: _Float, offset: int, use_bias: bool
) -> None: ...

# A whole training epoch of dense layers in one call (fields and codes documented in
# fastnn.kernels.TrainEpochSpec)
def train_epoch(spec: TrainEpochSpec) -> None: ...

# bfloat16 products with float32 accumulation (AVX512_BF16; float32 arrays only)
_F32 = npt.NDArray[np.float32]

def bf16_available() -> bool: ...
def bf16_round(x: _F32, out: _F32) -> None: ...
def dense_forward_bf16(
    x: _F32, w: _F32, b: _F32, act: int, out: _F32, alpha: Optional[float] = None,
) -> None: ...
def dense_backward_bf16(
    x: _F32, w: _F32, a: _F32, dout: _F32, act: int, dz: _F32, dx: Optional[_F32],
    dw: _F32, db: _F32, alpha: Optional[float] = None,
) -> None: ...
def dense_stack_forward_bf16(
    x: _F32, params: _F32, widths: npt.NDArray[np.int64], acts: npt.NDArray[np.int64],
    alphas: npt.NDArray[np.float64], use_bias: npt.NDArray[np.int64], workspace: _F32,
    out: _F32,
) -> None: ...
def bf16_peak_flops(repeats: int = 20000) -> float: ...
def bf16_gemm_flops(
    m: int, n: int, k: int, pair_a: bool = False, repeats: int = 10
) -> float: ...
def cpu_round_trip_seconds(cpu_a: int, cpu_b: int, rounds: int = 20000) -> Optional[float]: ...
