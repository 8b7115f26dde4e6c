"""The `standby` command line: Typer + Rich; maps errors to exit codes in one place."""
