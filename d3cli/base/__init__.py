"""The base every other package stands on, importing none of them:

    errors.py   UserError (one line and exit code 2 at the CLI's edge) and the shared range checks
    files.py    atomic writes: nothing half-written on a crash or Ctrl-C
    paths.py    where d3 keeps its files (XDG cache, config and state folders) and the lock that one process holds
"""
