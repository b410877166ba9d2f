"""Records (worldswitch/record.py) mean what dataclasses mean: each check here writes one class body
twice, once as a record and once as a dataclass, and compares what the two do. The reference is
Python's own dataclasses module, so these tests say where records could drift from it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any, Callable, ClassVar

import pytest

from worldswitch import record as rec


def both(body: Callable[[Any, Any], type], **options: Any) -> tuple[type, type]:
    """The class `body(decorator_field, …)` makes, as a record and as a dataclass."""
    return (rec.record(**options)(body(rec.field, rec.MISSING)),
            dataclasses.dataclass(**options)(body(dataclasses.field, dataclasses.MISSING)))


def chain(field: Any, missing: Any) -> type:
    class Chain:
        head: int
        name: str = "chain"
        readable: list[int] = field(default_factory=list)
        note: str = field(default="", metadata={"help": "a note"})
        shared: ClassVar[int] = 7
    return Chain


def bounded(field: Any, missing: Any) -> type:
    class Range:
        base: int
        length: int
        end: int = field(init=False)

        def __post_init__(self) -> None:
            if self.length < 0:
                raise ValueError("negative length")
            object.__setattr__(self, "end", self.base + self.length)
    return Range


def calls(kind: type, *args: Any, **kwargs: Any) -> str:
    """What calling `kind` gives: the repr of the object, or the exception's type."""
    try:
        return repr(kind(*args, **kwargs)).replace(kind.__qualname__, "K")
    except Exception as error:  # noqa: BLE001 - the kind of failure is what is compared
        return type(error).__name__


