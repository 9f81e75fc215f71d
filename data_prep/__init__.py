"""``python -m data_prep``: convert ImageNet folders and WebDataset shards to FFCV betons (see __main__)."""
