"""Reading a segmentation output back: SQL over its tables (``query``) and pictures (``show``)."""
