"""Drafter test doubles for the engine-level tests, and the tiny setup they share.

Both doubles are real `Drafter` subclasses wrapping a real drafter (eagle3 / dflash /
dspark): the engine drives the real drafter's observe / propose through them, so the
real cache and state handling runs while the double watches.

- `ReferenceDrafter` (TEST DOUBLE, a drafter that can score): believes only what the
  engine *told* it through observe(), and drafts the reference continuation of a sequence
  it recognises exactly. Fed correctly, every planted draft is accepted at T=0; a wiring
  bug (a position too few, a wrong first token) makes it lose its place, and the loss shows
  up as acceptance, as it would with a trained draft.
- `RecordingDrafter` (TEST DOUBLE): asserts, call by call, the protocol the engine owes a
  drafter (drafters/base.py): contiguous positions, next tokens = the committed sequence
  shifted by one, counts = accepted + 1, the anchor = the last token it was told (the
  first sampled token after prefill); after the run, `check_run` compares what it was told
  with the engine's outputs and the target's own features.

A plain module (not conftest.py) so test files import it by name.
"""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters import create_drafter
from ascend_dspark.drafters.base import Drafter, DraftProposal
from ascend_dspark.cache import PagedKVCache
from tests.helpers import tiny_target

KINDS = ("eagle3", "dflash", "dspark")
MAX_K = 7                       # max_draft_tokens of every default drafter


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (several threads on a shared 2-core box crawl,
    10x slower): a test module that imports this autouse fixture runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_target(arch: str = "qwen3", vocab: int = 128):
    """A tiny float64 target (4 layers, hidden 64): argmax ties cannot flip between forwards."""
    torch.manual_seed(0)
    target, _ = tiny_target(arch, dtype=torch.float64, vocab=vocab)
    return target


def real_drafter(kind: str, target, seed: int = 1) -> Drafter:
    return create_drafter(kind, target, seed=seed).to(torch.float64)


def greedy_reference(target, prompt: list[int], n: int) -> list[int]:
    """prompt + n greedy tokens, one plain forward over the whole sequence per token (no
    speculation, no engine, no rollback: the independent reference)."""
    seq = list(prompt)
    cfg = target.config
    for _ in range(n):
        cache = PagedKVCache.contiguous(cfg.num_layers, 1, len(seq), cfg.num_kv_heads, cfg.head_dim, torch.float64, torch.device("cpu"))
        ids = torch.tensor([seq])
        with torch.inference_mode():
            out = target(ids, torch.arange(len(seq)).unsqueeze(0), cache, torch.zeros(1, dtype=torch.long),
                         torch.ones_like(ids, dtype=torch.bool))
            seq.append(int(target.logits(out.hidden[0, -1]).argmax()))
    return seq


def target_features(target, seq: list[int], layer_ids) -> torch.Tensor:
    """[len(seq), m*H] target features of a committed sequence, from one plain forward."""
    cfg = target.config
    cache = PagedKVCache.contiguous(cfg.num_layers, 1, len(seq), cfg.num_kv_heads, cfg.head_dim, torch.float64, torch.device("cpu"))
    ids = torch.tensor([seq])
    with torch.inference_mode():
        out = target(ids, torch.arange(len(seq)).unsqueeze(0), cache, torch.zeros(1, dtype=torch.long),
                     torch.ones_like(ids, dtype=torch.bool), capture_layers=tuple(layer_ids))
    return out.features[0]


class _Wrapper(Drafter):
    """Delegates the protocol to `inner` (a submodule, so dtype/device are the inner's)."""

    def __init__(self, inner: Drafter) -> None:
        super().__init__(inner.config, inner.target)
        self.inner = inner

    @property
    def lookahead(self) -> int:
        return self.inner.lookahead

    def allocate(self, *args, **kwargs) -> None:
        self.inner.allocate(*args, **kwargs)
        self.cache = self.inner.cache

    def attach(self, *args, **kwargs) -> None:
        self.inner.attach(*args, **kwargs)
        self.cache = self.inner.cache

    def reset(self, slot_ids):
        self.inner.reset(slot_ids)

    def observe(self, slot_ids, features, positions, next_tokens, counts, ctx=None):
        self.inner.observe(slot_ids, features, positions, next_tokens, counts, ctx)

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        return self.inner.propose(slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx)


