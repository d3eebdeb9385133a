"""Compiled cell -> running code: the time loops and the torch.autograd Functions around them."""
