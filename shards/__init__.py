"""Data layer: raw chest X-ray data sets -> Records -> WebDataset shards -> streamed batches."""

__version__ = "0.1.0"
