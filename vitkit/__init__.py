"""vitkit: vision transformers from self-supervised pretraining to detection."""

__version__ = "0.1.0"
