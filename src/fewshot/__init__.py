"""fewshot: unsupervised pre-training for few-shot learning."""

from fewshot.version import __version__

# Registers the built-in methods' config classes and data sources, so any recipe validates wherever
# it is loaded (timm's package imports its model registry the same way).
import fewshot.data.registry  # noqa: E402,F401
import fewshot.methods  # noqa: E402,F401

__all__ = ["__version__"]
