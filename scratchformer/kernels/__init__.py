"""scratchformer.kernels"""
