"""The `multifi` command line: one small module per command."""
