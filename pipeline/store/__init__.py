"""Zarr v3 shard stores: collect samples, write stores, read the index, stream them (the loader)."""
