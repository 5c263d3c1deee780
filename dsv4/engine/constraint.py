"""Grammar-constrained decoding, in token ids: which tokens a request may sample next.

The grammar engine is llguidance (guidance-ai; the structured-output backend of vLLM, SGLang and llama.cpp). It
was chosen over xgrammar because it reads a `tokenizers` tokenizer.json as it is (no `transformers` at run time),
has no Python dependencies, takes Lark grammars that embed JSON schemas (`%json {...}`) and name tokens by id
(`<[128822]>`), so one grammar can say "free reasoning, then `</think>`, then a DSML tool call whose arguments
satisfy the tool's schema", and it rolls back consumed tokens, which speculative decoding needs. Its token masks
are computed in Rust without the GIL.

* `GrammarTokenizer`: llguidance's view of the model's vocabulary, built once per tokenizer (~0.6 s for V4's
  129,280 tokens) and shared by every grammar of a server.
* `Grammar`: one compiled grammar (a Lark text; chat-level grammars come from `dsv4.chat.grammars`), immutable,
  shared by the choices of a request. Invalid grammars raise `GrammarError` when built.
* `GrammarState`: one sequence's position in its grammar (an `LLMatcher`), owned by the sampler's
  `SequenceState`: `mask` gives the allowed next tokens (optionally after some tokens not yet committed, for
  speculative drafts), `consume` commits a sampled token. A state that the grammar cannot continue (which
  masking prevents) or that finished allows only EOS, so the request ends.

The engine knows nothing of what a grammar means; it applies masks in `dsv4.engine.sampling.process_logits`
(before penalties and temperature, as vLLM applies its grammar bitmask) and commits tokens in `Sampler.record`.
llguidance is imported where a tokenizer or a grammar is built, not with the engine: unconstrained requests run
where it is not installed (the offline GPU machine lacks it unless its wheel is carried; `benchmarks/gpu_run.sh`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (the message is llguidance's)."""


class GrammarTokenizer:
    """The vocabulary a grammar is matched against: `tokenizer_json` (a tokenizer.json's text, e.g.
    `tokenizers.Tokenizer.to_str()`), `vocab_size` the model's logit width (ids past the tokenizer's are never
    allowed) and the ids that end a sequence."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int]) -> None:
        if not eos_ids:
            raise ValueError("a grammar tokenizer needs the EOS id(s)")
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        import llguidance

        self.ll = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=self.eos_ids)


class Closer(Protocol):
    """Finishes what a grammar describes before the token budget ends (the chat layer's closers,
    `dsv4.chat.closing`, close JSON and end reasoning). In a sequence's last `window(max_tokens)` tokens the
    sampler calls it with the tokens generated so far and the grammar's allowed mask [V]; a token it returns
    (one the mask allows) is then the only one left to sample, None leaves the choice to the model."""

    def window(self, max_tokens: int) -> int: ...

    def __call__(self, tokens: Sequence[int], allowed: Tensor) -> int | None: ...


class Grammar:
    """A compiled grammar over `tokenizer` (Lark syntax as llguidance reads it), with an optional `Closer`. It holds
    llguidance objects, which do not pickle: `spec` is what travels instead (`dsv4.engine.lockstep`)."""

    def __init__(self, tokenizer: GrammarTokenizer, lark: str, closer: Closer | None = None,
                 spec: object = None) -> None:
        self.tokenizer = tokenizer
        self.lark = lark
        self.closer = closer
        # plain data its maker rebuilds it from in another process (a model-parallel follower rank)
        self.spec = spec
        import llguidance

        self._compiled = llguidance.LLMatcher.grammar_from_lark(lark)
        problem = llguidance.LLMatcher.validate_grammar(self._compiled, tokenizer.ll)
        if problem and not problem.startswith("WARNING"):
            # the first line says what is wrong ("at 6(10): failed to compile JSON schema: ..."); the rest quotes
            # the grammar, which the client never wrote
            raise GrammarError(re.sub(r"^at \d+\(\d+\): ", "", problem.strip().splitlines()[0]))

    def start(self) -> GrammarState:
        """A fresh state at the grammar's start (one per sequence)."""
        return GrammarState(self)

    def __repr__(self) -> str:
        return f"Grammar({len(self.lark)} chars)"


class GrammarState:
    """One sequence's position in a grammar."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        import llguidance

        self.matcher = llguidance.LLMatcher(grammar.tokenizer.ll, grammar._compiled, log_level=0)

    def mask(self, vocab: int, device: torch.device | str, ahead: Sequence[int] = ()) -> Tensor:
        """bool [vocab]: the tokens allowed after the committed ones and then `ahead` (tokens not committed:
        speculative drafts; the state is unchanged afterwards). A state the grammar cannot continue allows EOS
        only."""
        taken = self.matcher.try_consume_tokens(list(ahead)) if ahead else 0
        try:
            if taken < len(ahead) or self.matcher.is_error():
                return self._eos_only(vocab, device)
            bitmask = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)  # token t: bit t % 8 of byte t // 8
        finally:
            if taken:
                self.matcher.rollback(taken)
        allowed = np.zeros(vocab, dtype=np.uint8)
        n = min(vocab, 8 * bitmask.size)
        allowed[:n] = np.unpackbits(bitmask, count=n, bitorder="little")  # C speed: ~30 us for V4's vocabulary
        if not allowed.any():
            return self._eos_only(vocab, device)
        return torch.from_numpy(allowed.view(np.bool_)).to(device)

    def consume(self, token: int) -> bool:
        """Commit a sampled token; False if the grammar does not allow it (the state then allows EOS only)."""
        return self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and takes nothing more (EOS is all that is left)."""
        return self.matcher.is_stopped()

    def _eos_only(self, vocab: int, device: torch.device | str) -> Tensor:
        out = torch.zeros(vocab, dtype=torch.bool, device=device)
        out[[t for t in self.grammar.tokenizer.eos_ids if t < vocab]] = True
        return out
