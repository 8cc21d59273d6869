"""Before each generation: T-GATE's hooks still in their modules' forward chains, and nothing
beside them that would reuse outputs at batch sizes T-GATE changes.

Others rewire a pipeline between calls: accelerate's offloading is re-applied after every call
(and puts back the forward it wrapped), diffusers removes a hook registered before ours, a user
adds diffusers' own cache to a denoiser. What can be repaired is repaired; what cannot compose
is refused with the reason.
"""

from __future__ import annotations

from .. import _compat
from ..hooks.registry import ensure_in_chain, foreign_caches


def refuse_foreign_caches(parts, error: type[Exception]) -> None:
    """Raise ``error`` when another library's cache hook sits on a denoiser of ``parts``."""
    found = [f"`{d.attribute}` {entry}" for d in parts.denoisers for entry in foreign_caches(d.module)]
    if found:
        raise error(
            f"T-GATE does not compose with other caches of attention or block outputs: {'; '.join(found[:3])}"
            f"{' ...' if len(found) > 3 else ''}. Both would reuse outputs across steps, at batch sizes T-GATE "
            f"changes. Remove that cache first (e.g. `pipe.transformer.disable_cache()`) or disable T-GATE."
        )


def keep_attached(parts, hooks, *, compiled: bool) -> None:
    """Put back any of ``hooks`` (``(module, hook)`` pairs) someone took out of its module's
    forward chain; refuse a cache of another library added since, and offloading under compile."""
    refuse_foreign_caches(parts, RuntimeError)
    if compiled:
        offloaded = [d.attribute for d in parts.denoisers if _compat.has_accelerate_hook(d.module)]
        if offloaded:
            raise RuntimeError(
                f"T-GATE's compile=... does not combine with accelerate's offloading of {offloaded} (its hooks move "
                f"weights inside the compiled region): enable T-GATE with compile=False, or do not offload."
            )
    for module, hook in hooks:
        ensure_in_chain(module, hook)
