"""Text to training batches: the corpus and its split, token stores (a memmap file, or litdata chunks for bigger
corpora), windows, and the LightningDataModule that serves them. Import from the modules themselves."""
