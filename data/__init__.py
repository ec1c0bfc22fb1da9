"""Tokenizers, corpus readers, Megatron IndexedDataset files, packing and sampling."""
