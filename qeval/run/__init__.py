"""Run a plan: its schema, cells, jobs, executors and the driver that writes records."""
