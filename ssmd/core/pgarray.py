"""Parser for PostgreSQL array literals (the text output of `array_out`).

The grammar, from the PostgreSQL manual ("Arrays: Array Value Input"):

- an optional dimension prefix `[lower:upper][lower:upper]=` appears when a lower bound is not 1;
- `{` ... `}` encloses one dimension; elements are separated by `,` (every built-in type except
  `box` uses a comma, and `box[]` uses `;`);
- an element is either double-quoted (a backslash escapes the next character) or bare, where a
  bare `NULL` (any case) is SQL NULL and surrounding whitespace is not part of the value;
- `array_out` quotes an element when it is empty, equals `NULL`, or contains `{}",\\` or
  whitespace, so a quoted `"NULL"` is the four-letter string.

Elements come back as text (or None) in nested lists; the caller converts them by element type.
"""

from __future__ import annotations

import re
from typing import NoReturn

from ssmd.core.errors import DecodeError

ArrayValue = list["ArrayValue"] | str | None

_NOT_SIMPLE = re.compile(r'[{}"\\\s]')


def parse_array(text: str, delimiter: str = ",") -> list[ArrayValue]:
    """Parse an array literal into nested lists of element text or None.

    The bounds of a dimension prefix are dropped: `[0:1]={a,b}` parses like `{a,b}`.
    """
    simple = _parse_simple(text, delimiter)
    if simple is not None:
        return simple
    parser = _ArrayParser(text, delimiter)
    return parser.parse()


def _parse_simple(text: str, delimiter: str) -> list[ArrayValue] | None:
    """Parse a one-dimensional array without quotes or escapes, the common case, or return None.

    `array_out` quotes every element that is empty or contains whitespace, so in its output the
    elements between the delimiters of such an array are exactly the bare values.
    """
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        return None
    inner = text[1:-1]
    if not inner:
        return []
    if _NOT_SIMPLE.search(inner):
        return None
    elements: list[ArrayValue] = inner.split(delimiter)
    for i, element in enumerate(elements):
        if not element:
            return None
        if len(element) == 4 and element.upper() == "NULL":
            elements[i] = None
    return elements


def format_array(value: list[ArrayValue], delimiter: str = ",") -> str:
    """Format nested lists of element text or None as `array_out` would (lower bounds 1)."""
    parts = []
    for element in value:
        if isinstance(element, list):
            parts.append(format_array(element, delimiter))
        elif element is None:
            parts.append("NULL")
        else:
            parts.append(_quote_element(element, delimiter))
    return "{" + delimiter.join(parts) + "}"


_NEEDS_QUOTES = set('{}",\\') | {" ", "\t", "\n", "\r", "\v", "\f"}


def _quote_element(element: str, delimiter: str) -> str:
    if element == "" or element.upper() == "NULL" or any(char in _NEEDS_QUOTES or char == delimiter for char in element):
        escaped = element.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return element


class _ArrayParser:
    def __init__(self, text: str, delimiter: str) -> None:
        self.text = text
        self.delimiter = delimiter
        self.pos = 0

    def parse(self) -> list[ArrayValue]:
        self._skip_dimensions()
        self._skip_space()
        value = self._parse_dimension()
        self._skip_space()
        if self.pos != len(self.text):
            self._fail("unexpected text after the closing brace")
        return value

    def _skip_dimensions(self) -> None:
        self._skip_space()
        if not self.text.startswith("[", self.pos):
            return
        equals = self.text.find("=", self.pos)
        if equals < 0:
            self._fail("dimension prefix without '='")
        self.pos = equals + 1

    def _parse_dimension(self) -> list[ArrayValue]:
        if not self.text.startswith("{", self.pos):
            self._fail("expected '{'")
        self.pos += 1
        elements: list[ArrayValue] = []
        self._skip_space()
        if self.text.startswith("}", self.pos):
            self.pos += 1
            return elements

        while True:
            self._skip_space()
            elements.append(self._parse_element())
            self._skip_space()
            if self.pos >= len(self.text):
                self._fail("missing closing '}'")
            char = self.text[self.pos]
            self.pos += 1
            if char == "}":
                return elements
            if char != self.delimiter:
                self._fail(f"expected {self.delimiter!r} or '}}', found {char!r}")

    def _parse_element(self) -> ArrayValue:
        if self.pos >= len(self.text):
            self._fail("missing element")
        char = self.text[self.pos]
        if char == "{":
            return self._parse_dimension()
        if char == '"':
            return self._parse_quoted()
        return self._parse_bare()

    def _parse_quoted(self) -> str:
        self.pos += 1
        chars = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\":
                if self.pos + 1 >= len(self.text):
                    break
                chars.append(self.text[self.pos + 1])
                self.pos += 2
            elif char == '"':
                self.pos += 1
                return "".join(chars)
            else:
                chars.append(char)
                self.pos += 1
        self._fail("unterminated quoted element")

    def _parse_bare(self) -> str | None:
        chars = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == self.delimiter or char == "}":
                break
            if char in '{"':
                self._fail(f"unexpected {char!r} in an unquoted element")
            if char == "\\" and self.pos + 1 < len(self.text):
                chars.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            chars.append(char)
            self.pos += 1

        # Whitespace around a bare element is not part of it (array_in skips it).
        element = "".join(chars).strip(" \t\n\r\v\f")
        if element == "":
            self._fail("empty unquoted element")
        if element.upper() == "NULL":
            return None
        return element

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n\r\v\f":
            self.pos += 1

    def _fail(self, reason: str) -> NoReturn:
        raise DecodeError(f"invalid array literal {self.text[:200]!r}: {reason} at offset {self.pos}")
