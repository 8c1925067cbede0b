"""Reading and writing fusion images: any common format and bit depth in, float tensors in [0, 1] out.

Infrared cameras write 16-bit PNG/TIFF, public benchmarks ship 8-bit JPEG/PNG/BMP/TIFF in grey or RGB, and the
two files of a pair are not always the same size. Everything here converts to the single in-memory format of
contracts.md ("Images": float32 (C, H, W) in [0, 1]) and refuses, with a message naming the file(s), whatever it
cannot convert faithfully (unknown bit depth, corrupt file, size mismatch without an explicit policy), so that
a bad pair never silently becomes a bad number in a results table.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fusion.colour import as_rgb, luminance

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "SIXTEEN_BIT_MIN_SPAN",
    "ImagePairError",
    "SixteenBitRangeWarning",
    "align_pair",
    "image_size",
    "list_images",
    "match_pairs",
    "read_image",
    "read_mask",
    "read_pair",
    "save_image",
    "to_single_channel",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SIZE_POLICIES = ("error", "resize", "crop")
VIS_MODES = ("keep", "grey", "rgb")
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

MAX_PIXELS = 89_478_485
"""The largest image (width × height) read by default: PIL's decompression-bomb threshold (about 9459 × 9459).
Checked from the header, before anything is decoded, so a huge or hostile file is an error naming it instead
of an allocator failure: a float32 RGB tensor of this size already takes 1.07 GB, and a fusion net needs
several times that. Pass ``max_pixels`` (or set this constant) to read larger images; PIL itself still
refuses images over twice ``PIL.Image.MAX_IMAGE_PIXELS``."""

SIXTEEN_BIT_MIN_SPAN = 65535 // 8
"""A 16-bit image whose counts span less than this (1/8 of the range) is reported: raw sensor counts such as
7000–8020 divided by 65535 become a nearly flat grey image (see ``stretch16`` of :func:`read_image`)."""


class ImagePairError(ValueError):
    """Bad image input: unreadable or corrupt file, unsupported bit depth, size mismatch, missing partner,
    empty or missing folder, image over the pixel limit. The message always names the file(s) or folder."""


class SixteenBitRangeWarning(UserWarning):
    """A 16-bit image uses a small part of its range (raw sensor counts?): read as /65535 it is nearly flat."""


_NARROW_WARNED: set[Path] = set()   # folders already reported: one warning per image set, not per image


# ----------------------------------------------------------------------------------------------- reading
def _is_wide_colour(image: Image.Image, path: Path) -> bool:
    """True for 16-bit-per-channel colour files, which Pillow silently truncates to 8 bits."""
    if image.mode not in ("RGB", "RGBA"):
        return False
    if image.format == "PNG":
        with open(path, "rb") as fh:
            header = fh.read(26)
        return len(header) >= 26 and header[12:16] == b"IHDR" and struct.unpack(">B", header[24:25])[0] == 16
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return max(bits) > 8
    return False


def _opencv(path: Path):
    """OpenCV, needed only for 16-bit colour images (Pillow cannot decode or write 48-bit colour)."""
    try:
        import cv2
    except ImportError:
        raise ImagePairError(f"{path} is a 16-bit colour image, which needs OpenCV: "
                             "pip install 'bilevel-fusion[opencv]' (or opencv-python)") from None
    return cv2


def _read_wide_colour(path: Path) -> np.ndarray:
    """The raw uint16 (H, W, 3|4) counts of a 16-bit colour file, in RGB(A) order."""
    cv2 = _opencv(path)
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16 or array.ndim != 3:
        raise ImagePairError(f"cannot decode 16-bit colour image {path}")
    order = [2, 1, 0, 3][: array.shape[2]]  # OpenCV stores BGR(A)
    return array[:, :, order]


def _from_16bit(raw: np.ndarray, path: Path, stretch16: bool) -> np.ndarray:
    """16-bit counts → float32 in [0, 1]: divided by 65535, or (``stretch16``) min–max stretched over all
    channels (a flat image becomes 0). Without the stretch, counts spanning less than
    :data:`SIXTEEN_BIT_MIN_SPAN` give one :class:`SixteenBitRangeWarning` per folder: nothing else would tell
    the user that the image reads as nearly flat grey."""
    lo, hi = int(raw.min()), int(raw.max())
    if stretch16:
        if hi == lo:
            return np.zeros(raw.shape, np.float32)
        return ((raw.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    if hi - lo < SIXTEEN_BIT_MIN_SPAN and path.parent not in _NARROW_WARNED:
        _NARROW_WARNED.add(path.parent)
        warnings.warn(
            f"{path}: 16-bit image with counts {lo}-{hi} uses {100 * (hi - lo) / 65535:.1f}% of 0-65535 and "
            f"reads as a nearly flat image in [{lo / 65535:.3f}, {hi / 65535:.3f}]; for raw sensor counts pass "
            f"stretch16=True (--stretch-16bit) to stretch each image's min-max to [0, 1] (not repeated for "
            f"other images in {path.parent})", SixteenBitRangeWarning, stacklevel=4)
    return raw.astype(np.float32) / 65535.0


def _to_float(image: Image.Image, path: Path, keep_alpha: bool, stretch16: bool) -> np.ndarray:
    """Pillow image → float32 (H, W) or (H, W, C) in [0, 1], by the stored bit depth."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _from_16bit(np.asarray(image), path, stretch16)
    if mode == "I":  # 32-bit signed container; Pillow uses it for 16-bit PNGs too
        array = np.asarray(image)
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 65535:
            raise ImagePairError(
                f"unsupported bit depth in {path}: 32-bit integer image with values in [{lo}, {hi}]; "
                "only 8- and 16-bit integer images are supported")
        return _from_16bit(array, path, stretch16)
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(array.min()), float(array.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ImagePairError(
                f"unsupported float image {path}: values in [{lo:g}, {hi:g}], expected [0, 1]")
        return array.copy()
    if mode == "1":
        image = image.convert("L")
    elif mode in ("LA", "La"):
        image = image.getchannel(0)
    elif mode == "P":  # palette: expand through the palette; grey palettes stay grey below
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode not in ("L", "RGB", "RGBA"):
        try:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
            image = image.convert("RGB")
        except (ValueError, OSError) as err:
            raise ImagePairError(f"unsupported image mode {mode!r} in {path}: {err}") from err
    if image.mode == "RGBA" and not keep_alpha:
        image = image.convert("RGB")  # drops alpha (no compositing: the colour values are the measurement)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ImagePairError(f"unsupported bit depth in {path}: mode {mode!r} decoded to {array.dtype}")
    return array.astype(np.float32) / 255.0


def _open(path: Path, max_pixels: int | None) -> Image.Image:
    """Open ``path`` (header only) and refuse it when it has more than ``max_pixels`` (None:
    :data:`MAX_PIXELS`) pixels, before anything is decoded."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the limit below decides
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImagePairError(f"image {path} is too large for PIL: {err} "
                             f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,})") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise ImagePairError(f"image {path} is {width}x{height} = {width * height:,} pixels, over the limit of "
                             f"{limit:,} pixels (max_pixels, default fusion.image_io.MAX_PIXELS)")
    return image


def image_size(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) from the file's header, without decoding it: lets a command check every input before any work.

    Raises:
        ImagePairError: the file is not a readable image (missing, empty, corrupt) or has more than
            ``max_pixels`` (None: :data:`MAX_PIXELS`) pixels.
    """
    path = Path(path)
    try:
        with _open(path, max_pixels) as image:
            width, height = image.size
    except ImagePairError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImagePairError(f"cannot read image {path}: {err}") from None
    return height, width


def read_image(path: str | os.PathLike, *, keep_alpha: bool = False, stretch16: bool = False,
               max_pixels: int | None = None) -> Tensor:
    """Read an image as a float32 tensor (C, H, W) in [0, 1], keeping the stored channels.

    Grey (8-bit, 16-bit, 1-bit, grey+alpha) → 1 channel; RGB, palette and other colour modes → 3 channels.
    8-bit data is divided by 255, 16-bit data (PNG/TIFF, grey or colour) by 65535; float TIFFs must already lie
    in [0, 1]. Alpha is dropped unless ``keep_alpha`` (MFNet stores thermal as a 4th "alpha" channel).

    Args:
        stretch16: map a 16-bit image's own min-max (over all channels) to [0, 1] instead of dividing by
            65535: for raw sensor counts (e.g. 7000-8020), which otherwise read as a nearly flat image (and
            give a :class:`SixteenBitRangeWarning`, once per folder). 8-bit and float images are unaffected.
        max_pixels: refuse images with more pixels (width × height) than this, from the header, before
            decoding; None means :data:`MAX_PIXELS`.

    Raises:
        ImagePairError: the file is missing, unreadable, corrupt, over ``max_pixels`` or has an unsupported
            bit depth.
    """
    path = Path(path)
    if not path.is_file():
        raise ImagePairError(f"image file not found: {path}")
    try:
        with _open(path, max_pixels) as image:
            image.load()
            if _is_wide_colour(image, path):
                raw = _read_wide_colour(path)
                array = _from_16bit(raw if raw.shape[2] == 3 or keep_alpha else raw[:, :, :3], path, stretch16)
            else:
                array = _to_float(image, path, keep_alpha, stretch16)
    except ImagePairError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImagePairError(f"cannot read image {path}: {err}") from err
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def read_mask(path: str | os.PathLike) -> Tensor:
    """Read a label image as raw integer values (H, W) int64: palette indices, grey or 16-bit values.

    Label PNGs are often palette images whose *indices* are the classes, so no palette expansion happens here.
    A colour file is accepted only when its three channels are identical.
    """
    path = Path(path)
    if not path.is_file():
        raise ImagePairError(f"label file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGB", "RGBA"):
                array = np.asarray(image)[:, :, :3]
                if not (np.array_equal(array[..., 0], array[..., 1])
                        and np.array_equal(array[..., 0], array[..., 2])):
                    raise ImagePairError(
                        f"label image {path} is a colour image with differing channels; expected class indices "
                        "(grey, palette or 16-bit)")
                array = array[..., 0]
            elif image.mode in ("LA", "PA"):
                array = np.asarray(image)[..., 0]
            elif image.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"):
                array = np.asarray(image)
            else:
                raise ImagePairError(f"unsupported label image mode {image.mode!r} in {path}")
    except ImagePairError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImagePairError(f"cannot read label image {path}: {err}") from err
    return torch.from_numpy(array.astype(np.int64))


# ------------------------------------------------------------------------------------------------- pairs
def to_single_channel(image: Tensor) -> Tensor:
    """(C, H, W) → (1, H, W): a 3-channel image with identical channels gives exactly channel 0 (grey saved as
    RGB, common for IR files), any other colour image its BT.601 luminance."""
    if image.shape[-3] == 1:
        return image
    if image.shape[-3] == 3 and torch.equal(image[..., :1, :, :].expand_as(image), image):
        return image[..., :1, :, :].clone()
    return luminance(image)


def _apply_vis_mode(vis: Tensor, vis_mode: str) -> Tensor:
    if vis_mode == "keep":
        return vis
    if vis_mode == "grey":
        return to_single_channel(vis)
    if vis_mode == "rgb":
        return as_rgb(vis).contiguous()
    raise ValueError(f"unknown vis_mode {vis_mode!r}; expected one of {VIS_MODES}")


def _centre_crop(image: Tensor, height: int, width: int) -> Tensor:
    top = (image.shape[-2] - height) // 2
    left = (image.shape[-1] - width) // 2
    return image[..., top:top + height, left:left + width]


def align_pair(ir: Tensor, vis: Tensor, size_policy: str = "error", *,
               ir_path: str | os.PathLike = "ir", vis_path: str | os.PathLike = "vis") -> tuple[Tensor, Tensor]:
    """Bring two (C, H, W) images to one size, or refuse.

    Args:
        size_policy: "error" (default: a mismatch is a data bug), "resize" (visible resized to the IR size,
            bilinear with antialiasing) or "crop" (both centre-cropped to the common size).
        ir_path, vis_path: only used in the error message.
    """
    if size_policy not in SIZE_POLICIES:
        raise ValueError(f"unknown size_policy {size_policy!r}; expected one of {SIZE_POLICIES}")
    if ir.shape[-2:] == vis.shape[-2:]:
        return ir, vis
    ir_hw, vis_hw = tuple(ir.shape[-2:]), tuple(vis.shape[-2:])
    if size_policy == "error":
        raise ImagePairError(
            f"size mismatch: {ir_path} is {ir_hw[1]}x{ir_hw[0]} (WxH) but {vis_path} is {vis_hw[1]}x{vis_hw[0]}; "
            "pass size_policy='resize' or 'crop' to align them explicitly")
    if size_policy == "resize":
        vis = F.interpolate(vis[None], size=ir_hw, mode="bilinear", align_corners=False, antialias=True)[0]
        return ir, vis.clamp_(0.0, 1.0)
    height, width = min(ir_hw[0], vis_hw[0]), min(ir_hw[1], vis_hw[1])
    return _centre_crop(ir, height, width).contiguous(), _centre_crop(vis, height, width).contiguous()


def read_pair(ir_path: str | os.PathLike, vis_path: str | os.PathLike, *, size_policy: str = "error",
              vis_mode: str = "keep", stretch16: bool = False, max_pixels: int | None = None
              ) -> tuple[Tensor, Tensor]:
    """Read an infrared/visible pair: ``ir`` (1, H, W) and ``vis`` (C, H, W), both float32 in [0, 1].

    Args:
        size_policy: see :func:`align_pair`; the default refuses pairs of different sizes.
        vis_mode: "keep" the stored channels, or force "grey" (luminance) or "rgb" (grey repeated).
        stretch16, max_pixels: see :func:`read_image` (applied to both files).
    """
    if vis_mode not in VIS_MODES:
        raise ValueError(f"unknown vis_mode {vis_mode!r}; expected one of {VIS_MODES}")
    ir = to_single_channel(read_image(ir_path, stretch16=stretch16, max_pixels=max_pixels))
    vis = _apply_vis_mode(read_image(vis_path, stretch16=stretch16, max_pixels=max_pixels), vis_mode)
    return align_pair(ir, vis, size_policy, ir_path=ir_path, vis_path=vis_path)


# ------------------------------------------------------------------------------------------------ saving
def save_image(image: Tensor, path: str | os.PathLike, *, bits: int = 8, overwrite: bool = False,
               quality: int = 95) -> Path:
    """Save a (C, H, W) or (H, W) image in [0, 1] (values are clipped) as round(x · (2^bits − 1)).

    The format follows the extension: 8-bit PNG/JPEG/BMP/TIFF, 16-bit PNG/TIFF (``bits=16``). The file is
    written to a temporary name and moved into place, so an interrupted run never leaves a truncated image.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: bad shape, non-finite values, or a format that cannot hold ``bits``.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _SAVE_FORMATS:
        raise ValueError(f"cannot save {path}: unknown extension {path.suffix!r}; use one of {IMAGE_EXTENSIONS}")
    if bits not in (8, 16):
        raise ValueError(f"cannot save {path}: bits must be 8 or 16, got {bits}")
    if bits == 16 and ext not in (".png", ".tif", ".tiff"):
        raise ValueError(f"cannot save {path}: 16-bit output needs a .png or .tif(f) file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {path}; pass overwrite=True")
    image = image.detach().to("cpu", torch.float32)
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"cannot save {path}: expected a (1|3, H, W) or (H, W) tensor, got {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError(f"cannot save {path}: image contains NaN or Inf")
    scale = 65535.0 if bits == 16 else 255.0
    array = torch.round(image.clamp(0.0, 1.0) * scale).numpy().astype(np.uint16 if bits == 16 else np.uint8)
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        if bits == 16 and array.ndim == 3:  # Pillow cannot write 48-bit colour
            if not _opencv(path).imwrite(str(tmp), np.ascontiguousarray(array[:, :, ::-1])):
                raise OSError(f"OpenCV could not write {tmp}")
        else:
            pil = Image.fromarray(array)  # uint16 → mode I;16, uint8 → L/RGB
            kwargs = {"quality": quality} if _SAVE_FORMATS[ext] == "JPEG" else {}
            pil.save(tmp, format=_SAVE_FORMATS[ext], **kwargs)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------------------------- folders
def list_images(folder: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; extensions compared case-insensitively.

    Raises:
        ImagePairError: the folder is missing or holds no image with one of ``extensions``.
    """
    folder = Path(folder)
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    if not folder.is_dir():
        raise ImagePairError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)
    if not files:
        raise ImagePairError(f"empty folder: no images with extensions {sorted(exts)} in {folder}")
    return files


