"""Code imported by several embervm processes (supervisor, vCPU worker, device workers)."""
