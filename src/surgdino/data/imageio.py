"""Reading image files: the one decoder every command uses (data check, training, evaluation, predict, show).

``read_image`` applies the EXIF orientation, converts any Pillow mode to 8-bit RGB (16-bit and
32-bit greyscale scaled by the range of their type, not clipped at 255) and turns every Pillow
failure, decompression bombs included, into a one-line ``DataError`` naming the file.
``image_size`` reads the oriented (width, height) from the header without decoding the pixels.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from surgdino.errors import DataError

# Greyscale modes stored with more than 8 bits: full-scale value of the type.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


_FIX = "replace the file or remove the image from the annotation json"


def _to_rgb8(im) -> np.ndarray:
    """A Pillow image of any mode as uint8 ``[H, W, 3]``; wide greyscale scaled by its type's range."""
    if im.mode in _WIDE_MODES or im.mode in ("I", "F"):
        a = np.asarray(im)
        if im.mode == "F":  # float images: [0, 1] if they fit there, else 0..255
            full = 1.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else 255.0
        elif im.mode == "I":  # 32-bit ints: 16-bit files (older Pillow reads 16-bit PNGs as "I") or full int32
            full = 65535.0 if int(a.max(initial=0)) <= 65535 else float(np.iinfo(np.int32).max)
        else:
            full = float(_WIDE_MODES[im.mode])
        g = np.clip(np.nan_to_num(a.astype(np.float64) * (255.0 / full)), 0, 255)
        g = np.floor(g + 0.5).astype(np.uint8)  # [H, W]
        return np.repeat(g[:, :, None], 3, axis=2)  # [H, W, 3]
    return np.asarray(im.convert("RGB"))  # [H, W, 3]


def _open_error(path: str, e: Exception) -> DataError:
    from PIL import Image

    if isinstance(e, FileNotFoundError):
        return DataError(f"{path}: image file not found; check the image root and file_name")
    if isinstance(e, IsADirectoryError):
        return DataError(f"{path}: is a directory, not an image file")
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return DataError(f"{path}: refused as a possible decompression bomb (more than {Image.MAX_IMAGE_PIXELS} "
                         f"pixels); {_FIX}, or downscale it")
    msg = str(e).splitlines()[0] if str(e) else ""
    return DataError(f"{path}: cannot decode the image ({type(e).__name__}: {msg}); {_FIX}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB ``[H, W, 3]`` with its EXIF orientation applied.

    Pillow, not torchvision.io (whose decoders are deprecated since torchvision 0.29). Any failure
    (missing, truncated, not an image, too many pixels) is a ``DataError`` naming the file.
    """
    from PIL import Image, ImageOps

    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                arr = _to_rgb8(im)
                return arr if arr.flags.writeable and arr.flags.c_contiguous else arr.copy()
    except Exception as e:  # Pillow raises many types for broken files
        raise _open_error(path, e) from None


def image_size(path: str | os.PathLike, decode: bool = False) -> tuple[int, int]:
    """``(width, height)`` of the image as ``read_image`` returns it (EXIF orientation applied).

    Reads the header only unless ``decode`` (then all pixels are decoded, finding truncated files);
    a PNG whose eXIf chunk follows the pixel data is only seen rotated with ``decode``.
    """
    if decode:
        h, w = read_image(path).shape[:2]
        return w, h
    from PIL import Image

    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # as stored
                # PNG's getexif() decodes the pixels unless the eXIf chunk precedes them (then it is in info)
                has_exif = im.format != "PNG" or "exif" in im.info
                orientation = im.getexif().get(0x0112, 1) if has_exif else 1
    except Exception as e:
        raise _open_error(path, e) from None
    return (h, w) if orientation in _ROTATING_ORIENTATIONS else (w, h)
