"""`cnnlab show ...`: pictures of what a CNN does, as PNG files.

- `samples`: a labelled grid of dataset images;
- `convolve`: one filter applied to one image, step by step (input, kernel, feature map, ReLU,
  pooling; for colour input the three per-channel products and their sum);
- `filters`: a trained model's learned kernels; `feature-maps`: every conv/activation/pool
  output for one image;
- `curves`, `confusion`, `mistakes`: how training went and where the model is wrong.

Where things live: `figures.py` builds each picture as a matplotlib `Figure` from arrays and
models (so `cnnlab report` embeds the very same pictures), `convolution.py` computes the
convolution demo, `pictures.py` prepares the inputs of the pictures that need a dataset or an
image file. The `show` command's parser is `cnnlab/commands/show.py`.
"""

from .convolution import FILTERS, Convolution, convolve, demo_image, mnist_test_digit, parse_kernel
from .figures import (DPI, confusion_figure, confusion_title, conv_layers, convolve_figure,
                      curves_figure, feature_maps_figure, figure_png, filters_figure, layer_outputs, mistakes_figure,
                      new_figure, pick_test_image, samples_figure, save_figure)
from .pictures import PICTURES, convolve_picture, feature_maps_picture, samples_picture

__all__ = [
    "DPI", "FILTERS", "PICTURES", "Convolution",
    "confusion_figure", "confusion_title", "conv_layers", "convolve", "convolve_figure", "convolve_picture",
    "curves_figure", "demo_image", "feature_maps_figure", "feature_maps_picture", "figure_png", "filters_figure",
    "layer_outputs", "mistakes_figure", "mnist_test_digit", "new_figure", "parse_kernel",
    "pick_test_image", "samples_figure", "samples_picture", "save_figure",
]
