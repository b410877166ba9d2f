"""The ELF64 loader against hand-built images: every malformed case ends in one clear error."""

from __future__ import annotations

import pytest

from worldswitch.boot.elf import load_elf, parse_elf, read_image
from worldswitch.errors import GuestImageError
from worldswitch.memory.guest import GuestMemory

from .helpers import make_elf


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory([(0, 0xA0000), (0x100000, 0x200000)])
    yield mem
    mem.close()


def test_loads_segments_and_zero_fills_bss(memory: GuestMemory) -> None:
    memory.write(0x101000, b"\xff" * 16)
    image = make_elf([(0x100000, b"\x90\x90\xf4", 0x2000)])
    loaded = load_elf(memory, image)
    assert loaded.entry == 0x100000
    assert memory.read(0x100000, 3) == b"\x90\x90\xf4"
    assert memory.read(0x101000, 16) == bytes(16)
    assert (loaded.low, loaded.high) == (0x100000, 0x102000)


@pytest.mark.parametrize(
    "image,message",
    [
        (b"", "not an ELF file"),
        (b"MZ" + bytes(100), "not an ELF file"),
        (make_elf([(0x100000, b"x", 1)], cls=1), "not a 64-bit"),
        (make_elf([(0x100000, b"x", 1)], machine=40), "not an x86-64 program"),
        (make_elf([(0x100000, b"x", 1)], e_type=3), "not a static executable"),
        (make_elf([(0x100000, b"x", 1)], extra_phdrs=[(3, 4, 0, 0, 0, 10, 10, 1)]), "dynamically linked"),
        (make_elf([(0x100000, b"xxxx", 2)]), "truncated or corrupt"),
        (make_elf([(0x100000, b"x", 0x2000), (0x101000, b"y", 0x10)]), "overlap"),
        (make_elf([], extra_phdrs=[(4, 4, 0, 0, 0, 0, 0, 1)]), "nothing to load"),
    ],
)
def test_malformed_images_are_refused_clearly(image: bytes, message: str) -> None:
    with pytest.raises(GuestImageError, match=message):
        parse_elf(image, "prog")


def test_truncated_program_headers_are_refused() -> None:
    image = make_elf([(0x100000, b"x", 1)])
    with pytest.raises(GuestImageError, match="corrupt program header"):
        parse_elf(image[:80], "prog")


def test_segment_data_beyond_the_file_is_refused() -> None:
    image = make_elf([(0x100000, b"abcdef", 6)])
    with pytest.raises(GuestImageError, match="truncated"):
        parse_elf(image[:-3], "prog")


def test_segments_outside_ram_or_over_vmm_memory_are_refused(memory: GuestMemory) -> None:
    with pytest.raises(GuestImageError, match="does not fit in guest RAM"):
        load_elf(memory, make_elf([(0x2FF000, b"x", 0x2000)]))
    with pytest.raises(GuestImageError, match="does not fit in guest RAM"):
        load_elf(memory, make_elf([(0xA0000, b"x", 0x10)]))
    with pytest.raises(GuestImageError, match="overlaps memory the VMM uses"):
        load_elf(memory, make_elf([(0x1000, b"x", 0x10)]), reserved=[(0x1000, 0x2000)])


def test_entry_outside_the_program_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(GuestImageError, match="entry point"):
        load_elf(memory, make_elf([(0x100000, b"x", 0x10)], entry=0x180000))


def test_unreadable_files_give_one_line(tmp_path) -> None:
    with pytest.raises(GuestImageError, match="does not exist"):
        read_image(tmp_path / "missing")
    with pytest.raises(GuestImageError, match="is a directory"):
        read_image(tmp_path)
