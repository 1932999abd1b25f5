"""Network builders: ``linear`` (PyTorch) and the Keras transfer-learning backbones."""
