"""Per-model token prices and the cost of a request (USD).

Prices are USD per million tokens, DeepSeek's launch prices (serving.md 1.1). A request's cost is
`hit * cache_hit + miss * input + output * output` per million, with hit = prompt tokens resumed from
the prefix cache and miss = the rest of the prompt; reasoning tokens are output tokens.

`PriceTable.load(path)` overrides or adds models from a JSON file:
`{"my-model": {"input": 0.14, "cache_hit": 0.028, "output": 0.28}, ...}`; the key `"default"` sets the
price of served names the table does not list (the Flash price unless overridden), so a local model
served under its own name is billed like Flash unless told otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

PER_MILLION = 1_000_000


@dataclass(frozen=True)
class Price:
    input: float  # cache miss, USD per million prompt tokens
    cache_hit: float  # USD per million prompt tokens read from the prefix cache
    output: float  # USD per million completion tokens (reasoning included)

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        miss = prompt_tokens - cached_tokens
        return (cached_tokens * self.cache_hit + miss * self.input + completion_tokens * self.output) / PER_MILLION


FLASH = Price(input=0.14, cache_hit=0.028, output=0.28)
PRO = Price(input=1.74, cache_hit=0.145, output=3.48)


def _default_prices() -> dict[str, Price]:
    return {"deepseek-v4-flash": FLASH, "deepseek-v4-pro": PRO, "default": FLASH}


@dataclass
class PriceTable:
    prices: dict[str, Price] = field(default_factory=_default_prices)

    def price(self, model: str) -> Price:
        """The model's price; a name the table does not list pays the "default" entry."""
        return self.prices.get(model) or self.prices.get("default") or FLASH

    def cost(self, model: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        return self.price(model).cost(prompt_tokens, cached_tokens, completion_tokens)

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """The launch table updated with the models in a JSON file (see the module docstring). Raises
        ValueError with the file name for a malformed file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"price file {path}: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"price file {path}: expected an object of model -> prices")
        table = cls()
        for name, entry in data.items():
            try:
                if set(entry) - {"input", "cache_hit", "output"}:
                    raise TypeError("unknown keys")
                values = {k: float(entry[k]) for k in ("input", "cache_hit", "output")}
                if any(v < 0 for v in values.values()):
                    raise ValueError("negative price")
            except (TypeError, KeyError, ValueError) as err:
                raise ValueError(f"price file {path}: model {name!r} needs input, cache_hit and output "
                                 f"as numbers >= 0 ({err})") from None
            table.prices[name] = Price(**values)
        return table
