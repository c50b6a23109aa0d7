"""The test guest carries a PVH entry note, so other VMMs can boot the same ELF."""

from __future__ import annotations

import struct

from elftools.elf.elffile import ELFFile

XEN_ELFNOTE_PHYS32_ENTRY = 18


def test_guest_elf_has_a_pvh_entry_note_pointing_at_the_32bit_entry(guest_images):
    with open(guest_images.elf, "rb") as f:
        elf = ELFFile(f)
        notes = [
            note
            for segment in elf.iter_segments()
            if segment["p_type"] == "PT_NOTE"
            for note in segment.iter_notes()
            if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY
        ]
        symbols = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}

    assert len(notes) == 1
    (entry,) = struct.unpack("<I", notes[0]["n_descdata"][:4])
    assert entry == symbols["_start_pvh"]
    assert elf_entry_is_the_linux_64bit_entry(guest_images.elf)


def elf_entry_is_the_linux_64bit_entry(path) -> bool:
    with open(path, "rb") as f:
        return ELFFile(f).header["e_entry"] == 0x100200
