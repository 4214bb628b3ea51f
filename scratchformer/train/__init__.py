"""scratchformer.train"""
