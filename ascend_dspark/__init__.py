"""ascend-dspark: DSpark speculative decoding on Ascend NPUs, NVIDIA GPUs and CPUs."""

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name):
    """Lazy exports: importing a subpackage (e.g. the platform from ops/) stays cheap and
    free of import cycles."""
    if name == "LLM":
        from ascend_dspark.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from ascend_dspark.spec.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
