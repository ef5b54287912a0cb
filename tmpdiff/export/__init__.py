"""Export: torch -> ONNX, quantization with modelopt, graph clean-up."""
