"""Reading and writing image files and arrays.

Convention: every tensor that leaves this module is float32 in [0, 1], CHW or NCHW, RGB.
Everything written goes through :func:`atomic_write` so that an interrupted run never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import imagecodecs
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from neaudit.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
JPEG_SUFFIXES = (".jpg", ".jpeg")


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Pillow's modes for 16-bit grayscale (PNG) and 32-bit integer images, read as 16-bit."""


def read_image(path: str | Path, on_grid: bool = False) -> torch.Tensor:
    """Decode one image file into a (3, H, W) float tensor in [0, 1].

    8-bit images (any mode Pillow converts to RGB) keep their 256 levels; 16-bit grayscale
    is scaled by 1/65535 and float images (mode F) must already lie in [0, 1]: nothing is
    clipped silently. With ``on_grid``, the image comes as uint8 instead (16-bit and float
    images rounded to the grid): for jobs that work on the uint8 grid anyway (``protect``),
    8-bit files then skip the float conversion.
    """
    return as_read(read_pixels(path)[0], on_grid)


UNREAD = {
    "alpha": "transparency, which the pixels read (and PNG NEs written) do not keep",
    "orientation": "an EXIF orientation tag, not applied: the pixels are read as stored",
    "frames": "more than one frame (an animation or pages), of which only the first is read "
              "(and protected)",
    "colour_profile": "a colour profile other than sRGB, not applied: the pixels are read (and "
                      "PNG NEs written) as stored, so colour-managed viewers show the NEs in "
                      "other colours than the originals",
}
"""What a file can show in an image viewer that its pixels as read (RGB, as stored: what
ecosystem loaders such as timm's and torchvision's give a model) do not, by name."""


def read_pixels(path: str | Path) -> tuple[torch.Tensor, tuple[str, ...]]:
    """A file's pixels as decoded, (3, H, W): uint8 for 8-bit images (a view of the decoder's
    H×W×3 array, not a copy), float in [0, 1] for 16-bit and float ones; and the names of
    what reading leaves out (:data:`UNREAD`)."""
    try:
        with Image.open(path) as img:  # the header only: size and decompression-bomb checks
            unread = (("orientation",) if _orientation(img) != 1 else ()) + (
                ("frames",) if _frames(img) > 1 else ()) + (
                ("colour_profile",) if not _srgb(img.info.get("icc_profile")) else ())
            rgb = (_rgb_decoded(path, img.format)
                   if img.mode == "RGB" and "transparency" not in img.info else None)
            if rgb is None:
                img.load()
                if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
                    return _high_depth(path, img), unread
                if _transparent(img):
                    unread = ("alpha", *unread)
                rgb = np.array(img.convert("RGB"))
    except DataError:  # its own line already (a ValueError too): not wrapped in another
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{path}: cannot read this image ({exc}). Fix: replace or remove the file, "
            "or list only readable files in a manifest."
        ) from exc
    if rgb.dtype == np.uint16:  # every level kept, scaled as 16-bit grey is
        return torch.from_numpy((rgb / 65535.0).astype(np.float32)).permute(2, 0, 1), unread
    return torch.from_numpy(rgb).permute(2, 0, 1), unread


