"""facecli: train and evaluate margin-loss face-recognition models."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu"):
    """Rebuild the embedding network stored in a facecli checkpoint (see ``facecli.engine.checkpoint``)."""
    from facecli.engine.checkpoint import load_model as _load_model

    return _load_model(path, device=device)
