"""Tools around the library: bench, GPU bench and probe, fd-store emulator, chaos suite."""
