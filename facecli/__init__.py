"""facecli: train and evaluate margin-loss face-recognition models."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu"):
    """A trained model from a checkpoint (.pt) or its ONNX export (.onnx): ``model.embed(images_or_paths)``
    gives unit embeddings with the model's own preprocessing and flip (see ``facecli.models``)."""
    from facecli.models import load_model as _load_model

    return _load_model(path, device=device)
