"""The stages of the data's journey (issue 29's layout): new stage modules live here."""
