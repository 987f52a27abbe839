"""Data: sources (openmoji, folder, urls, hf), the download and shard steps, and loaders."""
