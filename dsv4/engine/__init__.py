"""The inference engine, in token ids (it knows nothing about chat text; `dsv4.chat` turns messages into
prompt ids and completion ids back into messages).

It will hold the per-request scheduling (continuous batching of prefill and decode over the model's cache),
stop / length handling and streaming of sampled tokens. What exists so far is the batched sampler:
`SamplingParams` (one request's sampling settings), `SequenceState` (what the sampler remembers about a request
between steps) and `Sampler` (one token per request per step, the official Exp-noise draw after penalties,
temperature, min-p, top-k and top-p; see `dsv4.engine.sampling`)."""

from .sampling import SampleOutput, Sampler, SamplingParams, SequenceState, TokenLogprobs

__all__ = ["SampleOutput", "Sampler", "SamplingParams", "SequenceState", "TokenLogprobs"]
