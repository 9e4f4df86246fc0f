"""neurocurate: BIDS dataset to curated shards and a pretrained brain foundation model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neurocurate")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