def _by_stem(files: list[Path], folder: Path) -> dict[str, Path]:
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise ImagePairError(f"ambiguous stem {file.stem!r} in {folder}: {stems[file.stem].name} and {file.name}")
        stems[file.stem] = file
    return stems


def match_pairs(ir_dir: str | os.PathLike, vis_dir: str | os.PathLike, *, strict: bool = True,
                extensions: Sequence[str] = IMAGE_EXTENSIONS
                ) -> list[tuple[str, Path, Path]] | tuple[list[tuple[str, Path, Path]], list[Path]]:
    """Pair the images of two folders by file stem (extensions may differ, e.g. ``a.png`` with ``a.jpg``).

    Returns:
        ``[(stem, ir_path, vis_path), ...]`` sorted by stem. With ``strict=False`` returns
        ``(pairs, unmatched)`` where ``unmatched`` lists the files that have no partner.

    Raises:
        ImagePairError: (strict) a file has no partner; the message names it and the folder searched.
    """
    ir_dir, vis_dir = Path(ir_dir), Path(vis_dir)
    ir = _by_stem(list_images(ir_dir, extensions=extensions), ir_dir)
    vis = _by_stem(list_images(vis_dir, extensions=extensions), vis_dir)
    unmatched = sorted([p for s, p in ir.items() if s not in vis] + [p for s, p in vis.items() if s not in ir])
    if strict and unmatched:
        first = unmatched[0]
        other = vis_dir if first.parent == ir_dir else ir_dir
        more = f" (and {len(unmatched) - 1} more unmatched file(s))" if len(unmatched) > 1 else ""
        raise ImagePairError(
            f"missing partner: {first} has no file with stem {first.stem!r} in {other}{more}")
    pairs = [(stem, ir[stem], vis[stem]) for stem in sorted(ir) if stem in vis]
    return pairs if strict else (pairs, unmatched)
