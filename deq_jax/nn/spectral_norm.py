"""Spectral normalisation, and the one switch between the kernel normalisations a cell offers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import check_int
from .weight_norm import WeightNorm, call_with_kernel, check_kernel_layer

NORMS = ("none", "weight", "spectral")
PYTORCH_EPS = 1e-12  # torch.nn.utils.spectral_norm's guard in its normalisations


class PowerIterationVector(nnx.BatchStat):
    """A spectral norm's running singular-vector estimate: layer statistics, not a parameter.

    A kind of ``nnx.BatchStat``, so that code that carries, averages or checkpoints a
    model's BatchNorm statistics (``nnx.split(model, nnx.Param, nnx.BatchStat, ...)``)
    carries these vectors too.
    """


def _normalize(v: jax.Array) -> jax.Array:
    return v / jnp.maximum(jnp.linalg.norm(v), PYTORCH_EPS)


class SpectralNorm(nnx.Module):
    """A layer whose ``kernel`` is divided by its largest singular value (Miyato et al. 2018).

    The kernel is read as a matrix ``W`` of shape ``[out, in * k * k]`` (the output
    features, the kernel's last axis, against all the others), as PyTorch's
    ``spectral_norm`` and torchdeq's reshape their OIHW weight. ``sigma``, its largest
    singular value, is estimated by power iteration on two vectors kept as layer state
    (``PowerIterationVector``, ``u`` of length ``out`` and ``v`` of length
    ``in * k * k``, drawn at random and normalised): in training mode each call runs
    ``num_power_iterations`` steps ``v <- W^T u / |.|, u <- W v / |.|``, stores ``u`` and
    ``v``, and divides by ``sigma = u^T W v``; in evaluation mode (``use_running_average``,
    set by ``nnx.Module.eval()``) it uses the stored vectors and changes nothing. As in
    PyTorch, the gradient flows through ``W`` in ``sigma`` but not through the power
    iteration (``u`` and ``v`` are constants of the step).

    Inside ``deq_jax.nn.DEQ`` the cell's state is frozen during a solve, so every
    solver iteration divides by the same ``sigma`` (f stays one function), and the
    vectors advance once per DEQ call -- one power-iteration step per training step,
    PyTorch's usual setting.

    Args:
      layer: an NNX layer with a ``kernel`` Param whose last axis is the output features.
      num_power_iterations: power-iteration steps per training-mode call, an int >= 1.
      use_running_average: evaluation mode (stored vectors, no update); ``nnx.Module.eval()``
        and ``train()`` set it.
      rngs: ``nnx.Rngs`` for the initial vectors (its ``params`` stream).

    Attributes:
      layer: the wrapped layer; ``layer.kernel`` is the unnormalised ``W``.
      u, v: ``PowerIterationVector``.

    Examples:
      >>> import numpy as np
      >>> from flax import nnx
      >>> normed = SpectralNorm(nnx.Linear(6, 4, use_bias=False, rngs=nnx.Rngs(0)), 20, rngs=nnx.Rngs(1))
      >>> float(np.linalg.svd(np.asarray(normed.kernel()), compute_uv=False)[0]).__round__(3)
      1.0
    """

    def __init__(self, layer: nnx.Module, num_power_iterations: int = 1, *, use_running_average: bool = False,
                 rngs: nnx.Rngs):
        check_kernel_layer("SpectralNorm", layer)
        check_int("SpectralNorm", num_power_iterations=num_power_iterations)
        self.layer = layer
        self.num_power_iterations = num_power_iterations
        self.use_running_average = use_running_average
        kernel = layer.kernel[...]
        out, rest = kernel.shape[-1], kernel.size // kernel.shape[-1]
        dtype = jnp.promote_types(kernel.dtype, jnp.float32)
        key_u, key_v = jax.random.split(rngs.params())
        self.u = PowerIterationVector(_normalize(jax.random.normal(key_u, (out,), dtype)))
        self.v = PowerIterationVector(_normalize(jax.random.normal(key_v, (rest,), dtype)))

    def matrix(self) -> jax.Array:
        """``W``: the kernel as ``[out, in * k * k]``, in at least float32."""
        kernel = self.layer.kernel[...]
        w = kernel.reshape(-1, kernel.shape[-1]).T
        return w.astype(jnp.promote_types(w.dtype, jnp.float32))

    def kernel(self) -> jax.Array:
        """``W / sigma`` in the kernel's shape and dtype; in training mode, after advancing ``u`` and ``v``."""
        w = self.matrix()
        u, v = self.u[...], self.v[...]
        if not self.use_running_average:
            frozen = jax.lax.stop_gradient(w)
            for _ in range(self.num_power_iterations):
                v = _normalize(frozen.T @ u)
                u = _normalize(frozen @ v)
            self.u[...], self.v[...] = u, v
        sigma = u @ w @ v
        kernel = self.layer.kernel[...]
        return (kernel.astype(sigma.dtype) / sigma).astype(kernel.dtype)

    def __call__(self, *args, **kwargs):
        """Calls the wrapped layer with its kernel replaced by ``kernel``."""
        return call_with_kernel(self.layer, self.kernel(), *args, **kwargs)

    def set_view(self, use_running_average: bool | None = None):
        """For ``nnx.view``: sets ``use_running_average`` when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


def apply_norm(layer: nnx.Module, norm: str, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """``layer`` as it is, weight-normalised or spectrally normalised: a cell's ``norm`` option.

    Args:
      layer: an NNX layer with a ``kernel`` Param.
      norm: one of ``NORMS``: ``"none"``, ``"weight"`` (``deq_jax.nn.WeightNorm``)
        or ``"spectral"`` (``SpectralNorm``, one power iteration per call).
      rngs: needed for ``"spectral"`` (its initial vectors).

    Returns:
      The layer or its wrapper.

    Examples:
      >>> from flax import nnx
      >>> type(apply_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), "weight")).__name__
      'WeightNorm'
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    if norm == "weight":
        return WeightNorm(layer)
    if norm == "spectral":
        if rngs is None:
            raise ValueError("norm='spectral' needs rngs for its power-iteration vectors.")
        return SpectralNorm(layer, rngs=rngs)
    return layer
