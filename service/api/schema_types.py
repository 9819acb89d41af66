"""Number types shared by the wire schemas, written so that the published JSON Schema states
exactly what validation accepts.

* Integers: JSON Schema counts ``24753.0`` as an integer (a number with a zero fractional part),
  so every integer field accepts such a float and turns it into the int. ``24753.5``, ``"24753"``
  and ``true`` stay errors: the models are strict.
* Floats: finite and bounded on both sides. ``1e999`` parses as infinity, which would otherwise
  pass a bare ``ge=0``; NaN and infinities are refused everywhere.

Constraints go *before* the :data:`INTEGRAL` validator in each ``Annotated``: after it, pydantic
writes them into the schema as ``ge``/``le`` (not JSON Schema keywords, so schema readers ignore
them) instead of ``minimum``/``maximum``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field


def _integral(value: object) -> object:
    """A float with no fractional part is that integer (JSON Schema's definition)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


INTEGRAL = BeforeValidator(_integral)

#: The largest integer every JSON client represents exactly (IEEE doubles, JavaScript's
#: Number.MAX_SAFE_INTEGER). Bounds at or above 2^53 are ambiguous on the wire: 2^63 - 1 written
#: by a client that uses doubles arrives as 2^63.
MAX_EXACT_INT = 2**53 - 1
#: Token ids are int32 in every tokenizer Longhaul reads; the model's vocabulary is the real
#: bound, checked against the served model (400 ``invalid_input``).
MAX_TOKEN_ID = 2**31 - 1
#: A temperature above this samples a trained model's next token as good as uniformly: the bound
#: exists so the range is finite, not to forbid anything useful.
MAX_TEMPERATURE = 100.0

PositiveInt = Annotated[int, Field(ge=1, le=MAX_EXACT_INT), INTEGRAL]
#: A new-token count that may be 0 (``echo`` scoring generates nothing).
MaxTokens = Annotated[int, Field(ge=0, le=MAX_EXACT_INT), INTEGRAL]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), INTEGRAL]
TopK = Annotated[
    int,
    Field(ge=0, le=MAX_TOKEN_ID, description="keep the k most probable tokens; 0 = all"),
    INTEGRAL,
]
Seed = Annotated[
    int,
    Field(ge=0, le=MAX_EXACT_INT, description="same seed + same request = same text"),
    INTEGRAL,
]
Temperature = Annotated[
    float,
    Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy"),
]
TopP = Annotated[
    float, Field(gt=0, le=1, allow_inf_nan=False, description="nucleus mass in (0, 1]")
]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
