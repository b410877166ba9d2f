"""A machine's defaults, in a module light enough for the CLI's help text to import."""

MIB = 1 << 20
DEFAULT_MEMORY = 128 * MIB  # bare-metal programs and the built-in guests
DEFAULT_LINUX_MEMORY = 512 * MIB
DEFAULT_CMDLINE = "console=ttyS0"
