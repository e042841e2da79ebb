"""The `havoc` command-line entry point."""
