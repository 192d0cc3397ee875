"""Which form of a custom-VJP operation to trace: its fast reverse-mode form, or a plain one for forward mode.

Operations such as ``deq_jax.nn.loop_friendly_conv`` carry a ``jax.custom_vjp`` so
that their VJP stays fast inside a solver's loop; a ``custom_vjp`` has no JVP, so
forward mode cannot go through them. ``deq_jax.fixed_point`` builds its tangent
computations (the JVPs of ``f``) inside ``tracing_tangents``, where such operations
trace their plain, fully differentiable form instead; its reverse-mode (VJP) programs are
traced outside it and keep the fast form.
"""
from __future__ import annotations

import contextlib
import contextvars

_TRACING_TANGENTS = contextvars.ContextVar("deq_jax_tracing_tangents", default=False)


@contextlib.contextmanager
def tracing_tangents():
    """Within this context, ``tangents_traced`` is True (the code traced here will be JVP'd)."""
    token = _TRACING_TANGENTS.set(True)
    try:
        yield
    finally:
        _TRACING_TANGENTS.reset(token)


def tangents_traced() -> bool:
    """Whether the code being traced now is to be differentiated in forward mode (see ``tracing_tangents``)."""
    return _TRACING_TANGENTS.get()
