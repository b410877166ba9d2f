"""GRUB's core image, decompressed by the VMM: one LZMA stream that GRUB's own decoder unpacks at about
150 emulated instructions a byte where KVM emulates 32-bit code (20 of a disk boot's first 40 seconds).

GRUB for BIOS (i386-pc) boots from a core image: diskboot.img, then lzma_decompress.img, whose
startup (grub-core/boot/i386/pc/startup_raw.S) unpacks the compressed kernel.img and modules to 1 MiB
with a hand-written decoder (lzma_decode.S):

    mov  $0x100000, %edi             bf imm32   the output
    mov  $decompressor_end, %esi     be imm32   the stream, right after the decoder
    push %edi                        57
    mov  uncompressed_size, %ecx     8b 0d m32
    lea  (%edi,%ecx), %ebx           8d 1c 0f   the decoder's own scratch: its probabilities, after the output
    push %ecx                        51         an argument
    call _LzmaDecodeA                e8 rel32
    pop  %ecx; pop %esi; ...                    then every register set again, and a jump to the output

The stream is raw LZMA with lc=3, lp=0, pb=2 (what grub-mkimage writes), which Python's lzma module
decodes. The handoff (handoff.py) watches CORE_START, where diskboot.img jumps once the whole core
is loaded, finds the call site there, puts a debug register on the call (the decoder starts within a
second of the BIOS handing over: too soon for the sampling to be sure of seeing the site first), and
at the hit writes the output itself and moves RIP past the call: the
caller reads nothing the decoder leaves but the output and DF (clear). Only a decoder whose bytes are
the ones measured (DECODERS: Debian 11's, 12's and Ubuntu 22.04's GRUB 2.06, Debian 13's and Ubuntu
24.04's 2.12) is replaced, since the VMM stands in for that code and not for whatever a different
build might do (they run the same instructions from the call on: they differ in the stream's address
and in the padding after the decoder's last jump); the decoder's scratch after the output is left as it
was (nothing reads it after the call). Anything that does not hold leaves the call to KVM.
"""

from __future__ import annotations

import hashlib
import lzma
import re
from typing import NamedTuple

from ...driver import structs as s
from ...memory.guest import GuestMemory
from .copyloop import CHUNK, FLAG_DF, MASK32, flat_protected

SEARCH_START, SEARCH_END = 0x8000, 0x10000  # where diskboot.img loads the core image (GRUB_BOOT_MACHINE_KERNEL_ADDR)
CORE_START = 0x8200  # where it jumps, all of the core loaded: lzma_decompress.img, after diskboot.img's sector
_CALL_SITE = re.compile(rb"\xbf(....)\xbe(....)\x57\x8b\x0d(....)\x8d\x1c\x0f\x51\xe8(....)", re.DOTALL)
# SHA-256 of the bytes from the call site's first instruction to the stream (the call, what follows
# it, and the decoder), per GRUB build whose decoder was read and tested against this module.
DECODERS = {
    "a4afe4c0b1a0c0c891b78230d1a04759c06d26de897795f7897ed72e2144e43e": "GRUB 2.06-13+deb12u2 (Debian 12), i386-pc",
    "26eaf6950abb0bdfc96b2d252c416756db5b67ed39383edc12c71339d4af085e":
        "GRUB 2.06-2ubuntu7.2 (Ubuntu 22.04) and 2.06-3~deb11u6 (Debian 11): the same bytes, i386-pc",
    "4e76528742fcedca7a85285b247b55544181cd375679a707adb949e4473cf13a": "GRUB 2.12-9+deb13u4 (Debian 13), i386-pc",
    "768e08193c04e44183c5dd6f156328531259017d9c36ff46b1b651eaaf782590": "GRUB 2.12-1ubuntu7.3 (Ubuntu 24.04), i386-pc",
}
_FILTERS = [{"id": lzma.FILTER_LZMA1, "lc": 3, "lp": 0, "pb": 2, "dict_size": 1 << 23}]
_CALL_LENGTH = 5
STREAM_LIMIT = 1 << 20  # the most of the compressed stream read: a core image fits in GRUB's 1 MiB-less-a-bit gap


class CoreDecoder(NamedTuple):
    """Where GRUB's startup calls its LZMA decoder (`call`, its first instruction at `site`), where
    the stream begins, and where the startup reads the output's size from."""

    site: int
    call: int
    stream: int
    size_field: int


def find_call_site(memory: GuestMemory) -> tuple[CoreDecoder, str] | None:
    """The call site, if low memory holds GRUB's core image, and the SHA-256 of its code to the stream."""
    if not memory.contains(SEARCH_START, SEARCH_END - SEARCH_START):
        return None
    window = memory.read(SEARCH_START, SEARCH_END - SEARCH_START)
    for match in _CALL_SITE.finditer(window):
        site = SEARCH_START + match.start()
        stream = int.from_bytes(match.group(2), "little")
        if site < stream <= SEARCH_END and memory.contains(site, stream - site):
            decoder = CoreDecoder(site, site + len(match.group(0)) - _CALL_LENGTH, stream,
                                  int.from_bytes(match.group(3), "little"))
            return decoder, hashlib.sha256(memory.read(site, stream - site)).hexdigest()
    return None


def find_core_decoder(memory: GuestMemory) -> CoreDecoder | None:
    """The call site, if low memory holds GRUB's core image with a decoder this module knows."""
    found = find_call_site(memory)
    return found[0] if found is not None and found[1] in DECODERS else None


def serve_core_decoder(decoder: CoreDecoder, memory: GuestMemory, regs: s.kvm_regs, sregs: s.kvm_sregs) -> int | None:
    """At the call: the output written (its length returned; `regs` then past the call, DF clear),
    or None where the decoder must run (a mode, a stream or an output this cannot take)."""
    if (regs.rip & MASK32) != decoder.call or not flat_protected(sregs) or (regs.rsi & MASK32) != decoder.stream:
        return None
    output, size = regs.rdi & MASK32, regs.rcx & MASK32
    if not size or output + size > 1 << 32 or not memory.contains(output, size):
        return None
    available = next((min(STREAM_LIMIT, region.end - decoder.stream) for region in memory
                      if region.guest_phys_addr <= decoder.stream < region.end), 0)  # the RAM after it, in one piece
    if not available:
        return None
    unpacker = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_FILTERS)
    stream = memory.read(decoder.stream, available)
    written = 0
    try:
        while written < size:  # in pieces: a stream may say it unpacks to gigabytes
            piece = b"" if unpacker.eof else unpacker.decompress(stream, max_length=min(CHUNK, size - written))
            stream = b""
            if not piece:
                return None  # it ended early: the decoder's own reading of it is left to run
            memory.write(output + written, piece)
            written += len(piece)
    except (lzma.LZMAError, EOFError):  # not LZMA, or read past its end
        return None
    regs.rip = (decoder.call + _CALL_LENGTH) & MASK32
    regs.rflags &= ~FLAG_DF
    return size
