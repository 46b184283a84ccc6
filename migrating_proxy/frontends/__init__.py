"""Twisted protocols only: the pre-login dialogue of each protocol, then a byte relay."""
