"""The inference engine, in token ids (it knows nothing about chat text; `dsv4.chat` turns messages into
prompt ids and completion ids back into messages).

`Engine` (`dsv4.engine.engine`) is the scheduling core: continuous batching with chunked prefill over the
model's cache, stop / length handling and per-step updates (`RequestOutput`); `AsyncEngine` streams them to
asyncio consumers. The batched sampler: `SamplingParams` (one request's sampling settings), `SequenceState`
(what the sampler remembers about a request between steps) and `Sampler` (one token per request per step,
the official Exp-noise draw after penalties, temperature, min-p, top-k and top-p; see `dsv4.engine.sampling`)."""

from .engine import AsyncEngine, Engine, RequestOutput
from .sampling import SampleOutput, Sampler, SamplingParams, SequenceState, TokenLogprobs

__all__ = ["AsyncEngine", "Engine", "RequestOutput", "SampleOutput", "Sampler", "SamplingParams", "SequenceState",
           "TokenLogprobs"]
