"""Build, train, sample and share a GPT-style language model with PyTorch Lightning."""

__version__ = "0.1.0"