class ReferenceDrafter(_Wrapper):
    """TEST DOUBLE that scores: drafts the reference continuation of the sequence it was told.

    Per slot it keeps the tokens observe() told it (`next_tokens[i]` is the token at
    `positions[i] + 1`). In propose it ignores the engine's anchor position, as a real
    recurrent drafter does (Eagle3 drafts from its last observed state): it drafts for the
    positions after the last token it was told, and only when the told tokens equal, at
    every told position, one of the `references` (prompt + continuation) does it plant that
    reference's tokens there, each with probability `p_plant` (one-hot q); elsewhere the
    real drafter's draft (and q) stays. So with p_plant = 1 at T=0 every draft is accepted
    when the engine feeds it right, and hardly any when it does not.
    """

    def __init__(self, inner: Drafter, references: list[list[int]], p_plant: float = 1.0, seed: int = 3) -> None:
        super().__init__(inner)
        self.references = [list(r) for r in references]
        self.p_plant = p_plant
        self.gen = torch.Generator().manual_seed(seed)
        self.told: dict[int, dict[int, int]] = {}
        self.raw_proposals: list[DraftProposal] = []      # the real drafter's, before planting

    def reset(self, slot_ids):
        for s in slot_ids.tolist():
            self.told[s] = {}
        super().reset(slot_ids)

    def observe(self, slot_ids, features, positions, next_tokens, counts, ctx=None):
        for b, s in enumerate(slot_ids.tolist()):
            for i in range(int(counts[b])):
                self.told[s][int(positions[b, i]) + 1] = int(next_tokens[b, i])
        super().observe(slot_ids, features, positions, next_tokens, counts, ctx)

    def _reference_for(self, told: dict[int, int]) -> list[int] | None:
        for ref in self.references:
            if all(p < len(ref) and ref[p] == t for p, t in told.items()):
                return ref
        return None

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        proposal = super().propose(slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx)
        self.raw_proposals.append(proposal)
        tokens, probs = proposal.tokens.clone(), proposal.probs.clone()
        for b, s in enumerate(slot_ids.tolist()):
            told = self.told[s]
            ref = self._reference_for(told) if told else None
            if ref is None:
                continue
            start = max(told) + 1                       # first position it has not been told
            for k in range(num_tokens):
                if start + k < len(ref) and torch.rand((), generator=self.gen) < self.p_plant:
                    tokens[b, k] = ref[start + k]
                    probs[b, k] = 0.0
                    probs[b, k, ref[start + k]] = 1.0
        return DraftProposal(tokens=tokens, probs=probs, confidence=proposal.confidence)


