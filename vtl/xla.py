"""Compiler options that make the CPU backend faster for VGG's shapes.

XLA's CPU backend hands convolutions and dots to YNNPACK by default. On the x86 CPUs
measured in docs/benchmarks.md, its own (Eigen) kernels are faster for VGG's 3x3 float32
convolutions and for the head's dots, whose batch side is only 32 rows. The options are
passed per compiled function, and only where this jaxlib accepts them: another release
may not know the field, and other backends ignore CPU options anyway.
"""

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

FUSION_FIELD = "xla_cpu_experimental_ynn_fusion_type"
# Which operations YNNPACK still takes; the rest go to XLA's own kernels.
KEEP = {
    "trunk": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "tail": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


@functools.cache
def accepted(field: str, value: str) -> bool:
    """Whether this jaxlib's CPU compiler takes `field=value`."""
    try:
        probe = jax.jit(jnp.negative, compiler_options={field: value})
        probe.lower(jnp.zeros(1)).compile()
    except Exception as error:  # noqa: BLE001 - any refusal means "not supported"
        log.debug("compiler option %s=%s not taken: %s", field, value, error)
        return False
    return True


def cpu_options(part: str) -> dict | None:
    """Compiler options for `part` ("trunk" or "tail"), or None off the CPU."""
    if jax.default_backend() != "cpu":
        return None
    value = KEEP[part]
    return {FUSION_FIELD: value} if accepted(FUSION_FIELD, value) else None
