"""A CNN as data: a validated list of layer specs, on one registry of layer types.

Every command reads the same spec: `summary` prints it, `train` builds it, `export` and `serve`
rebuild it from a checkpoint. A spec is a list whose items are either a bare layer name
(`"relu"`) or a mapping with a `type` key and that layer's settings, named as in PyTorch:

    - {type: conv, out_channels: 16, kernel_size: 5, padding: 2}
    - relu
    - {type: maxpool, kernel_size: 2}
    - {type: residual, layers: [{type: conv, out_channels: 16, kernel_size: 3, padding: 1}, relu,
                                {type: conv, out_channels: 16, kernel_size: 3, padding: 1}]}
    - flatten
    - {type: linear}            # the last linear layer defaults to one output per class

Input channels and the first linear layer's input size are never written by hand: `trace`
walks the spec from the input shape and works them out, with the output-size formula
⌊(n + 2p − d(k−1) − 1)/s⌋ + 1 for every conv and pool layer. A spec that cannot work
(feature maps shrinking below 1x1, reflect padding wider than its input, a stated channel
count that disagrees with the data, a residual body no shortcut can match) is rejected here,
before any training, with a message that names the layer (`layer 4.2` inside a block) and
shows the numbers.

Each layer type is one `LayerType` in `LAYER_TYPES`: its keys and defaults, validation, output
shape and formula, parameters, multiply-adds, receptive field, the module it builds and its
description. Everything else (summary, pictures, the server's feature maps, export) asks the
registry; adding a type is one class with `@register` (see the README).
"""

from .registry import (CONV_INITS, LAYER_TYPES, PADDING_MODES, REQUIRED, CNN, LayerInfo, LayerSpec, LayerType,
                       TraceState, build_model, classifier_index, conv_output_size, head_start, layer_kind,
                       layer_modules, parse_layer,
                       parse_layers, register, spec_to_list, trace, walk)
from .builtin import Residual, Scale, activation_names, init_whitening, whitening_conv
from . import backbones  # noqa: F401  (registers the timm type)

__all__ = ["CNN", "CONV_INITS", "LAYER_TYPES", "PADDING_MODES", "REQUIRED", "LayerInfo", "LayerSpec", "LayerType",
           "Residual", "Scale", "TraceState", "activation_names", "build_model", "classifier_index",
           "conv_output_size", "head_start", "layer_kind",
           "init_whitening", "layer_modules", "parse_layer", "parse_layers", "register", "spec_to_list", "trace",
           "walk", "whitening_conv"]
