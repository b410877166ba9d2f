"""The import graph keeps the documented direction (README, "The architecture, by path"): the VMX
above the VMM, the VMM above devices, loaders and the KVM binding, guest memory at the bottom, and no
module importing, even lazily or for types only, a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "worldswitch"

# What each part may import besides itself; everything else is an edge against the direction.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "version": set(),
    "record": set(),  # typed records, what every part's data is made of
    "state": {"record"},  # the state protocol's codec
    "options": {"errors", "record"},  # the option schema
    "memory": {"errors", "record"},
    "sandbox": {"errors", "record"},
    "driver": {"errors", "record"},
    "guests": {"errors", "record"},
    "devices": {"errors", "record", "state", "memory", "sandbox"},  # a device sees guest memory, never a vCPU or an fd
    "boot": {"errors", "record", "memory", "devices"},  # firmware tables describe the devices
    "vmm": {"errors", "version", "record", "state", "options", "memory", "sandbox", "driver", "guests", "devices",
            "boot"},
    "vmx": {"errors", "version", "record", "state", "options", "memory", "sandbox", "driver", "guests", "devices",
            "boot", "vmm"},
    "__init__": {"version", "vmx"},  # the package's face hands on the API's Machine
    "__main__": {"vmx"},
}


def module_name(path: Path) -> str:
    parts = ["worldswitch", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every worldswitch module `name` imports, wherever the import stands (top level, a function,
    an `if TYPE_CHECKING:` block)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from .x import y`: y may be a module of its own
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {target for target in found if target in known and target != name}


def part(name: str) -> str:
    pieces = name.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_import_goes_the_documented_direction() -> None:
    against = sorted(f"{source} -> {target}" for source, targets in graph().items() for target in targets
                     if part(source) != part(target) and part(target) not in ALLOWED[part(source)])
    assert not against, "imports against the layering:\n" + "\n".join(against)


def test_no_module_imports_one_that_imports_it_back() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_graph_is_read_whole() -> None:
    """The checks above mean something only if the reader finds the imports: a few it must see."""
    edges = graph()
    assert "worldswitch.memory.guest" in edges["worldswitch.devices.virtio.queue"]
    assert "worldswitch.vmm.snapshot" in edges["worldswitch.vmx.api"]  # a function-level import
    assert "worldswitch.vmm.machine" in edges["worldswitch.vmm.snapshot"]  # a TYPE_CHECKING import
    assert part("worldswitch") == "__init__" and part("worldswitch.vmm.runloop") == "vmm"


# The functions that import when called, all of them run while a machine is built or a session set up
# (on the main thread, before the sandbox) or on a control-command thread (which may still open files).
LAZY_IMPORTERS: dict[str, set[str]] = {
    # only for a kernel packed that way, or under the monitor; vmm/x86/handoff.py, which runs both on a
    # vCPU's thread, imports them first on the main thread
    "worldswitch.boot.bzimage": {"_lz4_legacy", "_zstd"},
    "worldswitch.boot.linux": {"_paravirtualize"},
    "worldswitch.boot.decoding": {"new_decoder"},
    "worldswitch.boot.program": {"ap_entry"},  # the monitor's AP_ENTRY, only under --monitor with APs
    "worldswitch.vmm.builder": {"build_for_boot", "load", "build_for_restore", "_place_monitor", "_assemble_platform",
                                "_open_trace", "_create_vcpus", "_firmware_kernel", "_load_program", "_virtio_devices", "add", "block",
                                "network", "restore_machine"},
    "worldswitch.vmm.platform.pci_platform": {"add_virtio"},
    "worldswitch.sandbox": {"_import_what_runs_later"},  # pkgutil, on the main thread before the filters
}
# Where code runs on a confined thread (a vCPU, a device worker, console or control I/O), which may not
# open a file: an import there on first use would end the VMX (worldswitch/sandbox/__init__.py).
CONFINED = ("worldswitch.errors", "worldswitch.record", "worldswitch.state", "worldswitch.memory", "worldswitch.driver",
            "worldswitch.devices", "worldswitch.boot", "worldswitch.sandbox", "worldswitch.vmm", "worldswitch.vmx.control",
            "worldswitch.vmx.console")


def lazy_imports(path: Path) -> set[str]:
    """The functions of a module that hold an import statement."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if any(isinstance(inner, (ast.Import, ast.ImportFrom)) for inner in ast.walk(node)):
                found.add(node.name)
    return found


def test_code_that_runs_on_confined_threads_imports_only_at_module_level() -> None:
    """A machine imports only what it has (start-up time), so the sandbox no longer imports every module
    before it closes the doors: the rule holds instead. Each lazy import is in a function listed here."""
    unlisted = []
    for name, path in modules().items():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in CONFINED):
            unlisted += [f"{name}.{function}" for function in sorted(lazy_imports(path) - LAZY_IMPORTERS.get(name, set()))]
    assert not unlisted, "imports inside functions that may run on a confined thread: " + ", ".join(unlisted)
    known = modules()
    for name, functions in LAZY_IMPORTERS.items():  # the list stays true: no name outlives its import
        assert functions <= lazy_imports(known[name]), name
