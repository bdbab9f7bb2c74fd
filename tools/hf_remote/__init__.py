"""Hugging Face remote code of the structured export (self-contained: copied beside the weights)."""
