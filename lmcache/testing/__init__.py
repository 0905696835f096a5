"""Helpers for testing lmcache and its plugins against real servers (no mocks)."""
