"""bwp: background HTTP request dispatcher."""

__version__ = "0.1.0"
