"""Version strings, in one place: the Firecracker release whose API, CLI, metrics and jailer
embervm matches (what `GET /version`, `--version` and the jailer report), and embervm's own."""

FIRECRACKER_VERSION = "1.12.1"
EMBERVM_VERSION = "0.1.0"
