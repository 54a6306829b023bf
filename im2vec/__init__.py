"""im2vec: teach a CNN to tag images from noisy, user-written tags (deep-and-wide negative sampling)."""

__version__ = "0.1.0"
__all__ = ["Tagger", "__version__"]


def __getattr__(name: str):
    # lazy: `import im2vec` stays light (no torch); im2vec.Tagger imports the model on first use
    if name == "Tagger":
        from im2vec.use.tagger import Tagger

        return Tagger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "Tagger"])
