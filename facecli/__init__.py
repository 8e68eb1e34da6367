"""facecli: train and evaluate margin-loss face-recognition models.

Glossary (the words the code uses, one meaning each):

- **net**: the embedding network, image batch -> embedding (``backbones.EmbeddingNet``:
  a backbone plus its embedding layer).
- **head**: a margin head, class weights that turn embeddings into margin logits
  (``losses.MarginHead``: CosFace, ArcFace, SphereFace, CurricularFace, AdaFace, MagFace,
  ElasticFace). A run's loss
  module is stored as ``head``/``head_state`` in checkpoints whatever it is.
- **loss**: what training minimises, embeddings and labels in, a scalar out
  (``losses.Loss``: a head with cross-entropy, or FaceNet's triplet loss). It declares
  its hyper-parameters and capabilities; the engine asks for those, never for a class.
- **model**: the *name* of a registered loss (``arcface``, ``facenet``, a plugin's), as
  in ``facecli train MODEL`` and ``TrainConfig.model``; a *trained* model is a net with
  its preprocessing and threshold, read from a checkpoint or an ONNX export
  (``models.load_model``).
- **run**: one training, the folder ``<checkpoints>/<model>/<run-name>/`` with its
  checkpoints, ``config.yaml``/``config.json``, ``metrics.jsonl`` and pictures
  (``engine.runs``).
- **checkpoint**: one self-describing ``.pt`` file of a run, a plain dict loaded with
  ``weights_only=True`` (format: ``engine.checkpoint``; a run's files, links and
  rotation: ``engine.checkpoint_manager``).
- **step**: one optimizer update on a global batch (``engine.step``); the loop over
  epochs and steps is ``engine.trainer.Trainer``.
"""

from facecli._version import __version__

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu"):
    """A trained model from a checkpoint (.pt) or its ONNX export (.onnx): ``model.embed(images_or_paths)``
    gives unit embeddings with the model's own preprocessing and flip (see ``facecli.models``)."""
    from facecli.models import load_model as _load_model

    return _load_model(path, device=device)
