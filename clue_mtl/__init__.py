"""clue-mtl: one shared encoder, three task heads, for the CLUE multi-task challenge."""

__version__ = "0.1.0"
