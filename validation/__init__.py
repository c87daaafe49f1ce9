"""Correctness against the Hugging Face transformers reference."""