_ORIENTATION = 0x0112  # EXIF's Orientation tag; 1 is "as stored"


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, 1 where there is none, or where the metadata cannot be parsed:
    a broken EXIF block does not make the pixels unreadable, and only they are used."""
    if "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # Pillow's EXIF parser on hostile bytes; the note is advisory
        return 1


@functools.lru_cache(maxsize=64)
def _srgb(profile: bytes | None) -> bool:
    """Whether an embedded ICC profile (None: none) is sRGB, as most cameras' and editors'
    are, by its description; where it cannot be parsed, as for :func:`_orientation`."""
    if not profile:
        return True
    try:
        from PIL import ImageCms

        description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(
            io.BytesIO(profile)))
    except Exception:  # littlecms on hostile bytes, or Pillow built without it; advisory
        return True
    return "srgb" in description.lower()


def _frames(img: Image.Image) -> int:
    """Frames in the file (an animated WebP, GIF or PNG, a multi-page TIFF); 1 where the
    count cannot be read, as for :func:`_orientation`."""
    try:
        return int(getattr(img, "n_frames", 1))
    except Exception:  # Pillow seeking through hostile frame tables; the note is advisory
        return 1


def _transparent(img: Image.Image) -> bool:
    """Whether any pixel is less than opaque (an alpha band, or a transparent colour or
    palette entry that some pixel uses)."""
    if "A" not in img.getbands():
        if "transparency" not in img.info:
            return False
        img = img.convert("RGBA")
    return img.getchannel("A").getextrema()[0] < 255


def as_read(pixels: torch.Tensor, on_grid: bool = False, into: torch.Tensor | None = None
            ) -> torch.Tensor:
    """:func:`read_pixels`' output as :func:`read_image` returns it: float in [0, 1], or
    uint8 on the grid with ``on_grid``; written into ``into`` (its dtype decides) when given,
    which spares a batch its per-image temporaries."""
    if into is None:
        if pixels.dtype == torch.uint8:
            return pixels if on_grid else pixels.float().div_(255.0)
        return to_grid(pixels) if on_grid else pixels
    if into.dtype == torch.uint8:
        return into.copy_(pixels if pixels.dtype == torch.uint8 else to_grid(pixels))
    into.copy_(pixels)
    return into.div_(255.0) if pixels.dtype == torch.uint8 else into


_DECODERS = {"PNG": (imagecodecs.png_decode, imagecodecs.PngError),
             "JPEG": (imagecodecs.jpeg8_decode, imagecodecs.Jpeg8Error)}
"""imagecodecs' libpng and libjpeg-turbo, by the format Pillow found in the header: the same
pixels as Pillow's decoders (a test compares them), without Pillow's Python around each file.
One thread on 2 cores: 224×224 PNG photos 1.36× Pillow's rate; 500×375 JPEG photos 1.02 against
1.46–1.57 ms."""


def _rgb_decoded(path: str | Path, image_format: str | None) -> np.ndarray | None:
    """An RGB PNG or JPEG decoded by imagecodecs (:data:`_DECODERS`): H×W×3 uint8, or uint16
    for a 16-bit PNG (Pillow would keep only each value's high byte); None for other formats,
    and where it refuses or gives anything else (transparency, CMYK, 12-bit JPEG), for Pillow
    to decode."""
    decoder = _DECODERS.get(image_format or "")
    if decoder is None:
        return None
    decode, error = decoder
    try:
        with open(path, "rb") as handle:
            array = decode(handle.read())
    except error:
        return None
    depths = (np.uint8, np.uint16) if image_format == "PNG" else (np.uint8,)
    return array if array.dtype in depths and array.ndim == 3 and array.shape[2] == 3 else None


def _levels(images: torch.Tensor) -> torch.Tensor:
    """The uint8 level of every value as a float, in one new buffer: clipped to [0, 1],
    scaled and rounded in place (the arithmetic of ``round(clip(x) · 255)``, at a third of the
    memory traffic of three new tensors)."""
    return images.clamp(0.0, 1.0).mul_(255.0).round_()


def to_grid(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as uint8 on the grid (:func:`quantize`, as integers)."""
    return _levels(images).to(torch.uint8)


def _high_depth(path: str | Path, img: Image.Image) -> torch.Tensor:
    """A 16-bit or float single-channel image as a grey (3, H, W) tensor in [0, 1]."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode != "F":
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{path}: integer pixel values outside 0–65535 (mode {img.mode}). "
                            "Fix: save the image as 8- or 16-bit PNG.")
        values = values / 65535.0
    elif not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise DataError(f"{path}: floating-point pixels outside [0, 1] or not finite. Fix: "
                        "scale the image to [0, 1] or save it as 8- or 16-bit PNG.")
    grey = torch.from_numpy(values.astype(np.float32))
    return grey.expand(3, *grey.shape).contiguous()


def read_jpegs_on(paths: Sequence[str | Path], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG files as one nvJPEG batch on ``device``; returns (3, H, W) float tensors
    in [0, 1] on the CPU, like :func:`read_image`.

    nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: pixels can differ by tens of
    levels at colour edges, which is why this is opt-in (``--decode device``). A batch that
    nvJPEG refuses is decoded on the CPU, which names any unreadable file.

    torchvision.io is the nvJPEG binding installed beside torch; it is deprecated in favour of
    TorchCodec, which this opt-in path will move to once it is a dependency.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities",
                                DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The image decoding and encoding capabilities",
                                    DeprecationWarning)
            decoded = decode_jpeg([read_file(str(p)) for p in paths], mode=ImageReadMode.RGB,
                                  device=device)
    except RuntimeError:
        return [read_image(p) for p in paths]
    return [image.cpu().float() / 255.0 for image in decoded]


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, reading only its header."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{path}: cannot read this image ({exc}). Fix: replace or remove the file."
        ) from exc
    return height, width


def to_float(array: np.ndarray) -> torch.Tensor:
    """uint8 (0–255) or float ([0, 1]) array, NHWC or NCHW, → float32 NCHW tensor in [0, 1].
    NHWC where the last axis holds the 3 channels and the second does not."""
    tensor = torch.from_numpy(np.array(array, copy=True))
    if tensor.ndim == 4 and tensor.shape[-1] == 3 and tensor.shape[1] != 3:
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    return tensor.to(torch.float32).contiguous()


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and round to the uint8 grid: exactly what a PNG file stores."""
    return _levels(images).div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW float in [0, 1] → NHWC uint8 array (clipped and rounded).

    On a CPU the array is a view in NHWC order (whoever copies it next reorders it). From
    CUDA it comes contiguous through pinned memory: reordered on the device, then copied by
    DMA, where a pageable copy of the permuted tensor took a staged copy and left the
    reordering to the CPU thread that feeds the device. Pinned blocks come from torch's
    caching host allocator and are reused only once the returned array is gone.
    """
    grid = to_grid(images).permute(0, 2, 3, 1)
    if grid.device.type != "cuda":
        return grid.cpu().numpy()
    host = torch.empty(grid.shape, dtype=torch.uint8, pin_memory=True)
    return host.copy_(grid.contiguous()).numpy()


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()
"""Read once: setting the umask to read it is process-wide, so no writer thread does it."""


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp creates 0600; written files are ordinary files
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename != tmp:
            raise
        # named as what was to be written (a folder in its place, say), not its temporary file
        raise type(exc)(exc.errno, exc.strerror, os.fspath(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PNG_COMPRESSIONS = {
    "none": {"level": 0, "filter": imagecodecs.PNG.FILTER.NONE},
    "deflate": {"level": 1, "strategy": imagecodecs.PNG.STRATEGY.RLE,
                "filter": imagecodecs.PNG.FILTER.PAETH},
}
"""How written PNGs are compressed (lossless whatever the choice); ``none`` is the default.
Measured on 224×224 ViT-B/16 NEs at 30 dB, one thread on this project's 2-core machine
(imagecodecs' libpng): ``none`` (stored deflate blocks, no filter) encodes in 0.12 ms at 147.5
KiB; ``deflate`` (zlib level 1, run-length matching after the Paeth filter) in 1.40 ms at 111.6
KiB. Higher zlib levels save nothing on NE noise (level 9 with Paeth: 113.5 KiB in 3.5 ms), and
the noise leaves deflate little to find, so the default buys ten times the encoding speed for
files a third larger; decoding a ``none`` file is 8× faster too (0.15 vs 1.15 ms), which the
audit of the release gains. A release can be recompressed losslessly later (``oxipng``)."""


def write_png(path: Path, image: np.ndarray, compression: str = "none") -> str:
    """Write one HWC uint8 image as a lossless PNG, atomically (imagecodecs' libpng, which
    releases the GIL, so writer threads run in parallel); returns the SHA-256 of the bytes
    written, so that a job's hash list needs no second read of its files."""
    encoded = imagecodecs.png_encode(np.ascontiguousarray(image),
                                     **PNG_COMPRESSIONS[compression])
    atomic_write(path, lambda handle: handle.write(encoded))
    return hashlib.sha256(encoded).hexdigest()


def is_lossy(path: str | Path) -> bool:
    """JPEG, or WebP without a lossless (VP8L) bitstream."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in JPEG_SUFFIXES:
        return True
    if suffix == ".webp":
        with open(path, "rb") as handle:
            header = handle.read(64)
        return b"VP8L" not in header
    return False


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
