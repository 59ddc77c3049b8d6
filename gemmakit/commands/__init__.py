"""One module per `gemmakit` subcommand."""
