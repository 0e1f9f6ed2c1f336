"""Limits on what an input may make maskray do, shared by every job (and light to import: the
settings that the command line is made from use them)."""

# About 4x a 48-megapixel photo: a decompression bomb (a small file that claims a huge image)
# is refused before any pixel is decoded. Configurable per job (``--max-pixels``).
DEFAULT_MAX_PIXELS = 200_000_000
