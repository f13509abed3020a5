"""ascend-dspark: DSpark speculative decoding on Ascend NPUs, NVIDIA GPUs and CPUs."""

from ascend_dspark.spec.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":                     # lazy: importing the package stays cheap
        from ascend_dspark.engine.llm import LLM

        return LLM
    raise AttributeError(name)
