"""cnnlab's benchmarks, kept beside the package rather than inside it. Each file is a script that
writes its results under benchmarks/results/: `run.py` is the side-by-side benchmark (`make bench`,
`python benchmarks/run.py` or `cnnlab bench` in a checkout), with the tutorial's recipe it compares
with in `tutorial_baseline.py`, inference speed in `inference.py` and its Markdown table from
`report.py`; `load_test.py` puts the HTTP server under load; `lr_find_check.py` and
`tensorboard_cost.py` check one feature each; `finetune.py` measures fine-tuning against training
from scratch on 100 images per class; `no_digit.py` measures the "no digit found" decision
on MNIST and on generated hard digits and blank pictures. What was tried and why: NOTES.md."""
