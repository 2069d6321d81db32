"""The authors' motion blur itself, as a test reference: Wand over ImageMagick 6 Q16.

The CIFAR-10-C script saves the image as a PNG with Pillow, opens the blob as a Wand image,
calls ``MagickMotionBlurImage(wand, radius, sigma, angle)`` directly (its ``MotionImage``
subclass) and decodes the PNG blob ImageMagick writes with OpenCV. The functions below do
exactly that, one HWC uint8 image (or one H x W gray layer, as snow blurs it) at a time.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from conftest import skip_or_fail
from PIL import Image

WAND_HINT = (
    "`pip install Wand` and ImageMagick 6 Q16 (Debian: apt-get install libmagickwand-6.q16-6)"
)


def require_wand() -> None:
    """Skip (locally) or fail (in CI) unless Wand finds ImageMagick 6 with 16-bit quanta."""
    try:
        import wand.version
    except ImportError as err:
        skip_or_fail(f"Wand over ImageMagick is not available ({err}); {WAND_HINT}")
    version = wand.version.MAGICK_VERSION
    if not version.startswith("ImageMagick 6.") or wand.version.QUANTUM_DEPTH != 16:
        skip_or_fail(f"the motion-blur reference needs ImageMagick 6 Q16, found {version}")


def wand_motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """The script's ``motion_blur`` on one HWC RGB or HW gray uint8 image, at ``angle``."""
    from wand.api import library
    from wand.image import Image as WandImage

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with WandImage(blob=buffer.getvalue()) as magick:
        library.MagickMotionBlurImage(magick.wand, radius, sigma, angle)
        blob = magick.make_blob()
    out = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
    if image.ndim == 2:
        return out if out.ndim == 2 else out[..., 0]
    if out.ndim == 2:  # ImageMagick writes an all-gray image as a gray PNG
        return np.stack([out] * 3, axis=-1)
    return out[..., [2, 1, 0]]  # OpenCV's BGR to RGB
