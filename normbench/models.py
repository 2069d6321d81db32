"""Models built from a conv-norm block factory, and the model registry.

A model never creates a normalization layer itself: it asks a *block factory* for every
"convolution followed by normalization" pair. The default factory is a plain ``nn.Conv2d`` then the
registered norm; normalizers that transform the convolution's weights (Weight Standardization) or
replace the pair (ConvNorm) own their convolution and build the whole pair through their
``block()`` classmethod, so no model needs a special case for them. The one model-side change is
SkipInit: a factory for a norm with the ``skipinit`` capability says so, and residual blocks then
gate their residual branch with a learnable scalar initialised to 0.

Activations belong to the block too: a model passes the activation that follows each conv-norm
pair (``act=nn.ReLU``, ``act=nn.GELU``) or none. The rule for norms that carry their own
nonlinearity (capability ``act``: FRN's TLU, the EvoNorms), as in the papers' ResNets and timm's
``norm_act`` layers:

- a block built for such a norm applies the norm's nonlinearity *instead of* the model's, so no
  ReLU/GELU ever follows a TLU;
- the last norm of a residual branch (before the addition), which the model builds with no
  activation, is built with ``apply_act=False``; the activation after the addition is the model's.

Pre-activation nets (the Wide ResNets) normalize a block's *input*: the norm-activation pairs that
follow no convolution of theirs (before each block, before the classifier) are per-channel layers
from the factory's ``norm_layer`` (``norm_act``), and the convolution before a residual addition
has no norm, so every norm there is built with its activation (the norm's own where it has one).

Models state what they do with the factory as capabilities, and a norm that needs one the model
lacks is refused with a message before anything is built (``check_model_supports``): a norm that
owns its convolution needs a model that builds every convolution through the factory, SkipInit
needs residual branches to gate, and a norm with its own nonlinearity needs a model whose
activations go through the factory. Without the check such a norm would run as another norm (or as
``none``) and give a misleading row.

Models that can be probed (capability ``probes``) list their blocks with ``probe_blocks()``: the
modules whose outputs are the "block outputs" of the initialization probes, in forward order,
with their qualified names.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import NormbenchError
from normbench.norms import (
    ACT,
    NORMS,
    OWNS_CONV,
    SKIPINIT,
    NormSpec,
    create_norm,
    norm_class,
    norm_info,
)
from normbench.registry import Registry


class BlockFactory(Protocol):
    """Builds the module for ``conv(in_channels -> out_channels, kernel, stride)`` + its norm +
    ``act`` (the model's activation class after the pair, or ``None`` where none follows)."""

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        act: type[nn.Module] | None = None,
    ) -> nn.Module: ...


#: Model capability: every convolution is built by the block factory (norms may own their conv).
CONV_BLOCKS = "conv_blocks"
#: Model capability: residual branches are gated by SkipInit's learnable scalar.
RESIDUAL_GATE = "residual_gate"
#: Model capability: every activation after a norm is built by the block factory (a norm with its
#: own nonlinearity replaces it).
NORM_ACT = "norm_act"
#: Model capability: the model lists its blocks for the probes (``probe_blocks()``).
PROBES = "probes"


class ConvNormAct(nn.Sequential):
    """A convolution, a normalization layer and, where the model has one there, its activation
    (the default block; ``conv``, ``norm``, ``act``)."""


