"""One module per command (issue 29's layout): new commands live here."""
