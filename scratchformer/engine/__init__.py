"""scratchformer.engine"""
