"""Process exit codes, as Firecracker's `FcExitCode` (so orchestrators read them the same way)."""

OK = 0
GENERIC_ERROR = 1
UNEXPECTED_ERROR = 2
BAD_SYSCALL = 148  # a worker was killed by its seccomp filter
SIGBUS = 149
SIGSEGV = 150
SIGXFSZ = 151
BAD_CONFIGURATION = 152
ARG_PARSING = 153
SIGXCPU = 154
SIGPIPE = 155
SIGHUP = 156
SIGILL = 157
WORKER_DIED = 158  # embervm: the vCPU worker died (API mode: on the stop that follows; docs/faults.md)
