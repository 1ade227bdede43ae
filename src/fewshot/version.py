"""The package version, on the ground floor so files can record what wrote them."""

__version__ = "0.1.0"