def conv_norm_factory(norm: NormSpec, **norm_kwargs: Any) -> BlockFactory:
    """The default block factory: ``nn.Conv2d`` (same padding) followed by ``create_norm(norm)``,
    or the norm's own ``block()`` when it owns its convolution, then the model's activation, or
    the norm's own (``apply_act``) for a norm with the ``act`` capability.

    A norm without any parameters cannot shift its output, so its convolution gets a bias; a norm
    with an affine shift makes a convolution bias redundant.

    The factory carries ``norm_layer`` (torchvision's per-channel ``norm_layer(num_channels)``
    argument), ``owns_conv``, ``skipinit``, ``own_act``, ``requires`` (the model capabilities the
    norm needs) and ``norm_name`` for the models that need them.
    """
    # A name is looked up once; with options it resolves to a partial of the class, whose
    # keywords go to ``block()``.
    if isinstance(norm, str):
        entry = NORMS.get(norm)
        info, factory = entry.info, entry.obj
    else:
        info, factory = norm_info(norm), norm
    cls = norm_class(factory)
    owns_conv = info.has(OWNS_CONV) if info is not None else hasattr(cls, "block")
    skipinit = info is not None and info.has(SKIPINIT)
    own_act = info.has(ACT) if info is not None else ACT in getattr(cls, "capabilities", ())
    # The model capabilities the norm needs to act as itself (see ``check_model_supports``).
    needs = ((CONV_BLOCKS, owns_conv), (RESIDUAL_GATE, skipinit), (NORM_ACT, own_act))
    requires = frozenset(capability for capability, needed in needs if needed)
    name = norm if isinstance(norm, str) else getattr(cls, "__name__", repr(norm))

    if owns_conv:
        partial = isinstance(factory, functools.partial)
        if partial and factory.args:
            raise TypeError(f"give the options of {name} as keywords, not positional arguments")
        options = dict(factory.keywords) if partial else {}
        options.update(norm_kwargs)

        def make(in_channels, out_channels, kernel_size=3, stride=1, act=None):
            own = {"apply_act": act is not None} if own_act else {}
            module = cls.block(in_channels, out_channels, kernel_size, stride, **options, **own)
            if act is None or own_act:
                return module
            return nn.Sequential(OrderedDict(block=module, act=act()))

        def norm_layer(num_channels: int, **kwargs: Any) -> nn.Module:
            hosts = [e.info.name for e in MODELS if e.info.has(CONV_BLOCKS)]
            raise NormbenchError(
                f"norm {name!r} owns its convolution, so it cannot follow a convolution that a "
                f"model builds itself; use a model built from the block factory "
                f"({', '.join(hosts) or 'none'})."
            )

    else:

        def make(in_channels, out_channels, kernel_size=3, stride=1, act=None):
            own = {"apply_act": act is not None} if own_act else {}
            norm_layer = create_norm(factory, out_channels, **norm_kwargs, **own)
            bias = next(norm_layer.parameters(), None) is None
            conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias
            )
            layers = OrderedDict(conv=conv, norm=norm_layer)
            if act is not None and not own_act:
                layers["act"] = act()
            return ConvNormAct(layers)

        norm_layer = functools.partial(create_norm, factory, **norm_kwargs)

    # Builders that take torchvision's ``norm_layer(num_channels)`` argument use this.
    make.norm_layer = norm_layer
    make.owns_conv = owns_conv
    make.skipinit = skipinit
    make.own_act = own_act
    make.requires = requires
    make.norm_name = name
    return make


ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")
register_model = MODELS.register


_NEEDS = {
    CONV_BLOCKS: "owns its convolution, but model {model!r} builds convolutions of its own and "
    "takes per-channel norm layers",
    RESIDUAL_GATE: "gates residual branches (SkipInit), but model {model!r} has no residual "
    "branches, so it would train as 'none'",
    NORM_ACT: "applies its own nonlinearity, but model {model!r} applies its own activation after "
    "every norm, so both would run",
}


def check_model_supports(model: str, block: BlockFactory) -> None:
    """Raise ``NormbenchError`` when ``model`` cannot host the norm of ``block`` as that norm."""
    info = MODELS.get(model).info
    missing = sorted(c for c in getattr(block, "requires", ()) if not info.has(c))
    if not missing:
        return
    hosts = [e.info.name for e in MODELS if all(e.info.has(c) for c in missing)]
    reasons = "; ".join(_NEEDS[c].format(model=model) for c in missing)
    raise NormbenchError(
        f"norm {getattr(block, 'norm_name', '?')!r} cannot be used with model {model!r}: it "
        f"{reasons}. Models that can host it: {', '.join(hosts) or 'none'}."
    )


