"""The command-line commands, one per file (metalm_fast.cli dispatches to them)."""
