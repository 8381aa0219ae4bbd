"""Registered custom ops, autograd Functions and the public functional API."""
