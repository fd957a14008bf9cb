"""Stage-independent foundations: errors, the registry, files and hashing, environment facts, typed config, the console of a run (qeval lines, progress bar, log). No torch."""