class RecordingDrafter(_Wrapper):
    """TEST DOUBLE that asserts, on every engine call, what the engine feeds a drafter.

    Per slot and per request (an "episode", from reset to the next reset of the slot):
    - reset, then exactly one observe (the prefill), then propose / observe alternating;
    - observe: counts >= 1, positions contiguous and starting where the previous observe
      ended (0 at prefill; the anchor position after a verify step);
    - after a proposal, observe's next tokens are the accepted drafts then one token that
      differs from the next draft (a rejection's correction) or follows the last draft (the
      bonus): counts is exactly accepted + 1, and the last told token becomes the anchor;
    - propose: the anchor position is where observe ended, the anchor is the last token the
      engine told it (after prefill: the first sampled token), 1 <= num_tokens <= K.
    `episodes` keeps, in reset order, what each request was told and the features at each
    position; `check_run` compares them with the engine's outputs.
    """

    def __init__(self, inner: Drafter, num_tokens: int) -> None:
        super().__init__(inner)
        self.num_tokens = num_tokens
        self.episodes: list[dict] = []
        self._live: dict[int, dict] = {}

    def reset(self, slot_ids):
        for s in slot_ids.tolist():
            episode = dict(slot=s, told={}, features={}, next_obs=0, proposal=None, observes=0, proposes=0)
            self._live[s] = episode
            self.episodes.append(episode)
        super().reset(slot_ids)

    def observe(self, slot_ids, features, positions, next_tokens, counts, ctx=None):
        assert slot_ids.dim() == 1 and counts.shape == slot_ids.shape
        for b, s in enumerate(slot_ids.tolist()):
            ep = self._live[s]
            c = int(counts[b])
            pos = positions[b, :c].tolist()
            told = next_tokens[b, :c].tolist()
            assert c >= 1, f"slot {s}: observe with counts {c}"
            assert pos == list(range(ep["next_obs"], ep["next_obs"] + c)), \
                f"slot {s}: observed positions {pos}, expected contiguous from {ep['next_obs']}"
            if ep["observes"] == 0:
                assert ep["proposal"] is None and pos[0] == 0, f"slot {s}: first observe must be the prefill from 0"
            else:
                assert ep["proposal"] is not None, f"slot {s}: observe without a proposal to verify"
                drafts, anchor_pos = ep["proposal"]
                assert pos[0] == anchor_pos, f"slot {s}: verify observe starts at {pos[0]}, anchor is at {anchor_pos}"
                n = c - 1                                    # accepted drafts, if counts = accepted + 1
                assert n <= len(drafts), f"slot {s}: counts {c} > K + 1 = {len(drafts) + 1}"
                assert told[:n] == drafts[:n], f"slot {s}: told {told} but drafts were {drafts} (counts {c})"
                if n < len(drafts):
                    assert told[n] != drafts[n], \
                        f"slot {s}: told {told}: draft {n} was accepted, so counts {c} is not accepted + 1"
            for p, t, i in zip(pos, told, range(c)):
                assert p + 1 not in ep["told"], f"slot {s}: position {p + 1} told twice"
                ep["told"][p + 1] = t
                ep["features"][p] = features[b, i].detach().clone()
            ep["next_obs"] = pos[-1] + 1
            ep["proposal"] = None
            ep["observes"] += 1
        super().observe(slot_ids, features, positions, next_tokens, counts, ctx)

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        assert num_tokens == self.num_tokens and 1 <= num_tokens <= self.max_draft_tokens
        for b, s in enumerate(slot_ids.tolist()):
            ep = self._live[s]
            a_pos, anchor = int(anchor_positions[b]), int(anchors[b])
            assert ep["observes"] >= 1 and ep["proposal"] is None, f"slot {s}: two proposals without an observe"
            assert a_pos == ep["next_obs"], f"slot {s}: anchor at {a_pos}, observed up to {ep['next_obs'] - 1}"
            assert ep["told"].get(a_pos) == anchor, \
                f"slot {s}: anchor {anchor} at {a_pos}, but the engine told it {ep['told'].get(a_pos)} there"
        proposal = super().propose(slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx)
        assert proposal.tokens.shape == (len(slot_ids), num_tokens)
        for b, s in enumerate(slot_ids.tolist()):
            ep = self._live[s]
            ep["proposal"] = (proposal.tokens[b].tolist(), int(anchor_positions[b]))
            ep["proposes"] += 1
        return proposal

    def check_run(self, prompts: list[list[int]], outputs, target) -> None:
        """After generate(): episode i is request i. What the drafter was told covers the
        committed sequence (prompt[1:] + output) exactly, and the features it got at every
        committed position are the target's own features of that sequence."""
        assert len(self.episodes) == len(prompts) == len(outputs)
        for i, (ep, prompt, out) in enumerate(zip(self.episodes, prompts, outputs)):
            seq = list(prompt) + list(out.token_ids)
            told = [ep["told"].get(p) for p in range(1, len(seq))]
            assert told == seq[1:], f"request {i}: told {told}, committed {seq[1:]}"
            # One propose per verify step, one observe per propose plus the prefill's.
            assert ep["proposes"] == out.stats.num_steps == ep["observes"] - 1, (i, ep["proposes"], out.stats.num_steps)
            want = target_features(target, seq, self.target_layer_ids)
            got = torch.stack([ep["features"][p] for p in range(len(seq) - 1)])
            torch.testing.assert_close(got, want[: len(seq) - 1], rtol=0, atol=1e-9)


class Launches:
    """Counts the steps an engine launches, how many of them were chained (launched with
    `ahead`, before the previous step was read), and the decode steps each launch carried
    (`steps`: several for a multi-step launch, engine/multistep.py): a spy on Engine._launch."""

    def __init__(self, engine) -> None:
        self.launched = self.chained = 0
        self.steps: list[int] = []
        launch = engine._launch

        def counted(plan, ahead=0):
            self.launched += 1
            self.chained += bool(ahead)
            launched = launch(plan, ahead)
            self.steps.append(launched.steps)
            return launched

        engine._launch = counted

    @property
    def counts(self) -> tuple[int, int]:
        return self.launched, self.chained
