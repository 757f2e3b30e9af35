"""The query towers' modules, trained and compared with their plain-PyTorch twins."""
