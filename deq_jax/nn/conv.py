"""Convolutions for DEQ cells: ``loop_friendly_conv`` and the per-backend default.

A DEQ's backward solve applies the input gradient of its cell's convolutions inside a
``lax.while_loop``, where the compiler's choice of kernel layout decides the speed;
which form of the convolution is fastest there depends on the backend, so the choice
is a table, ``CONV_BY_BACKEND``, read by ``default_conv``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .._backend import backend_choices
from .._tracing import tangents_traced


def _plain_conv(lhs, rhs, padding, dimension_numbers, precision):
    return lax.conv_general_dilated(
        lhs, rhs, (1,) * len(padding), padding, dimension_numbers=dimension_numbers, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(lhs, rhs, padding, dimension_numbers, precision):
    return _plain_conv(lhs, rhs, padding, dimension_numbers, precision)


def _conv_fwd(lhs, rhs, padding, dimension_numbers, precision):
    return _plain_conv(lhs, rhs, padding, dimension_numbers, precision), (lhs, rhs)


def _conv_bwd(padding, dimension_numbers, precision, residuals, cotangent):
    lhs, rhs = residuals
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    kernel_sizes = [rhs.shape[d] for d in rhs_spec[2:]]
    # The input gradient of a stride-1 convolution is the convolution of the cotangent
    # with the kernel flipped in space and with in/out features swapped, here in memory.
    flipped = jnp.swapaxes(jnp.flip(rhs, rhs_spec[2:]), rhs_spec[0], rhs_spec[1])
    transposed_padding = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_sizes, padding))
    lhs_bar = _plain_conv(
        cotangent, flipped, transposed_padding, lax.ConvDimensionNumbers(out_spec, rhs_spec, lhs_spec), precision
    )
    # The kernel gradient keeps JAX's rule: it is needed once per training step, outside
    # any loop, where it is the fastest form we found; inside the backward solve nothing
    # uses it and XLA drops it. (Inside a loop -- backprop through unrolled cells -- XLA:CPU
    # runs it far slower; nine per-tap matmuls would avoid that but are slower outside.)
    _, rhs_vjp = jax.vjp(lambda r: _plain_conv(lhs, r, padding, dimension_numbers, precision), rhs)
    return lhs_bar, rhs_vjp(cotangent)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def loop_friendly_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                       dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` (stride 1, explicit padding) whose input gradient stays fast in loops.

    Same values and gradients as ``lax.conv_general_dilated`` (bit for bit: the input
    gradient is the transposed convolution JAX itself builds), but that convolution
    uses a kernel flipped and transposed *in memory* instead of one relabelled ``01oi``.
    Inside a ``lax.while_loop`` -- where a DEQ's backward solve applies it at every
    step -- XLA:CPU (jax 0.10.2) does not rewrite the relabelled form to its fast
    convolution kernels: the input gradient of ``ResNetCell(48, 64)``'s conv2 at batch
    100 takes 1452 ms per application in a loop with ``lax.conv_general_dilated`` and
    44 ms with this function (``python -m experiments.benchmarks.ops``, 2 cores).

    The kernel gradient keeps JAX's rule, which is fast outside loops (once per training
    step) but slow on XLA:CPU inside one: backprop through many unrolled cells, where
    every step needs it, is slow on CPU either way.

    It is a ``jax.custom_vjp``: reverse mode and ``vmap`` work, forward mode does not,
    except where ``deq_jax.fixed_point`` traces its tangent computations (its implicit
    gradient's forward mode: there this function traces ``lax.conv_general_dilated``
    itself). Forward mode through anything else built on it (``jax.jvp`` of a bare cell,
    optimistix's ``ImplicitAdjoint``, ``deq_jax.Phantom``) needs a cell built with
    ``conv_general_dilated=jax.lax.conv_general_dilated``.

    Args:
      lhs, rhs, dimension_numbers, precision: as ``lax.conv_general_dilated``.
      window_strides, lhs_dilation, rhs_dilation: all 1 (or None for the dilations).
      padding: a sequence of ``(low, high)`` pairs.
      feature_group_count: 1.
      **kwargs: ``out_sharding`` and ``preferred_element_type`` (what ``nnx.Conv``
        passes) must be None.

    Returns:
      The convolution, as ``lax.conv_general_dilated`` returns it.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> conv = nnx.Conv(2, 3, (3, 3), padding=[(1, 1), (1, 1)], conv_general_dilated=loop_friendly_conv,
      ...                 rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((1, 4, 4, 2))).shape
      (1, 4, 4, 3)
    """
    ones = (1,) * (lhs.ndim - 2)
    unsupported = {k: v for k, v in kwargs.items() if v is not None}
    if (tuple(window_strides) != ones or tuple(lhs_dilation or ones) != ones or tuple(rhs_dilation or ones) != ones
            or feature_group_count != 1 or isinstance(padding, str) or unsupported):
        raise NotImplementedError(
            "loop_friendly_conv supports stride 1, no dilation, one feature group and explicit (low, high) padding "
            f"only; got strides {window_strides}, dilations {lhs_dilation}/{rhs_dilation}, groups "
            f"{feature_group_count}, padding {padding!r}, {unsupported}. Use jax.lax.conv_general_dilated."
        )
    dimension_numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if tangents_traced():
        return _plain_conv(lhs, rhs, padding, dimension_numbers, precision)
    return _conv(lhs, rhs, padding, dimension_numbers, precision)


CONVS = {"loop_friendly": loop_friendly_conv, "lax": lax.conv_general_dilated}


def default_conv(backend: str | None = None):
    """The convolution ``deq_jax.nn.ResNetCell`` uses when given none: ``conv`` of ``deq_jax.backend_choices``.

    Looked up when called (not when this module is imported), so the process's
    backend -- or a patched ``deq_jax.BACKEND_CHOICES`` -- decides.

    Args:
      backend: a platform name as ``jax.default_backend()`` gives it (``"cpu"``,
        ``"gpu"``, ``"tpu"``); None reads ``jax.default_backend()``.

    Returns:
      A function with ``lax.conv_general_dilated``'s signature; a backend not in the
      table gets ``lax.conv_general_dilated``, which supports every option.

    Examples:
      >>> default_conv("cpu") is loop_friendly_conv
      True
    """
    return CONVS[backend_choices(backend).conv]
