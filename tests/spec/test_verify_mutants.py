"""ascend_dspark.spec.verify: properties the mutation run (`make mutants`) found no test
pinning. tests/mutants/survivors.md lists which mutant each test kills.
"""

from __future__ import annotations

import torch

from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams
from ascend_dspark.spec.verify import verify


def test_verify_stays_on_the_input_device():
    """A sampled batch on the meta device: every tensor verify makes (noise positions
    included) must follow the inputs' device, or mixing raises."""
    meta = torch.device("meta")
    batch, k, vocab = 2, 3, 6
    sampling = SamplingBatch([SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=0.0)], meta)
    res = verify(torch.empty(batch, k + 1, vocab, device=meta), torch.empty(batch, k, dtype=torch.long, device=meta),
                 torch.empty(batch, k, vocab, device=meta), torch.empty(batch, dtype=torch.long, device=meta),
                 sampling, torch.empty(batch, dtype=torch.long, device=meta))
    assert res.num_accepted.device == meta and res.tokens.device == meta
    assert res.num_accepted.shape == (batch,) and res.tokens.shape == (batch, k + 1)
