"""tmpdiff: temporal mixed precision deployment for diffusion denoisers."""

__version__ = "0.1.0"
