"""Offline half of Longhaul: architectures, tokenizer, training, export and import.

Never imported by ``service``; the two halves meet only through ``model_store``'s on-disk format.
"""

__version__ = "0.1.0"
