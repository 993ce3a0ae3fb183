"""``python -m moeconvert`` (also what ``torchrun ... -m moeconvert quantize ...`` runs on every rank)."""

from .cli import main

main()
