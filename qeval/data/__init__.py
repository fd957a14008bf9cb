"""Data qeval builds or reads: offline suite data from shipped text, adapter training data, dataset mirrors."""
