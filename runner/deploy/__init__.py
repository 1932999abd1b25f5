"""Models for the field: ONNX and int8 exports of a logged model (onnx_export) and the runtimes that run them (runtime)."""
