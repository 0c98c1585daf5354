"""asv benchmarks of fastem against its pure-NumPy reference (see ``common`` for profiles)."""
