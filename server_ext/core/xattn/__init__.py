"""Cross-instance attention, "move the query, not the cache": exact partial attention and its
merge (GQA and absorbed MLA), the route and fetch transports over ``torch.distributed``, and
the cost model whose predicate picks local, route or fetch (docs/cross_instance.md).

- :mod:`.partial`: ``AttnSpec``, ``partial_attention`` -> ``Partial(o, lse)``, ``shift_query``.
- :mod:`.merge`: ``merge_partials`` (torch reference and a Triton kernel).
- :mod:`.transport`: ``Holder`` / ``Requester`` (route and fetch), device-agnostic (gloo, NCCL).
- :mod:`.cost`: probe / transfer / compute / return / merge terms, calibration, the predicate.
- :mod:`.launch`: a bounded two-rank job on one host (tests, calibration).
"""

from leyline.server.core.xattn.merge import merge_partials, merge_ref, merge_states, merge_triton
from leyline.server.core.xattn.partial import (
    AttnSpec,
    Partial,
    empty_partial,
    partial_attention,
    shift_query,
)

__all__ = [
    "AttnSpec",
    "Partial",
    "empty_partial",
    "merge_partials",
    "merge_ref",
    "merge_states",
    "merge_triton",
    "partial_attention",
    "shift_query",
]
