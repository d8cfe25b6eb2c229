"""Runtime: the device, its precision and memory format, threads (hardware), and processes under torchrun (distributed)."""