@pytest.mark.parametrize("args, kwargs", [
    ((1,), {}), ((1, "x"), {}), ((1, "x", [2], "n"), {}), ((), {"head": 3, "note": "n"}), ((1,), {"readable": [5]}),
    ((), {}), ((1, "x", [], "n", 9), {}), ((1,), {"head": 2}), ((1,), {"colour": "red"}), ((1,), {"shared": 1}),
])
def test_construction_and_repr_match_dataclasses(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    record_kind, dataclass_kind = both(chain)
    assert calls(record_kind, *args, **kwargs) == calls(dataclass_kind, *args, **kwargs)


def test_defaults_factories_and_class_variables_match_dataclasses() -> None:
    record_kind, dataclass_kind = both(chain)
    first, second = record_kind(1), record_kind(1)
    first.readable.append(1)
    assert second.readable == []  # each record its own list
    def described(field: Any, missing: Any) -> tuple[Any, ...]:
        return (field.name, field.default if field.default is not missing else "no default",
                field.default_factory if field.default_factory is not missing else "no factory", dict(field.metadata))

    assert [described(f, rec.MISSING) for f in rec.fields(record_kind)] == \
        [described(f, dataclasses.MISSING) for f in dataclasses.fields(dataclass_kind)]
    assert rec.fields(record_kind)[0].default is rec.MISSING
    assert record_kind.name == dataclass_kind.name == "chain"  # a plain default stays a class attribute
    assert record_kind.__match_args__ == dataclass_kind.__match_args__ == ("head", "name", "readable", "note")
    assert record_kind.shared == 7 and "shared" not in {f.name for f in rec.fields(record_kind)}


def test_equality_and_hashing_match_dataclasses() -> None:
    for frozen in (False, True):
        record_kind, dataclass_kind = both(chain, frozen=frozen)
        for kind in (record_kind, dataclass_kind):
            assert kind(1, "a") == kind(1, "a") and kind(1, "a") != kind(1, "b")
            assert kind(1) != (1, "chain", [], "")
        assert (record_kind.__hash__ is None) == (dataclass_kind.__hash__ is None) == (not frozen)
    record_kind, dataclass_kind = both(bounded, frozen=True)
    assert hash(record_kind(1, 2)) == hash(record_kind(1, 2)) == hash(dataclass_kind(1, 2))
    assert record_kind(1, 2) != dataclass_kind(1, 2)  # another class, however alike


def test_frozen_records_refuse_assignment_as_dataclasses_do() -> None:
    record_kind, dataclass_kind = both(bounded, frozen=True)
    for kind in (record_kind, dataclass_kind):
        item = kind(1, 2)
        assert item.end == 3  # __post_init__ ran, and set a field the class does not take
        with pytest.raises(AttributeError):
            item.base = 5
        with pytest.raises(AttributeError):
            del item.length
        with pytest.raises(ValueError, match="negative"):
            kind(1, -1)
        with pytest.raises(TypeError):
            kind(1, 2, 3)  # end is not an argument


def test_replace_and_asdict_match_dataclasses() -> None:
    record_kind, dataclass_kind = both(bounded, frozen=True)
    assert repr(rec.replace(record_kind(1, 2), length=5)).replace("Range", "") == \
        repr(dataclasses.replace(dataclass_kind(1, 2), length=5)).replace("Range", "")
    with pytest.raises(ValueError):
        rec.replace(record_kind(1, 2), end=9)
    with pytest.raises(ValueError, match="negative"):
        rec.replace(record_kind(1, 2), length=-1)  # replace builds through __init__
    outer_record, outer_dataclass = both(lambda field, missing: type("Outer", (), {
        "__annotations__": {"inner": "Any", "items": "list[Any]", "pairs": "dict[str, Any]"}}))
    made = outer_record(record_kind(1, 2), [record_kind(3, 4), (5, 6)], {"k": record_kind(0, 1)})
    reference = outer_dataclass(dataclass_kind(1, 2), [dataclass_kind(3, 4), (5, 6)], {"k": dataclass_kind(0, 1)})
    assert rec.asdict(made) == dataclasses.asdict(reference)
    copied = rec.asdict(made)
    copied["items"].append(7)
    assert len(made.items) == 2  # a new list, not the record's
    with pytest.raises(TypeError):
        rec.asdict(record_kind)


def test_inheritance_orders_fields_as_dataclasses_do() -> None:
    def derived(field: Any, missing: Any) -> type:
        base = (rec.record if field is rec.field else dataclasses.dataclass)(chain(field, missing))

        class Derived(base):  # type: ignore[misc, valid-type]
            extra: int = 1
            name: str = "derived"  # a field redefined keeps its place
        return Derived

    record_kind, dataclass_kind = both(derived)
    assert [f.name for f in rec.fields(record_kind)] == [f.name for f in dataclasses.fields(dataclass_kind)]
    assert calls(record_kind, 1) == calls(dataclass_kind, 1)


def test_definitions_that_dataclasses_refuse_are_refused() -> None:
    for body in ({"__annotations__": {"items": "list[int]"}, "items": []},  # one list shared by every instance
                 {"__annotations__": {"a": "int", "b": "int"}, "a": 1}):  # no default after a default
        for decorate in (rec.record, dataclasses.dataclass):
            with pytest.raises((ValueError, TypeError)) as refused:
                decorate(type("Bad", (), dict(body)))
            assert refused.type in (ValueError, TypeError)
    with pytest.raises(ValueError):
        rec.field(default=1, default_factory=int)
    with pytest.raises(TypeError):
        rec.fields(object())


def test_slots_records_have_no_instance_dict() -> None:
    record_kind, dataclass_kind = both(bounded, frozen=True, slots=True)
    for kind in (record_kind, dataclass_kind):
        assert kind.__slots__ == ("base", "length", "end")
        assert not hasattr(kind(1, 2), "__dict__") and kind(1, 2).end == 3


def test_a_run_imports_no_dataclasses() -> None:
    """What records are for: the modules `worldswitch run` imports define their records without
    importing dataclasses (5 ms with inspect) or compiling a method per class (bench/README.md)."""
    script = ("import sys, worldswitch.vmx.launch, worldswitch.vmx.cli, worldswitch.vmx.session\n"
              "print(sorted(name for name in ('dataclasses', 'inspect', 'ast') if name in sys.modules))")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
