"""The embervm test guest kit.

A tiny freestanding C program that embervm boots instead of Linux, so device
paths can be tested end to end. It speaks the Linux 64-bit boot protocol
(entry at 0x100200 with RSI = boot_params), prints its command line and e820
map on the 8250 serial port, runs the test named by ``test=<name>`` on its
command line and powers off through the i8042 reset port.

``guest.build.build_guest()`` compiles it with the machine's gcc into an ELF
(what the vmlinux loader takes) and a bzImage; see ``guest/README.md``.
"""
