"""nanoseek: a compact stack for DeepSeek-style reasoning models (MLA, DeepSeekMoE, MTP)."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import nanoseek` (and the CLI's --help) stays fast.
    if name in ("ModelConfig", "PRESETS"):
        from . import config

        return getattr(config, name)
    if name == "Transformer":
        from .model import Transformer

        return Transformer
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")


__all__ = ["ModelConfig", "PRESETS", "Transformer", "__version__"]
