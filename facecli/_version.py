"""The package version, on the ground floor: ``facecli/__init__`` and the checkpoint format
(which records it in every file) both read it, so the engine never imports the package root."""

__version__ = "0.1.0"
