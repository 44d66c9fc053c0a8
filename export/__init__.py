"""absorb export: PyTorch modules of Unleashing Transformers and their ONNX bundle export."""
