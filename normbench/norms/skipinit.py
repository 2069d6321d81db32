"""SkipInit (De & Smith 2020): no normalization; residual models gate each residual branch with a
learnable scalar initialised to 0 (capability ``SKIPINIT``)."""

from __future__ import annotations

from normbench.norms.classic import NoNorm
from normbench.norms.registry import SKIPINIT, register_norm


@register_norm(
    "skipinit",
    description="No normalization plus SkipInit (De & Smith 2020): residual blocks multiply their "
    "residual branch by a learnable scalar initialised to 0. Models without residual branches "
    "refuse it.",
    family="none",
    capabilities={SKIPINIT},
)
class SkipInit(NoNorm):
    """The identity; the SKIPINIT capability is what makes residual models add the gates."""
