"""Process exit codes, as Firecracker's (so orchestrators read them the same way)."""

OK = 0
GENERIC_ERROR = 1
UNEXPECTED_ERROR = 2
BAD_SYSCALL = 148
SIGBUS = 152
BAD_CONFIGURATION = 153
ARG_PARSING = 154
