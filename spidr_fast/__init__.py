"""spidr_fast: fast, exact pretraining of SpidR and DinoSR speech models, and fused ops for self-supervised speech."""

__version__ = "0.1.0"
