"""scratchformer.tokenize"""
