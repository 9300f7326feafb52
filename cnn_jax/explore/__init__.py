"""`cnn-jax explore`: Adam Harley's interactive network visualisation for a trained run.

A page served on 127.0.0.1 where a person draws a digit (or drops an image) and sees, as they
draw, the model input, every convolution and pooling layer's maps, the dense layers as nodes
whose brightness is their activation and the softmax; hovering a unit outlines the window it
reads in the layer before and its receptive field in the input. The model runs in JAX on the
server, compiled once; the page (static/) is plain HTML, JavaScript and CSS with no outside
assets, so it works offline.

  network.py  Explorer: layer geometry, the compiled forward pass, request bodies -> responses
  server.py   the HTTP server (stdlib ThreadingHTTPServer): routes, limits, 4xx messages, timings
"""

from cnn_jax.explore.network import Explorer, Layer, decode_image
from cnn_jax.explore.server import ExplorerServer, serve

__all__ = ["Explorer", "ExplorerServer", "Layer", "decode_image", "serve"]
