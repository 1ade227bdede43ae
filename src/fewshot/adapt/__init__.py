"""Adapting a pre-trained encoder with a few labels: probes, fine-tuning, LoRA, adapters, (IA)³,
prompts, and PEFT's methods on Hugging Face models; fitting one few-shot task; adapter files saved
apart from the frozen base. A base maps images or texts to r: every method, head and file is shared.

    from fewshot.adapt import adapt, merge, unmerge
    model = adapt(copy.deepcopy(encoder), "lora", {"r": 4, "alpha": 8})   # only A, B train
    merge(model)                                                           # W₀ + (α/r)·BA, no extra cost
"""

from fewshot.adapt.files import load_adapter, save_adapter
from fewshot.adapt.fitting import Adaptation, AdaptSettings, fit_classifier, run_adaptation
from fewshot.adapt.heads import AdaptedClassifier, CosineHead
from fewshot.adapt.inject import count_trainable, merge, trainable_parameters, unmerge
from fewshot.adapt.registry import ADAPT_METHODS, AdaptMethod, adapt, adapt_method_names, get_adapt_method

__all__ = [
    "ADAPT_METHODS",
    "AdaptMethod",
    "AdaptSettings",
    "Adaptation",
    "AdaptedClassifier",
    "CosineHead",
    "adapt",
    "adapt_method_names",
    "count_trainable",
    "fit_classifier",
    "get_adapt_method",
    "load_adapter",
    "merge",
    "run_adaptation",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]
