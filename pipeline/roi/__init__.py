"""Atlases, ROI series extraction and diffusion-map gradients (pure library code over pipeline.core)."""
