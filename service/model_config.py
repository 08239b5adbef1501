"""Triton's config.pbtxt as plain Python: read and write protobuf text format without tritonclient.

The export writes config.pbtxt and the gateway reads it back; neither needs Triton's protobuf
schema for that, so a machine without tritonclient (the GPU check's image) can do both. A message
is a dict from field name to the list of that field's values (every field may repeat; a scalar is
read with `first`); enum values are `Enum` strings, so `data_type: TYPE_UINT8` stays an identifier
and `name: "TYPE_UINT8"` a string. tests/service/test_model_config.py checks both directions
against tritonclient's `model_config_pb2` on every config the export writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Union


class Enum(str):
    """An enum value or other bare identifier (written without quotes)."""


Value = Union[str, int, float, bool, "Message"]
Message = dict[str, list[Any]]


class ConfigSyntaxError(ValueError):
    """Text that is not protobuf text format (the message says where)."""


_TOKEN = re.compile(
    r"""\s+|\#[^\n]*
    |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)
    |(?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    |(?P<punct>[:{}\[\]<>,;])""",
    re.VERBOSE,
)
_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "'": "'",
    '"': '"',
    "\\": "\\",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
}
_CLOSE = {"{": "}", "<": ">"}


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            line = text.count("\n", 0, position) + 1
            raise ConfigSyntaxError(f"line {line}: unexpected {text[position : position + 10]!r}")
        if match.lastgroup is not None:
            yield match.lastgroup, match.group(), position
        position = match.end()


def _unquote(token: str) -> str:
    """A quoted string's value: C escapes, octal and hex escapes of UTF-8 bytes."""
    body, out, i = token[1:-1], bytearray(), 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out += char.encode()
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt].encode()
            i += 2
        elif nxt in "01234567":
            digits = re.match(r"[0-7]{1,3}", body[i + 1 :]).group()  # type: ignore[union-attr]
            out.append(int(digits, 8))
            i += 1 + len(digits)
        elif nxt in "xX":
            digits = re.match(r"[0-9a-fA-F]{1,2}", body[i + 2 :]).group()  # type: ignore[union-attr]
            out.append(int(digits, 16))
            i += 2 + len(digits)
        else:
            raise ConfigSyntaxError(f"unknown escape \\{nxt} in {token}")
    return out.decode()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(_tokens(text))
        self.i = 0

    def _where(self) -> str:
        position = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        return f"line {self.text.count(chr(10), 0, position) + 1}"

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i][:2] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (expected is not None and token[1] != expected):
            raise ConfigSyntaxError(
                f"{self._where()}: expected {expected or 'a value'}, got {token and token[1]!r}"
            )
        self.i += 1
        return token

    def message(self, close: str | None) -> Message:
        fields: Message = {}
        while (token := self.peek()) is not None and token[1] != close:
            kind, name = self.take()
            if kind != "name":
                raise ConfigSyntaxError(f"{self._where()}: expected a field name, got {name!r}")
            separator = self.peek()
            if separator is not None and separator[1] == ":":
                self.take(":")
            values = fields.setdefault(name, [])
            token = self.peek()
            if token is not None and token[1] == "[":
                self.take("[")
                while (item := self.peek()) is not None and item[1] != "]":
                    values.append(self.value())
                    if (comma := self.peek()) is not None and comma[1] == ",":
                        self.take(",")
                self.take("]")
            else:
                values.append(self.value())
            if (end := self.peek()) is not None and end[1] in ",;":
                self.take()
        if close is not None:
            self.take(close)
        return fields

    def value(self) -> Value:
        kind, token = self.take()
        if token in _CLOSE:
            return self.message(_CLOSE[token])
        if kind == "string":
            parts = [_unquote(token)]
            while (more := self.peek()) is not None and more[0] == "string":  # adjacent strings concatenate
                parts.append(_unquote(self.take()[1]))
            return "".join(parts)
        if kind == "number":
            number = token.rstrip("fF") if not token.lower().startswith(("0x", "-0x", "+0x")) else token
            if re.fullmatch(r"[-+]?(0[xX][0-9a-fA-F]+|\d+)", number):
                return int(number, 0) if not re.fullmatch(r"[-+]?0\d+", number) else int(number, 8)
            return float(number)
        if kind == "name":
            if token in ("true", "True"):
                return True
            if token in ("false", "False"):
                return False
            return Enum(token)
        raise ConfigSyntaxError(f"{self._where()}: unexpected {token!r}")


def parse(text: str) -> Message:
    """Parse protobuf text format into a `Message` (raises `ConfigSyntaxError`)."""
    return _Parser(text).message(None)


def first(message: Message, name: str, default: Any = None) -> Any:
    """The (last, as protobuf keeps for a scalar) value of field `name`, or `default` when absent."""
    values = message.get(name)
    return values[-1] if values else default


def string_map(message: Message, name: str) -> dict[str, str]:
    """A `map<string, {string_value}>` field such as `parameters`, as a dict."""
    return {
        str(first(entry, "key", "")): str(first(first(entry, "value", {}), "string_value", ""))
        for entry in message.get(name, [])
    }


# --- writing ----------------------------------------------------------------------------------


def _quote(value: str) -> str:
    out = []
    for byte in value.encode():
        char = chr(byte)
        if char in "\"'\\":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int | float):
        return repr(value)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as text format")


def dump(message: Mapping[str, Any], indent: int = 0) -> str:
    """Write a message as text format, one field per line like `text_format.MessageToString`.

    A field's value may be a scalar, a nested mapping, or a list of either (a repeated field);
    `None` and empty lists are left out.
    """
    pad, lines = "  " * indent, []
    for name, value in message.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is None:
                continue
            if isinstance(item, Mapping):
                lines.append(f"{pad}{name} {{\n{dump(item, indent + 1)}{pad}}}\n")
            else:
                lines.append(f"{pad}{name}: {_scalar(item)}\n")
    return "".join(lines)
