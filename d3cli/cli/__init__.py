"""The command line: the Typer app (app.py), one module per subcommand (commands/), option declarations, configuration
files, shell completions, JSONL input and the Rich renderer. Imports core and evaluation."""
