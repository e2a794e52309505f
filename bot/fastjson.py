"""JSON read per token and per turn: orjson (C), with the stdlib's json for what orjson refuses,
so that what reads reads as before.

`loads` is orjson's where orjson takes the text, else json's: json also reads `NaN`,
`Infinity`, numbers beyond a double (as infinity) and lone surrogates in `\\u` escapes, which
orjson refuses; an error is json's ValueError either way. One difference is left: an integer
beyond 64 bits reads as a float (json: an exact int); no count or duration a server sends is
near that.

Writing stays json's (`json.dumps`): what Parley writes per turn is a few small entries, where
orjson saves microseconds, and json's form is the one every stored entry already has.
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
