"""Every setting checked in one place before a model loads: type, range and finiteness.

A settings class is a pydantic dataclass whose fields carry their constraints (the types
below); `checked` builds one and turns the first failure into one line that names the key, the
value and what it may be. Command-line flags and YAML files go through the same classes.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from .errors import CultvlmError


def settings_class(cls):
    """A dataclass whose fields are checked when one is made: no unknown keys, no NaN or
    infinity in a float, and each field's constraint (the types below)."""
    return dataclass(cls, config=ConfigDict(extra="forbid", allow_inf_nan=False))


Count = Annotated[int, Field(strict=True, gt=0)]  # strict: 4.5, "4" and true are refused
NonNegativeCount = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)
Share = Annotated[float, Field(gt=0, le=1)]  # (0, 1]
Names = Annotated[list[str], Field(min_length=1)]


def checked(cls, values: dict, source: str | None = None):
    """`cls(**values)`, or a CultvlmError: "[<source>: ]<key> must be ..., got <value>"."""
    where = f"{source}: " if source else ""
    try:
        return cls(**values)
    except ValidationError as e:
        error = e.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "unexpected_keyword_argument":
            raise CultvlmError(f"{where}unknown field {key!r}") from None
        what = {"int_type": "a whole number", "int_from_float": "a whole number", "int_parsing": "a whole number",
                "float_parsing": "a number", "float_type": "a number",
                "too_short": f"a list of at least {error.get('ctx', {}).get('min_length')} item(s)",
                }.get(error["type"], error["msg"].removeprefix("Input should be "))
        raise CultvlmError(f"{where}{key} must be {what}, got {error['input']!r}") from None
