"""One module per ``bnfold`` command. Each command is a plain function whose ``Annotated``
parameters are its options and whose docstring is its help; it parses arguments, builds options,
calls the API, renders and exits (:mod:`bnfold.cli.app` registers it behind the error guard)."""
