"""Severity parameter tables of the common-corruption benchmark (Hendrycks & Dietterich 2019).

``CIFAR`` holds the 32-px parameters of the authors' CIFAR script (the one that made the official
CIFAR-10-C files); ``IMAGENET`` the 224-px parameters of their ImageNet script (the numbers the
``imagecorruptions`` package also uses, except ``elastic_transform``, where the ImageNet-C script's
own constants are kept). Each entry is a tuple of five parameter sets, severity 1..5.

``TABLE_VERSION`` goes into every generated dataset's manifest: change it whenever a number or an
algorithm changes, so old and new files are never mixed.
"""

from __future__ import annotations

from typing import Any

from normbench.errors import NormbenchError

TABLE_VERSION = "hendrycks2019-v1"

_S = 32  # CIFAR image size, the unit of the elastic parameters
_I = 244  # the ImageNet script writes its elastic constants in units of 244 (sic, not 224)

CIFAR: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    # (sigma, max_delta, iterations)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    # (radius, alias_blur)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # (radius, sigma); angle uniform in [-45, 45]
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    # numpy.arange(start, stop, step) of zoom factors
    "zoom_blur": (
        (1, 1.06, 0.01),
        (1, 1.11, 0.01),
        (1, 1.16, 0.01),
        (1, 1.21, 0.01),
        (1, 1.26, 0.01),
    ),
    # (loc, scale, zoom, threshold, blur radius, blur sigma, blend)
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    # (image weight, frost weight)
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    # (strength, wibble decay)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (saturation factor, saturation shift)
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    # (alpha, sigma, affine jitter), in pixels
    "elastic_transform": (
        (_S * 0, _S * 0, _S * 0.08),
        (_S * 0.05, _S * 0.2, _S * 0.07),
        (_S * 0.08, _S * 0.06, _S * 0.06),
        (_S * 0.1, _S * 0.04, _S * 0.05),
        (_S * 0.1, _S * 0.03, _S * 0.03),
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    # (loc, scale, sigma, threshold, intensity, mode); mode 0 = water, 1 = mud
    "spatter": (
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ),
}

IMAGENET: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": (
        (1, 1.11, 0.01),
        (1, 1.16, 0.01),
        (1, 1.21, 0.02),
        (1, 1.26, 0.02),
        (1, 1.31, 0.03),
    ),
    "snow": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    "fog": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    "elastic_transform": (
        (_I * 2, _I * 0.7, _I * 0.1),
        (_I * 2, _I * 0.08, _I * 0.2),
        (_I * 0.05, _I * 0.01, _I * 0.02),
        (_I * 0.07, _I * 0.01, _I * 0.02),
        (_I * 0.12, _I * 0.01, _I * 0.02),
    ),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "spatter": (
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    ),
}

#: Image size -> (table name, table). Frost textures are shrunk by ``FROST_SCALE`` first.
TABLES = {32: ("cifar", CIFAR), 224: ("imagenet", IMAGENET)}
FROST_SCALE = {32: 0.2, 224: 1.0}


def table_for(height: int, width: int) -> tuple[str, dict[str, tuple[Any, ...]]]:
    """The parameter table for square images of this size, or a clear error."""
    if height != width or height not in TABLES:
        sizes = ", ".join(f"{s}x{s} ({TABLES[s][0]})" for s in TABLES)
        raise NormbenchError(
            f"No corruption parameter table for {height}x{width} images; tables exist for "
            f"{sizes}. Resize or crop the images to one of these sizes first."
        )
    return TABLES[height]
