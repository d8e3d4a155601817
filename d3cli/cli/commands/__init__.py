"""One module per subcommand: parse the options, call one function of core or evaluation, render."""
