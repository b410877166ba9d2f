"""Typed records: the classes that hold data (options, states, statistics, results, decoded exits),
with the meaning of Python's dataclasses and a fraction of their start-up cost.

Why not dataclasses: `worldswitch run` defines about twenty such classes before the guest's first
byte. As dataclasses (CPython 3.11) they cost 13 ms of a 65 ms start: 5 ms to import `dataclasses`
(which imports inspect, ast, dis, tokenize) and 8 ms to compile, from generated source, each class's
own `__init__`, `__repr__`, `__eq__` and frozen `__setattr__`. Why not `typing.NamedTuple` for the
immutable ones: it compiles each field's annotation (about 50 us a class; 40 were on the way). Why
not msgspec's `Struct`, the library made for cheap records: importing it costs 6.7 ms here
(datetime, decimal, uuid). Here every record shares one `__init__`, `__repr__` and `__eq__` that read
the class's field list, so defining a record costs about 15 us; building one costs about 0.5 us
more than a dataclass. Where that shows, a NamedTuple stays: one made per virtqueue descriptor
(devices/virtio/queue.py's Buffer) or per trace record read back.

What a record does is what a dataclass does with the same class body and options (`frozen`,
`slots`; `field(default=, default_factory=, init=, metadata=)`; `__post_init__`; inheritance;
`ClassVar` annotations are not fields), and `tests/test_record.py` checks that against dataclasses
themselves. Type checkers understand records through `dataclass_transform` (PEP 681).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, TypeVar, dataclass_transform, overload

T = TypeVar("T")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # no default given


class FrozenRecordError(AttributeError):
    """An assignment to, or deletion of, an attribute of a frozen record."""


class Field:
    """One field of a record: its name, default (or default factory), whether `__init__` takes it, and
    what else its definer attached (`metadata`)."""

    __slots__ = ("name", "default", "default_factory", "init", "metadata")

    def __init__(self, default: Any, default_factory: Any, init: bool, metadata: Mapping[str, Any]) -> None:
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.init = init
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"Field(name={self.name!r}, default={self.default!r}, default_factory={self.default_factory!r}, init={self.init})"


@overload
def field(*, default: T, init: bool = True, metadata: Mapping[str, Any] | None = None) -> T: ...


@overload
def field(*, default_factory: Callable[[], T], init: bool = True, metadata: Mapping[str, Any] | None = None) -> T: ...


@overload
def field(*, init: bool = True, metadata: Mapping[str, Any] | None = None) -> Any: ...


def field(*, default: Any = MISSING, default_factory: Any = MISSING, init: bool = True,
          metadata: Mapping[str, Any] | None = None) -> Any:
    """A field with more said about it than a default value (as dataclasses.field)."""
    if default is not MISSING and default_factory is not MISSING:
        raise ValueError("a field has a default or a default factory, not both")
    return Field(default, default_factory, init, dict(metadata or {}))


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, frozen: bool = False, slots: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(field, Field))
def record(cls: type[T] | None = None, /, *, frozen: bool = False, slots: bool = False) -> Any:
    """Make `cls` a record (as @dataclass, @dataclass(frozen=True), @dataclass(slots=True))."""
    def make(cls: type[T]) -> type[T]:
        return _make(cls, frozen, slots)

    return make if cls is None else make(cls)


def fields(item: Any) -> tuple[Field, ...]:
    """A record's (or record class's) fields, in order."""
    try:
        return tuple(item.__record_fields__.values())
    except AttributeError:
        raise TypeError(f"{item!r} is not a record or a record class") from None


def is_record(item: Any) -> bool:
    """Whether `item` is a record or a record class."""
    return hasattr(item, "__record_fields__")


def replace(item: T, /, **changes: Any) -> T:
    """A new record like `item` with `changes` (built through `__init__`, so `__post_init__` checks it)."""
    for one in fields(item):
        if not one.init:
            if one.name in changes:
                raise ValueError(f"field {one.name} is not set by __init__ and cannot be replaced")
        elif one.name not in changes:
            changes[one.name] = getattr(item, one.name)
    return type(item)(**changes)


def asdict(item: Any) -> dict[str, Any]:
    """A record as a dict, records inside it as dicts too, its lists, tuples and dicts new ones.
    (Other values are shared, not deep-copied as dataclasses.asdict does: what records hold here is
    numbers, text, bytes and records.)"""
    if not is_record(item) or isinstance(item, type):
        raise TypeError(f"{item!r} is not a record")
    return _plain(item)


def _plain(value: Any) -> Any:
    if is_record(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name)) for name in value.__record_fields__}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple keeps its type
        return type(value)(*(_plain(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return type(value)((_plain(key), _plain(item)) for key, item in value.items())
    return value


# --- what every record shares ----------------------------------------------------------------------

def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    taken = len(args)
    if taken > len(cls.__record_init_names__):
        raise TypeError(f"{cls.__name__}() takes {len(cls.__record_init_names__)} positional arguments but {taken} were given")
    put = object.__setattr__
    position = used = 0  # init arguments passed by position; keywords used
    for name, default, factory, init in cls.__record_plan__:
        if init:
            position += 1
            if position <= taken:
                if name in kwargs:
                    raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
                put(self, name, args[position - 1])
                continue
            if name in kwargs:
                put(self, name, kwargs[name])
                used += 1
                continue
        if default is not MISSING:
            put(self, name, default)
        elif factory is not MISSING:
            put(self, name, factory())
        elif init:
            raise TypeError(f"{cls.__name__}() missing required argument {name!r}")
    if used != len(kwargs):
        unknown = next(key for key in kwargs if key not in cls.__record_init_names__)
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {unknown!r}")
    post = getattr(self, "__post_init__", None)
    if post is not None:
        post()


def _repr(self: Any) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self).__record_fields__)
    return f"{type(self).__qualname__}({shown})"


def _values(item: Any) -> tuple[Any, ...]:
    return tuple(getattr(item, name) for name in type(item).__record_fields__)


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")


def _is_class_variable(annotation: Any) -> bool:
    if isinstance(annotation, str):  # `from __future__ import annotations`
        return annotation.startswith(("ClassVar", "typing.ClassVar"))
    return annotation is ClassVar or getattr(annotation, "__origin__", None) is ClassVar


def _make(cls: type[T], frozen: bool, slots: bool) -> type[T]:
    found: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        found.update(base.__dict__.get("__record_fields__", {}))
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if _is_class_variable(annotation):
            continue
        given = cls.__dict__.get(name, MISSING)
        one = given if isinstance(given, Field) else Field(given, MISSING, True, {})
        if one.default is not MISSING and type(one.default).__hash__ is None:
            raise ValueError(f"{cls.__name__}.{name}: a mutable default ({type(one.default).__name__}) would be shared "
                             "by every record; use field(default_factory=...)")
        one.name = name
        found[name] = one
        if isinstance(given, Field):  # as dataclasses: the class attribute is the default, if there is one
            if one.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, one.default)
    defaulted = False
    for one in found.values():
        if not one.init:
            continue
        if one.default is not MISSING or one.default_factory is not MISSING:
            defaulted = True
        elif defaulted:
            raise TypeError(f"{cls.__name__}: field {one.name!r} without a default follows one with a default")
    if slots:
        body = {key: value for key, value in cls.__dict__.items() if key not in found and key not in ("__dict__", "__weakref__")}
        body["__slots__"] = tuple(name for name in found if name not in _inherited_slots(cls))
        metaclass: Any = type(cls)  # the class again, with slots: they can be declared only when it is made
        cls = metaclass(cls.__name__, cls.__bases__, body)
    init_names = tuple(name for name, one in found.items() if one.init)
    namespace: dict[str, Any] = {
        "__record_fields__": found,
        "__record_plan__": tuple((one.name, one.default, one.default_factory, one.init) for one in found.values()),
        "__record_init_names__": init_names,
        "__match_args__": init_names,
    }
    own = cls.__dict__
    if "__init__" not in own:
        namespace["__init__"] = _init
    if "__repr__" not in own:
        namespace["__repr__"] = _repr
    if "__eq__" not in own:
        namespace["__eq__"] = _eq
    if "__hash__" not in own or own["__hash__"] is None:  # a class that defines __eq__ gets __hash__ = None
        namespace["__hash__"] = _hash if frozen else None
    if frozen:
        namespace["__setattr__"] = _frozen_setattr
        namespace["__delattr__"] = _frozen_delattr
    for key, value in namespace.items():
        setattr(cls, key, value)
    return cls


def _inherited_slots(cls: type) -> set[str]:
    return {name for base in cls.__mro__[1:] for name in base.__dict__.get("__slots__", ())}