def create_model(name: str, *, block: BlockFactory, num_classes: int, **kwargs: Any) -> nn.Module:
    check_model_supports(name, block)
    return MODELS.get(name).obj(block=block, num_classes=num_classes, **kwargs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- CIFAR ResNets (He et al. 2016, section 4.2) -------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with an option-A (parameter-free) shortcut: conv-norm-ReLU,
    conv-norm (no activation before the addition), add, ReLU.

    With a SkipInit factory the residual branch is multiplied by ``skip_gain``, a learnable scalar
    initialised to 0 (De & Smith 2020), so every block starts as its shortcut.
    """

    def __init__(
        self,
        block: BlockFactory,
        in_channels: int,
        out_channels: int,
        stride: int,
        skip_init: bool = False,
    ):
        super().__init__()
        self.conv1 = block(in_channels, out_channels, 3, stride, act=nn.ReLU)
        self.conv2 = block(out_channels, out_channels, 3, 1)  # the branch's last norm: no act
        self.act = nn.ReLU()
        self.stride, self.extra_channels = stride, out_channels - in_channels
        # 0-dim, so the weight-decay rule (tensors with fewer than 2 dims) never decays it. A
        # SkipInit norm asks for the gate; ``skip_init`` adds the same gate for any other norm.
        gated = skip_init or getattr(block, "skipinit", False)
        self.skip_gain = nn.Parameter(torch.zeros(())) if gated else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A: subsample spatially and zero-pad the new channels, so shortcuts add no
        # parameters and no normalization layer of their own.
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.skip_gain is not None:
            out = self.skip_gain * out
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n blocks with ``width`` (16 in the paper),
    2 ``width`` and 4 ``width`` channels; ``skip_init`` gates every residual branch with a SkipInit
    scalar (initialised to 0) whatever the norm."""

    def __init__(
        self,
        depth: int,
        *,
        block: BlockFactory,
        num_classes: int,
        width: int = 16,
        skip_init: bool = False,
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if not _is_int(width) or width < 1:
            raise NormbenchError(
                f"CIFAR ResNet width must be a positive integer (16 in the paper); got {width!r}"
            )
        if not isinstance(skip_init, bool):
            raise NormbenchError(f"CIFAR ResNet skip_init must be true or false; got {skip_init!r}")
        n = (depth - 2) // 6
        widths = [width, 2 * width, 4 * width]
        self.stem = block(3, widths[0], 3, 1, act=nn.ReLU)
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for stage, out_channels in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(block, in_channels, out_channels, stride, skip_init))
                in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def probe_blocks(self) -> list[tuple[str, nn.Module]]:
        """The stem, then every residual block (its output: after the addition and the ReLU)."""
        return [("stem", self.stem), *_named_children(self.layers, "layers")]


def _named_children(parent: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """``parent``'s children with their qualified names (``prefix.i``), in order."""
    return [(f"{prefix}.{name}", child) for name, child in parent.named_children()]


_RESNET_ARGS = (
    "model_args width (the first stage's channels, default 16), skip_init (a SkipInit gate on "
    "every residual branch whatever the norm, default false)"
)


@register_model(
    "resnet20",
    description="CIFAR ResNet-20 (He et al. 2016), option-A shortcuts, 0.27M parameters; "
    f"{_RESNET_ARGS}.",
    family="resnet",
    capabilities={CONV_BLOCKS, RESIDUAL_GATE, NORM_ACT, PROBES},
)
def resnet20(
    *, block: BlockFactory, num_classes: int = 10, width: int = 16, skip_init: bool = False
) -> nn.Module:
    return CifarResNet(20, block=block, num_classes=num_classes, width=width, skip_init=skip_init)


@register_model(
    "resnet56",
    description="CIFAR ResNet-56 (He et al. 2016), option-A shortcuts, 0.85M parameters; "
    f"{_RESNET_ARGS}.",
    family="resnet",
    capabilities={CONV_BLOCKS, RESIDUAL_GATE, NORM_ACT, PROBES},
)
def resnet56(
    *, block: BlockFactory, num_classes: int = 10, width: int = 16, skip_init: bool = False
) -> nn.Module:
    return CifarResNet(56, block=block, num_classes=num_classes, width=width, skip_init=skip_init)


# --- Wide ResNets (Zagoruyko & Komodakis 2016) ---------------------------------------------------


class NormAct(nn.Sequential):
    """A per-channel norm layer and the activation after it (``norm``, ``act``); ``act`` is left
    out for a norm that applies its own nonlinearity."""


def norm_act(block: BlockFactory, num_channels: int, act: type[nn.Module] = nn.ReLU) -> NormAct:
    """The factory's norm on ``num_channels`` channels followed by ``act``, or by nothing when the
    norm has its own nonlinearity (then built with ``apply_act=True``)."""
    norm_layer = getattr(block, "norm_layer", None)
    if norm_layer is None:
        raise NormbenchError(
            "a pre-activation model needs a block factory with a per-channel norm_layer; "
            "conv_norm_factory provides one"
        )
    if getattr(block, "own_act", False):
        return NormAct(OrderedDict(norm=norm_layer(num_channels, apply_act=True)))
    return NormAct(OrderedDict(norm=norm_layer(num_channels), act=act()))


class WideBlock(nn.Module):
    """Pre-activation basic block: norm-ReLU on the input, then 3x3 conv-norm-ReLU (one factory
    block, strided), dropout, and a plain 3x3 conv (no norm: the next block's pre-activation
    normalizes the sum), added to the shortcut. The shortcut is the identity, or, where the shape
    changes, a 1x1 strided conv of the *pre-activated* input, as in the reference code.

    Convolutions built here have no bias, as in the reference code, whatever the norm. With a
    SkipInit factory the residual branch is multiplied by ``skip_gain`` (a learnable scalar
    initialised to 0), so every block starts as its shortcut.
    """

    def __init__(
        self,
        block: BlockFactory,
        in_channels: int,
        out_channels: int,
        stride: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.preact = norm_act(block, in_channels)
        self.conv1 = block(in_channels, out_channels, 3, stride, act=nn.ReLU)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if reshape else None
        )
        skipinit = getattr(block, "skipinit", False)
        self.skip_gain = nn.Parameter(torch.zeros(())) if skipinit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preact(x)
        out = self.conv2(self.dropout(self.conv1(pre)))
        if self.skip_gain is not None:
            out = self.skip_gain * out
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-d-k for 32x32 inputs: a 3x3 conv stem (3 -> 16, no norm after it), three groups of
    n = (d - 4) / 6 ``WideBlock``s with 16k, 32k and 64k channels (strides 1, 2, 2), a final
    norm-ReLU, global average pooling and a linear classifier.

    Convolutions are initialised Kaiming-normal (fan_out, ReLU) as in the reference code and the
    CIFAR ResNets here; the classifier keeps PyTorch's default initialisation.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        *,
        block: BlockFactory,
        num_classes: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not _is_int(depth) or depth < 10 or (depth - 4) % 6:
            raise NormbenchError(
                "Wide ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...); "
                f"got {depth!r}"
            )
        if not _is_int(widen_factor) or widen_factor < 1:
            raise NormbenchError(
                f"Wide ResNet widen_factor must be an integer >= 1; got {widen_factor!r}"
            )
        if not (_is_int(dropout) or isinstance(dropout, float)) or not 0 <= dropout < 1:
            raise NormbenchError(f"Wide ResNet dropout must be in [0, 1); got {dropout!r}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_channels = 16
        for group, out_channels in enumerate(widths):
            for i in range(n):
                stride = 2 if group > 0 and i == 0 else 1
                layers.append(WideBlock(block, in_channels, out_channels, stride, dropout))
                in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.final = norm_act(block, in_channels)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.layers(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def probe_blocks(self) -> list[tuple[str, nn.Module]]:
        """Every ``WideBlock`` (its output: the residual sum, before the next pre-activation)."""
        return _named_children(self.layers, "layers")


# Every convolution but each block's first is built here, so norms that own theirs are refused.
_WRN_CAPABILITIES = {RESIDUAL_GATE, NORM_ACT, PROBES}
_WRN = (
    "pre-activation Wide ResNet (Zagoruyko & Komodakis 2016) for 32x32 inputs, 1x1 conv shortcuts"
)


@register_model(
    "wrn16_8",
    description=f"WRN-16-8, {_WRN}, 11.0M parameters.",
    family="resnet",
    capabilities=_WRN_CAPABILITIES,
)
def wrn16_8(*, block: BlockFactory, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 8, block=block, num_classes=num_classes, dropout=dropout)


@register_model(
    "wrn28_10",
    description=f"WRN-28-10, {_WRN}, 36.5M parameters.",
    family="resnet",
    capabilities=_WRN_CAPABILITIES,
)
def wrn28_10(*, block: BlockFactory, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return WideResNet(28, 10, block=block, num_classes=num_classes, dropout=dropout)


@register_model(
    "wideresnet",
    description=f"WRN-depth-widen_factor, {_WRN}; model_args depth (6n+4, default 28), "
    "widen_factor (default 10), dropout between a block's convolutions (default 0).",
    family="resnet",
    capabilities=_WRN_CAPABILITIES,
)
def wideresnet(
    *,
    block: BlockFactory,
    num_classes: int = 10,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    return WideResNet(depth, widen_factor, block=block, num_classes=num_classes, dropout=dropout)


# --- VGG-like nets (Santurkar et al. 2018, Lubana et al. 2021) -----------------------------------


def vgg_stage_depths(convs: int, stages: int = 4) -> list[int]:
    """``convs`` convolutions spread over ``stages`` as evenly as possible, the remainder going to
    the last stages (earlier stages never get more than later ones): 9 -> [2, 2, 2, 3]."""
    base, extra = divmod(convs, stages)
    return [base + (i >= stages - extra) for i in range(stages)]


class VGG(nn.Module):
    """A plain (non-residual) VGG-like net for 32x32 inputs: ``depth - 1`` conv-norm-ReLU blocks
    from the block factory in four stages of ``width``, 2, 4 and 8 ``width`` channels, a 2x2 max
    pool after each of the first three stages, global average pooling and a linear classifier:
    ``depth`` weight layers. Convolutions are initialised Kaiming-normal (fan_in, ReLU gain); the
    classifier keeps PyTorch's default initialisation."""

    def __init__(self, *, block: BlockFactory, num_classes: int, depth: int = 11, width: int = 64):
        super().__init__()
        if not _is_int(depth) or depth < 5:
            raise NormbenchError(
                "VGG depth (weight layers: convolutions + the classifier) must be an integer >= 5 "
                f"(4 stages of at least one convolution, then the classifier); got {depth!r}"
            )
        if not _is_int(width) or width < 1:
            raise NormbenchError(
                f"VGG width (the first stage's channels) must be a positive integer; got {width!r}"
            )
        layers: list[nn.Module] = []
        in_channels = 3
        for stage, convs in enumerate(vgg_stage_depths(depth - 1)):
            out_channels = width * 2**stage
            for _ in range(convs):
                layers.append(block(in_channels, out_channels, 3, 1, act=nn.ReLU))
                in_channels = out_channels
            if stage < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def probe_blocks(self) -> list[tuple[str, nn.Module]]:
        """Every conv-norm-ReLU block (its output: after the activation, before any pooling)."""
        pools = (nn.MaxPool2d,)
        return [
            (n, m)
            for n, m in _named_children(self.features, "features")
            if not isinstance(m, pools)
        ]


@register_model(
    "vgg",
    description="VGG-like net for 32x32 inputs of Santurkar et al. (2018) and Lubana et al. (2021) "
    "(10, 20 and 40 layers there): depth - 1 conv-norm-ReLU blocks in four stages of width, 2, 4 "
    "and 8 width channels, 2x2 max pools after the first three, global average pooling and a "
    "linear classifier; model_args depth (weight layers, >= 5, default 11), width (default 64).",
    family="vgg",
    capabilities={CONV_BLOCKS, NORM_ACT, PROBES},
)
def vgg(
    *, block: BlockFactory, num_classes: int = 10, depth: int = 11, width: int = 64
) -> nn.Module:
    return VGG(block=block, num_classes=num_classes, depth=depth, width=width)


# --- A small fast CIFAR net for CPU budgets -----------------------------------------------------


class FastNet(nn.Module):
    """Seven 3x3 conv-norm-GELU layers in the style of airbench: a stem, then three stages of
    (2x2 max pool, conv, conv), global max pooling and a linear head. Pooling before each stage's
    first convolution keeps the full-resolution work to the stem, which makes the net about twice
    as fast as pooling between the two convolutions at a small cost in accuracy: sized for
    minutes on a CPU."""

    def __init__(self, *, block: BlockFactory, num_classes: int, widths: Sequence[int]):
        super().__init__()
        stem_width, *stage_widths = widths
        self.stem = block(3, stem_width, 3, 1, act=nn.GELU)
        stages: list[nn.Module] = []
        in_channels = stem_width
        for w in stage_widths:
            stages += [
                nn.MaxPool2d(2),
                block(in_channels, w, 3, 1, act=nn.GELU),
                block(w, w, 3, 1, act=nn.GELU),
            ]
            in_channels = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


@register_model(
    "fastnet",
    description="Small fast CIFAR net (7 conv layers, widths 32-64-128-256, 1.2M parameters) "
    "for CPU budgets.",
    family="vgg",
    capabilities={CONV_BLOCKS, NORM_ACT},
)
def fastnet(
    *, block: BlockFactory, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128, 256)
) -> nn.Module:
    return FastNet(block=block, num_classes=num_classes, widths=widths)


class AirbenchNet(nn.Module):
    """The layout of airbench94 (Jordan 2024, 94% on CIFAR-10 in seconds on one GPU) with every
    conv-norm pair from the block factory: a stem block, three groups of (block, 2x2 max pool,
    block) at widths 64, 256, 256, global max pooling, a bias-free linear head and airbench's
    logit scale of 1/9.

    Two departures keep the comparison fair to every norm: airbench's stem is a frozen 2x2
    patch-whitening convolution without a norm, here it is a conv-norm-GELU block like the
    others; and airbench pools between a group's first convolution and its norm, which the block
    factory (conv, norm, activation as one unit) cannot express, so here the pool follows the
    first block's activation. For BatchNorm that changes which activations its statistics see,
    not the compute (3.5x the fast net's multiply-adds)."""

    LOGIT_SCALE = 1 / 9

    def __init__(self, *, block: BlockFactory, num_classes: int, widths: Sequence[int]):
        super().__init__()
        stem_width, *group_widths = widths
        layers: list[nn.Module] = [block(3, stem_width, 3, 1, act=nn.GELU)]
        in_channels = stem_width
        for w in group_widths:
            layers += [
                block(in_channels, w, 3, 1, act=nn.GELU),
                nn.MaxPool2d(2),
                block(w, w, 3, 1, act=nn.GELU),
            ]
            in_channels = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_max_pool2d(self.features(x), 1), 1)
        return self.head(x) * self.LOGIT_SCALE


@register_model(
    "airbench",
    description="airbench94's CIFAR net (Jordan 2024) through the block factory: stem, three "
    "groups of (block, max pool, block) at widths 64-256-256, 1/9 logit scale; 2.0M parameters; "
    "model_args widths (stem and groups, default 32, 64, 256, 256).",
    family="vgg",
    capabilities={CONV_BLOCKS, NORM_ACT},
)
def airbench(
    *, block: BlockFactory, num_classes: int = 10, widths: Sequence[int] = (32, 64, 256, 256)
) -> nn.Module:
    return AirbenchNet(block=block, num_classes=num_classes, widths=widths)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- ImageNet ResNets (torchvision) -------------------------------------------------------------


def _torchvision_resnet(name: str, block: BlockFactory, num_classes: int) -> nn.Module:
    from torchvision import models as tv_models

    norm_layer = getattr(block, "norm_layer", None)
    if norm_layer is None:
        raise ValueError(
            f"{name} is built by torchvision, which takes a per-channel norm layer; this block "
            "factory does not provide one (norms that own their convolution need a normbench model)"
        )
    return getattr(tv_models, name)(weights=None, num_classes=num_classes, norm_layer=norm_layer)


@register_model(
    "resnet18",
    description="ImageNet ResNet-18 (torchvision, He et al. 2016) with the chosen norm, 11.7M "
    "parameters at 1000 classes.",
    family="resnet",
)
def resnet18(*, block: BlockFactory, num_classes: int = 1000) -> nn.Module:
    return _torchvision_resnet("resnet18", block, num_classes)


@register_model(
    "resnet50",
    description="ImageNet ResNet-50 (torchvision, He et al. 2016) with the chosen norm, 25.6M "
    "parameters at 1000 classes.",
    family="resnet",
)
def resnet50(*, block: BlockFactory, num_classes: int = 1000) -> nn.Module:
    return _torchvision_resnet("resnet50", block, num_classes)
