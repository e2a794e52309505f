"""JSON on the paths that run per token and per turn: orjson (C), with the stdlib's json for
what orjson refuses, so that what reads reads as before.

`loads` is orjson's where orjson takes the text, else json's: json also reads `NaN`,
`Infinity`, numbers beyond a double (as infinity) and lone surrogates in `\\u` escapes, which
orjson refuses; an error is json's ValueError either way. One difference is left: an integer
beyond 64 bits reads as a float (json: an exact int); no count or duration a server sends is
near that.

`dumps` is compact JSON text (no spaces after `,` and `:`) with characters as they are, not
`\\u` escapes (json's ensure_ascii=False); what orjson cannot write (a lone surrogate, a
non-str key, an integer beyond 64 bits) is written by json in the same compact form. A float
NaN or infinity would be written `null` (json: `NaN`); nothing Parley writes holds one.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(obj: Any) -> str:
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
