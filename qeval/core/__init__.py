"""Stage-independent foundations: errors, the registry, files and hashing, environment facts, typed config. No torch."""
