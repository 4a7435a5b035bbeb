"""Data: datasets, chat templates and loss masks, packing, packed batches."""
