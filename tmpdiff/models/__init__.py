"""Model adapters: which diffusers class a denoiser is, and how its ONNX graph is called."""
