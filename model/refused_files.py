"""What a file is that ``torch.load(weights_only=True)`` refused, in a few words for a one-line error.

``checkpoint.safe_load`` asks ``describe_unloadable`` when torch refuses a file: it is known by
its first bytes (an image, a text page, a Git LFS pointer, a safetensors file, ...), as a
damaged torch zip, or as a pickle that needs code (a whole model, or worse), which is named from
torch's refusal and never run. torch's own text is passed on only through ``torch_says``: one
line, without terminal colour codes, and without its advice to load the file unsafely.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's sentences that advise loading unsafely or allowlisting the code: never passed on.
_UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|trust", re.IGNORECASE)
_LEGACY_TORCH = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch.save's old header
_IMAGES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
           (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_OTHER_FORMATS = ((b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
                  (b"\x93NUMPY", "a NumPy array file (.npy)"),
                  (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?)"))


def what_is(source: object, error: BaseException) -> str:
    """What ``source`` (a path or an open file) is, that torch refused with ``error``."""
    try:
        with open(source, "rb") if isinstance(source, (str, Path)) else nullcontext(source) as file:
            return describe_unloadable(file, error)
    except (OSError, AttributeError, ValueError):  # unreadable again, or not seekable: torch's word, cleaned
        return torch_says(error)


def describe_unloadable(file: BinaryIO, error: BaseException) -> str:
    """What ``file`` is, in a few words for a one-line error, given that ``torch.load(weights_only=True)``
    refused it with ``error``: known by its first bytes (an image, text, ...), a damaged torch file, or a
    pickle that needs code (a whole model, or worse), which is named and never run."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    head = file.read(512)
    if size == 0:
        return "an empty file (0 bytes)"
    known = _format_of(head, size)
    if known:
        return known
    if head.startswith(b"PK"):
        return _describe_zip(file, head, error)
    needed = refused_global(error)
    if needed:
        return _needs_code(needed)
    if head.startswith(_LEGACY_TORCH):
        return f"an old-format (non-zip) torch file that does not load ({torch_says(error)})"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle that pickle.dump wrote, not torch.save"
    text = _text_of(head)
    if text is not None:
        return _describe_text(text, cut=size > len(head))
    return f"not a torch file, nor a kind maskray recognises (it starts with bytes {head[:8].hex(' ')})"


def _format_of(head: bytes, size: int) -> str | None:
    for magic, kind in _IMAGES:
        if head.startswith(magic):
            return f"a {kind} image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:2] == b"BM" and int.from_bytes(head[2:6], "little") == size:  # BMP's header holds its file size
        return "a BMP image"
    for magic, kind in _OTHER_FORMATS:
        if head.startswith(magic):
            return kind
    header = int.from_bytes(head[:8], "little")  # safetensors: the length of a JSON header, then the header
    if head[8:10] == b'{"' and 8 + header <= size:
        return "a safetensors file, which maskray does not read (it reads torch.save files)"
    return None


def _describe_zip(file: BinaryIO, head: bytes, error: BaseException) -> str:
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        # torch's files are zips whose first entry is <name>/data.pkl.
        if b"data.pkl" in head[:200]:
            return "a truncated or damaged torch file (its zip archive cannot be read: a download or copy cut short?)"
        return "a damaged zip archive"
    if any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names):
        return ("a TorchScript archive (torch.jit.save), which maskray does not load; save the model's "
                "state_dict() with torch.save instead")
    if not any(name.endswith("/data.pkl") for name in names):
        return f"a zip archive that is not a torch file (it holds {shorten(', '.join(map(printable, names)), 80)})"
    needed = refused_global(error)
    return _needs_code(needed) if needed else f"a torch file that does not load ({torch_says(error)})"


def refused_global(error: BaseException) -> str | None:
    """The ``module.name`` that torch's weights-only unpickler refused to import, if that was the refusal."""
    match = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
    return match[1].rstrip(".") if match else None


def _needs_code(name: str) -> str:
    module, _, qualname = name.rpartition(".")
    # A class of a models module: torch.save(model) pickled the object, not its weights.
    if qualname[:1].isupper() and any(part in ("nn", "models") or "model" in part for part in module.split(".")):
        if module.startswith("maskray."):
            return f"a whole pickled model ({qualname} object); save it with model.save(path) instead"
        return (f"a whole pickled model ({qualname} object); save its state_dict() instead: "
                "torch.save(model.state_dict(), path)")
    return f"pickled Python objects that need code to load ({shorten(name, 80)}), which maskray never runs"


def _text_of(head: bytes) -> str | None:
    """``head`` as text if it is text (UTF-8, printable), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut by the end of the head
            return None
        text = head[: error.start].decode("utf-8")
    if not text.strip() or sum(c.isprintable() or c in "\t\r\n" for c in text) < 0.95 * len(text):
        return None
    return text


def _describe_text(text: str, cut: bool) -> str:
    start = " ".join(printable(text).split())
    quoted = f"'{shorten(start, 48, cut)}'"
    lowered = start.lower()
    if lowered.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the weights it points to (git lfs pull fetches them)"
    if lowered.startswith(("<!doctype html", "<html")):
        return f"a text file, an HTML page starting {quoted} (a download that got an error page?)"
    return f"a text file starting {quoted}"


def torch_says(error: BaseException, limit: int = 160) -> str:
    """torch's message in one short line: no terminal colour codes, none of its advice to load unsafely."""
    text = " ".join(_ANSI.sub("", str(error)).split())
    kept = " ".join(s for s in re.split(r"(?<=[.!?:])\s+", text) if not _UNSAFE_ADVICE.search(s))
    return f"{type(error).__name__}: {shorten(kept, limit)}" if kept else type(error).__name__


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)


def shorten(text: str, limit: int, cut: bool = False) -> str:
    """``text`` in at most ``limit`` characters, cut at a space where one is near, and then (or if it
    was ``cut`` already) ending in "..."."""
    if len(text) <= limit and not cut:
        return text
    if len(text) <= limit - 3:
        return text + "..."
    kept = text[: limit - 3]
    if " " in kept[limit // 2 :]:
        kept = kept.rsplit(" ", 1)[0]
    return kept.rstrip(" ,;") + "..."
