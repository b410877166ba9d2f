"""The one state protocol: every part a snapshot saves (each device, each virtqueue, the PCI
transport, the platform devices) has a typed state record (worldswitch/record.py) and the same two methods,

    state() -> ItsState          what the guest can observe of it, now
    restore(state: ItsState)     put it back, into a part freshly built the same way

and the snapshot stores states as JSON through `to_json`, reading them back typed with
`decode(ItsState, data)`: nested records, lists, tuples, optionals and bytes come back as
they were, and what does not fit the type is refused (ValueError), never half-applied.
"""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

from .record import fields, is_record

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """A state (or anything inside one) as JSON-ready values; bytes become {"hex": ...}."""
    if is_record(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    return value


@typing.overload
def decode(kind: type[T], data: Any) -> T: ...


@typing.overload
def decode(kind: Any, data: Any) -> Any: ...


def decode(kind: Any, data: Any) -> Any:
    """`data` (from JSON, or already a `kind`) as a `kind` (a state record, or a union of them),
    checked against its field types."""
    return _decode(kind, data, getattr(kind, "__name__", str(kind)))


def _decode(kind: Any, data: Any, where: str) -> Any:
    if kind is Any or kind is object:
        return data
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, data, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(f"{where}: fits none of {kind}: {'; '.join(errors)}")
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        if not isinstance(data, (list, tuple)):
            raise ValueError(f"{where}: expected a list, not {type(data).__name__}")
        return [_decode(item, value, f"{where}[{index}]") for index, value in enumerate(data)]
    if origin is tuple:
        items = typing.get_args(kind)
        if not isinstance(data, (list, tuple)):
            raise ValueError(f"{where}: expected a tuple, not {type(data).__name__}")
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_decode(items[0], value, where) for value in data)
        if len(items) != len(data):
            raise ValueError(f"{where}: expected {len(items)} items, not {len(data)}")
        return tuple(_decode(item, value, where) for item, value in zip(items, data))
    if origin is dict:
        key_type, value_type = typing.get_args(kind) or (Any, Any)
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, not {type(data).__name__}")
        return {_decode(key_type, key, where): _decode(value_type, value, where) for key, value in data.items()}
    if isinstance(kind, type) and is_record(kind):
        if isinstance(data, kind):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a {kind.__name__}, not {type(data).__name__}")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in fields(kind)}
        if set(data) != names:
            raise ValueError(f"{where}: {kind.__name__} has the fields {sorted(names)}, not {sorted(data)}")
        return kind(**{name: _decode(hints[name], data[name], f"{where}.{name}") for name in names})
    if kind is bytes:
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
        if isinstance(data, dict) and set(data) == {"hex"} and isinstance(data["hex"], str):
            return bytes.fromhex(data["hex"])
        raise ValueError(f"{where}: expected bytes")
    if kind is bool:
        if not isinstance(data, bool):
            raise ValueError(f"{where}: expected true or false, not {data!r}")
        return data
    if kind is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ValueError(f"{where}: expected an integer, not {data!r}")
        return data
    if kind is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ValueError(f"{where}: expected a number, not {data!r}")
        return float(data)
    if kind is str:
        if not isinstance(data, str):
            raise ValueError(f"{where}: expected a string, not {data!r}")
        return data
    if typing.get_origin(kind) is typing.Literal:
        if data not in typing.get_args(kind):
            raise ValueError(f"{where}: expected one of {typing.get_args(kind)}, not {data!r}")
        return data
    raise ValueError(f"{where}: no decoding for {kind}")


def schema(kind: type) -> str:
    """A state type's field names and types, nested ones included, as one line: what the snapshot
    format depends on (tests/test_snapshot_schema.py keeps it tied to the format version)."""
    hints = typing.get_type_hints(kind)
    return f"{kind.__name__}(" + ", ".join(f"{f.name}: {hints[f.name]}" for f in fields(kind)) + ")"
