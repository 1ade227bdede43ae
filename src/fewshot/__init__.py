"""fewshot: unsupervised pre-training for few-shot learning."""

__version__ = "0.1.0"
