"""Inference: the image encoder and the mask decoder on every backend (torch, ONNX Runtime,
OpenVINO), their calibration, ONNX export and the GPU path.
"""
