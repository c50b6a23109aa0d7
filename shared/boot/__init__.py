"""Booting Linux on x86-64: everything the supervisor writes into guest memory before a
vCPU runs, as pure data over `GuestMemory` (no KVM here).

    loader      load_boot(): kernel + initrd + cmdline + zero page + page tables/GDT
    elf         ELF64 vmlinux loader          bzimage   setup header + bzImage loader
    bootparams  the zero page                 cmdline   command-line builder
    initrd      initrd placement              cpu_state boot registers, GDT, page tables, MSRs, LINT
    cpuid       per-vCPU CPUID normalisation, bit clearing, Firecracker CPU templates
    vmlinux     extract the ELF from a bzImage (lz4_legacy: pure-Python LZ4 decoder)
    acpi, aml, mptable   firmware tables (written separately; the RSDP goes to load_boot)
"""
