"""Helpers shared by the tests: tiny synthetic datasets and models, run folders made by the CLI,
user-style digit pictures and a corpus of hostile image files. Import as `from tests.support.X import ...`."""
