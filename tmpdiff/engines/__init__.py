"""Engines: one protocol, ONNX Runtime and TensorRT backends."""
