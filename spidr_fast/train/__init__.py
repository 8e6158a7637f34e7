"""`python -m spidr_fast.train`: SpidR/DinoSR pretraining, on real speech or the built-in synthetic corpus."""
