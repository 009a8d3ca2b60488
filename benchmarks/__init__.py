"""cnnlab's benchmarks, kept beside the package rather than inside it: `run.py` (the side-by-side
benchmark: `make bench`, `python benchmarks/run.py` or `cnnlab bench` in a checkout),
`tutorial_baseline.py` (the tutorial's recipe it compares with), `inference.py` (inference speed),
`report.py` (the Markdown table) and `load_test.py` (the HTTP server under load)."""
