"""Weight normalisation that leaves the wrapped layer's parameters alone."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _is_kernel(path, _):
    return path == ("kernel",)


def check_kernel_layer(owner: str, layer: nnx.Module) -> None:
    """Raises ``TypeError`` unless ``layer`` has a ``kernel`` ``nnx.Param``."""
    kernel = getattr(layer, "kernel", None)
    if not isinstance(kernel, nnx.Param):
        raise TypeError(f"{owner}: expected a layer with a `kernel` nnx.Param, got {type(layer).__name__} "
                        f"whose `kernel` is {type(kernel).__name__}.")


def call_with_kernel(layer: nnx.Module, kernel: jax.Array, *args, **kwargs):
    """Calls ``layer`` (its own ``__call__``) as if its kernel were ``kernel``, leaving the layer unchanged."""
    graphdef, old, rest = nnx.split(layer, _is_kernel, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda _: kernel, old), rest)(*args, **kwargs)


class WeightNorm(nnx.Module):
    """A layer whose ``kernel`` is ``w = g * v / ||v||``, per output feature.

    ``v`` is the wrapped layer's own ``kernel`` Param, ``g`` the Param ``scale``, one per
    output feature (the kernel's last axis: ``nnx.Conv``'s HWIO, ``nnx.Linear``'s
    ``(in, out)``), and ``||v||`` the norm over every other axis -- PyTorch's
    ``weight_norm(dim=0)`` on an OIHW weight, as torchdeq's ``apply_weight_norm``
    normalises DEQ cells. ``g`` starts at ``||v||``, so the layer's function is
    unchanged at initialisation. There is no epsilon (as in PyTorch): a zero output
    channel of ``v`` gives NaN.

    Every call computes ``w`` and calls a copy of the layer holding ``w`` (the layer's
    own ``__call__``, so e.g. ``nnx.Conv``'s ``conv_general_dilated`` is used); ``v``
    is never overwritten. ``nnx.WeightNorm`` (flax 0.12.8) does not fit a trainable
    DEQ cell: its ``__call__`` writes ``w`` into the layer's kernel (``set_value``), so
    after one eager call, or one ``nnx.jit(nnx.grad(...))`` step on the model, the
    kernel held ``w`` (per-channel norms 1.0 instead of ~0.06 for a N(0, 0.01) 3x3x4
    kernel); its scales are plain arrays in a dict, not ``nnx.Param``, so
    ``nnx.grad`` gave no gradient for them and ``nnx.state(model, nnx.Param)`` (what
    checkpoints and optimisers take) left them out; and they start at ones, which
    changes the layer's function. (Its path-keyed scales dict did not break orbax:
    ``StandardSave``/``StandardRestore`` of its whole state round-tripped.)

    Args:
      layer: an NNX layer with a ``kernel`` Param whose last axis is the output features.

    Attributes:
      layer: the wrapped layer; ``layer.kernel`` is the direction ``v``.
      scale: ``nnx.Param`` ``g``, shape ``[out_features]``, in the kernel's dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> dense = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
      >>> normed = WeightNorm(dense)
      >>> bool(jnp.allclose(normed(jnp.ones((1, 3))), dense(jnp.ones((1, 3)))))
      True
      >>> bool(jnp.allclose(jnp.linalg.norm(normed.kernel(), axis=0), normed.scale[...]))
      True
    """

    def __init__(self, layer: nnx.Module):
        check_kernel_layer("WeightNorm", layer)
        self.layer = layer
        kernel = layer.kernel[...]
        self.scale = nnx.Param(self._norm(kernel).astype(kernel.dtype))

    @staticmethod
    def _norm(v: jax.Array) -> jax.Array:
        """Per-output-feature norm of ``v`` in at least float32."""
        v = v.astype(jnp.promote_types(v.dtype, jnp.float32))
        return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(v.ndim - 1))))

    def kernel(self) -> jax.Array:
        """The normalised kernel ``w = g * v / ||v||``, in ``v``'s shape and dtype (computed in at least float32)."""
        v = self.layer.kernel[...]
        norm = self._norm(v)
        return (v.astype(norm.dtype) * (self.scale[...].astype(norm.dtype) / norm)).astype(v.dtype)

    def __call__(self, *args, **kwargs):
        """Calls the wrapped layer with its kernel replaced by ``kernel``."""
        return call_with_kernel(self.layer, self.kernel(), *args, **kwargs)
