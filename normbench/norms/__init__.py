"""Normalization layers, their registry and the one factory that builds them.

One family a module:

- ``registry``: the registry, the name parser (``groupnorm(groups=8)``), capability flags,
  ``create_norm`` and the source hash of a norm;
- ``classic``: BatchNorm, GroupNorm, LayerNorm, InstanceNorm, none;
- ``activation``: the "norm zoo" of Lubana et al. (2021) that normalizes activations: FRN + TLU,
  EvoNorm-B0 and -S0 (these carry their own nonlinearity, capability ``ACT``), Variance Norm,
  RMSNorm;
- ``weight``: Weight Normalization, Scaled Weight Standardization, and Scaled WS followed by
  GroupNorm; they reparametrise a convolution's weight, so they own it;
- ``convnorm``: ConvNorm (Liu et al. 2021), Fourier-domain preconditioning of its own
  convolution, then a depthwise affine convolution and BatchNorm;
- ``skipinit``: no normalization; residual models gate each branch with a scalar initialised to 0.

A norm that owns its convolution (capability ``OWNS_CONV``) is the whole conv-norm block: its
classmethod ``block(in_channels, out_channels, kernel_size, stride)`` builds one for any shape,
and ``cls(num_channels)`` builds a 3x3, stride-1, ``num_channels -> num_channels`` block so it
still fits the NCHW -> NCHW contract. The zoo's layers compute their statistics in float32 and
cast back, so bfloat16 modules and inputs work on the CPU (``torch.fft`` has no bfloat16 kernels).
"""

from normbench.norms.activation import (
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    RMSNorm,
    VarianceNorm,
)
from normbench.norms.classic import (  # noqa: I001 - importing the families registers them
    BatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    NoNorm,
    group_count,
)
from normbench.norms.convnorm import ConvNorm
from normbench.norms.noisy import NoisyBatchNorm  # noqa: F401 - importing it registers it
from normbench.norms.registry import (
    ACT,
    AFFINE,
    BATCH_STATS,
    BLOCK_ARGUMENTS,
    NORMS,
    OWNS_CONV,
    SKIPINIT,
    WEIGHT,
    AffineMixin,
    NormFactory,
    NormRegistry,
    NormSpec,
    OwnsConvMixin,
    affine_parameters,
    create_norm,
    norm_class,
    norm_info,
    norm_options,
    norm_source_files,
    norm_source_sha256,
    parse_norm_name,
    register_norm,
)
from normbench.norms.skipinit import SkipInit
from normbench.norms.weight import (
    RELU_GAIN,
    ScaledStdConv,
    ScaledStdConvGroupNorm,
    WeightNormConv,
)

__all__ = [
    "ACT", "AFFINE", "BATCH_STATS", "BLOCK_ARGUMENTS", "NORMS", "OWNS_CONV", "RELU_GAIN",
    "SKIPINIT", "WEIGHT", "AffineMixin", "BatchNorm", "ConvNorm", "EvoNormB0", "EvoNormS0",
    "FilterResponseNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "NoNorm", "NormFactory",
    "NormRegistry", "NormSpec", "OwnsConvMixin", "RMSNorm", "ScaledStdConv",
    "ScaledStdConvGroupNorm", "SkipInit", "VarianceNorm", "WeightNormConv", "affine_parameters",
    "create_norm", "group_count", "norm_class", "norm_info", "norm_options", "norm_source_files",
    "norm_source_sha256", "parse_norm_name", "register_norm",
]  # fmt: skip
