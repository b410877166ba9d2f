"""The driver's ctypes structures, ioctl numbers and constants against the installed <linux/kvm.h>,
as the C compiler sees them: every size, every field offset and size, every number."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from worldswitch.driver import requests as rq
from worldswitch.driver import structs as s
from worldswitch.driver.constants import Cap, ExitReason, InternalError, SystemEvent

HEADER = Path("/usr/include/linux/kvm.h")
pytestmark = pytest.mark.skipif(not HEADER.exists() or shutil.which("gcc") is None, reason="needs kvm.h and gcc")

# Python-only names for structures that are anonymous in the header.
ANONYMOUS_PARENTS = {"kvm_run_": "struct kvm_run", "_kvm_vcpu_events_": "struct kvm_vcpu_events"}
# ctypes field names that stand for a C member of another name.
RENAMED = {("kvm_run", "u"): "padding"}


def c_type(name: str) -> str | None:
    for prefix, parent in ANONYMOUS_PARENTS.items():
        if name.startswith(prefix):
            return f"__typeof__((({parent} *)0)->{name[len(prefix):]})"
    if name.startswith("kvm_"):
        return f"struct {name}"
    return None


def structures() -> dict[str, type]:
    found = {}
    for name, value in vars(s).items():
        if isinstance(value, type) and issubclass(value, (ctypes.Structure, ctypes.Union)) and c_type(name):
            if value.__module__ == s.__name__ and value is not s.Struct:
                found[name] = value
    return found


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    lines = []
    for name, cls in structures().items():
        ctype = c_type(name)
        lines.append(f'P("sizeof {name}", sizeof({ctype}));')
        for field, *_ in cls._fields_:
            member = RENAMED.get((name, field), field)
            lines.append(f'P("offsetof {name}.{field}", __builtin_offsetof({ctype}, {member}));')
            if (name, field) not in RENAMED:
                lines.append(f'P("sizeof {name}.{field}", sizeof((({ctype} *)0)->{member}));')
    for name in rq.ALL:
        lines.append(f'P("ioctl {name}", {name});')
    for cap in Cap:
        lines.append(f'P("cap {cap.name}", KVM_CAP_{cap.name});')
    for reason in ExitReason:
        lines.append(f'P("exit {reason.name}", KVM_EXIT_{reason.name});')
    for error in InternalError:
        lines.append(f'P("internal {error.name}", KVM_INTERNAL_ERROR_{error.name});')
    for event in SystemEvent:
        lines.append(f'P("event {event.name}", KVM_SYSTEM_EVENT_{event.name});')
    source = (
        "#include <stdio.h>\n#include <linux/kvm.h>\n"
        '#define P(name, value) printf("%s %llu\\n", name, (unsigned long long)(value))\n'
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    )
    work = tmp_path_factory.mktemp("layout")
    (work / "layout.c").write_text(source)
    subprocess.run(["gcc", "-o", str(work / "layout"), str(work / "layout.c")], check=True, capture_output=True)
    output = subprocess.run([str(work / "layout")], check=True, capture_output=True, text=True).stdout
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in output.splitlines()}


def test_every_structure_has_the_c_size_and_field_layout(c_values: dict[str, int]) -> None:
    mismatches = []
    for name, cls in structures().items():
        if ctypes.sizeof(cls) != c_values[f"sizeof {name}"]:
            mismatches.append(f"sizeof {name}: python {ctypes.sizeof(cls)}, C {c_values[f'sizeof {name}']}")
        for field, *_ in cls._fields_:
            descriptor = getattr(cls, field)
            if descriptor.offset != c_values[f"offsetof {name}.{field}"]:
                mismatches.append(f"{name}.{field} offset: python {descriptor.offset}, C {c_values[f'offsetof {name}.{field}']}")
            key = f"sizeof {name}.{field}"
            if key in c_values and descriptor.size != c_values[key]:
                mismatches.append(f"{name}.{field} size: python {descriptor.size}, C {c_values[key]}")
    assert not mismatches, "\n".join(mismatches)


def test_known_sizes_from_the_kvm_api_document() -> None:
    assert ctypes.sizeof(s.kvm_regs) == 144
    assert ctypes.sizeof(s.kvm_sregs) == 312
    assert ctypes.sizeof(s._kvm_run_exit_union) == 256
    assert s.kvm_run.u.offset == 32


def test_every_ioctl_number_matches_the_header(c_values: dict[str, int]) -> None:
    wrong = {name: (hex(request.number), hex(c_values[f"ioctl {name}"]))
             for name, request in rq.ALL.items() if request.number != c_values[f"ioctl {name}"]}
    assert not wrong


def test_every_constant_matches_the_header(c_values: dict[str, int]) -> None:
    for prefix, enum in (("cap", Cap), ("exit", ExitReason), ("internal", InternalError), ("event", SystemEvent)):
        for member in enum:
            assert member.value == c_values[f"{prefix} {member.name}"], f"{prefix} {member.name}"


def test_ioctl_helper_refuses_an_argument_smaller_than_encoded() -> None:
    from worldswitch.driver.ioctl import ioctl

    with pytest.raises(TypeError, match="KVM_GET_REGS"):
        ioctl(-1, rq.KVM_GET_REGS, ctypes.c_uint64())


def test_ioctl_errors_keep_errno_and_name() -> None:
    import errno

    from worldswitch.driver.ioctl import ioctl
    from worldswitch.errors import KvmError

    with pytest.raises(KvmError) as raised:
        ioctl(-1, rq.KVM_GET_API_VERSION, 0)
    assert raised.value.errno == errno.EBADF
    assert raised.value.request == "KVM_GET_API_VERSION"
