"""A request body decoded as JSON, safe against hostile input: bounded structure and valid Unicode in every string.

`plumbing.read_json` (the one body reader of every protocol) enforces the size limit while it reads, then calls
`decode` (in a worker thread for a big body). A `RequestError(400)` names what is wrong; nothing here raises
anything else, whatever the bytes.

Structure, checked on the raw bytes before parsing, with C-speed byte operations only:
* nesting: `json.loads` recurses once per level and stops with a RecursionError near Python's recursion limit
  (1,000), and what runs after it (pydantic, the prompt encoder's `json.dumps` of tool schemas) recurses too. The
  depth is measured without recursion: once string contents are blanked out (a bracket inside a string is text),
  one pass over the brackets keeps the running depth.
* counts: `json.loads` holds the GIL for its whole run, so even in a worker thread it stalls the event loop: 28 MB
  of `[[],[],...]` parses for 6 s (every list feeds the cyclic GC), 32 MB of `[0,0,...]` for 1.2 s. Capping
  arrays + objects, strings and array items / object members keeps any body to ~0.2 s of parsing, above what
  real requests hold (a 1M-token prompt sent as token ids is 1M items; a session filling a 1M-token context with
  50-token blocks ~20,000 blocks, ~200,000 strings with the keys).
Blanking strings: escaped backslashes and quotes are replaced first (left to right, as JSON reads them), so every
`"` left delimits a string and splitting on it puts the text outside strings at even positions. The cheap counts
come first (`bytes.count`, which may over-count what sits inside strings); the split runs only when they exceed a
limit, and never on more strings than the string cap allows.

Unicode: the bytes are decoded strictly as UTF-8, which JSON over a network must be (RFC 8259; the byte-level
checks above assume it): bad UTF-8, UTF-16, or an encoded surrogate is a 400 (`json.loads` of bytes would accept
the last two). A JSON escape can still spell a lone UTF-16 surrogate (`"\\ud800"`), which `json.loads` turns into
a `str` no UTF-8 writer (the tokenizer, a response body) accepts. Only an escape can do that, so when the raw body
holds no `\\uD800`-`\\uDFFF` escape (nearly always) nothing more is done; otherwise a non-recursive walk over the
decoded value names a string or key holding one (exact, where a scan of the raw bytes would have to tell lone
surrogates from valid pairs and escaped backslashes).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .request import RequestError

# serde_json's default recursion limit, which servers built on it keep (DeepSeek's 400s carry serde's messages):
# deeper than any real request (a tool schema 40 objects deep is ~90 levels), far below where Python's recursion stops
MAX_DEPTH = 128
MAX_CONTAINERS = 2**18  # arrays and objects: 262,144 lists of 7 ints parse in ~0.15 s
MAX_STRINGS = 2**20  # strings, keys included: 1M parse in ~20 ms (and split out of the bytes in ~0.2 s)
MAX_ITEMS = 2**21  # array items and object members past each container's first (commas): 2M ints parse in ~90 ms

_OPENING = frozenset(b"[{")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode(raw: bytes) -> Any:
    """The JSON value of a request body, or RequestError(400): not JSON (also for bad UTF-8 or a number past
    Python's digit limit), structure past the limits above, or a string holding a lone surrogate."""
    check_structure(raw)
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(400, f"the request body is not valid JSON: {err}") from None
    if _SURROGATE_ESCAPE.search(raw):
        where = lone_surrogate_path(value)
        if where is not None:
            raise RequestError(400, f"{where or 'the request body'}: invalid Unicode: a string holds a lone UTF-16 "
                               "surrogate (an unpaired \\ud800-\\udfff escape)", param=where or None)
    return value


def check_structure(raw: bytes) -> None:
    """RequestError(400) when JSON text `raw` nests deeper than MAX_DEPTH or holds more containers, strings or
    items than their caps (see the module docstring). Text that is not JSON may pass or fail: `json.loads`
    rejects it anyway."""
    text = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")  # every '"' left starts or ends a string
    strings = text.count(b'"') // 2
    if strings > MAX_STRINGS:
        raise RequestError(400, f"the request body holds {strings:,} strings; at most {MAX_STRINGS:,} are allowed")
    brackets = text.count(b"[") + text.count(b"{")
    commas = text.count(b",")
    if brackets <= MAX_DEPTH and commas <= MAX_ITEMS:
        return  # so few cannot nest too deep nor pass a cap
    outside = b"".join(text.split(b'"')[0::2])  # the text outside strings
    brackets = outside.count(b"[") + outside.count(b"{")
    if brackets > MAX_CONTAINERS:
        raise RequestError(400, f"the request body holds {brackets:,} arrays and objects; at most "
                           f"{MAX_CONTAINERS:,} are allowed")
    commas = outside.count(b",")
    if commas > MAX_ITEMS:
        raise RequestError(400, f"the request body holds {commas:,} array items and object members past the first "
                           f"of each; at most {MAX_ITEMS:,} are allowed")
    depth = 0
    for byte in outside.translate(None, _NOT_BRACKETS):
        depth += 1 if byte in _OPENING else -1
        if depth > MAX_DEPTH:
            raise RequestError(400, f"the request body nests JSON arrays and objects more than {MAX_DEPTH} levels "
                               "deep")


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in `text` (a `str` from JSON escapes that is not valid Unicode), or
    None. Paired surrogates never reach a `str`: `json.loads` joins them into one character."""
    match = _SURROGATE.search(text)
    return match.start() if match else None


def lone_surrogate_path(value: Any) -> str | None:
    """The dotted path (`messages.0.content`; "" for the value itself) of a string or object key in a decoded JSON
    value that holds a lone surrogate, or None when none does. A walk with its own stack (no recursion, whatever
    the depth); each entry's path is a (parent path, key) link, built in O(1) and spelled out only for the hit."""
    stack: list[tuple[Any, tuple | None]] = [(value, None)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if lone_surrogate(node) is not None:
                return _spell(path)
        elif isinstance(node, dict):
            for key, item in node.items():
                if lone_surrogate(key) is not None:
                    return _spell((path, key.encode("utf-8", "backslashreplace").decode("utf-8")))
                stack.append((item, (path, key)))
        elif isinstance(node, list):
            stack.extend((item, (path, str(i))) for i, item in enumerate(node))
    return None


def _spell(path: tuple | None) -> str:
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    return ".".join(reversed(keys))
