"""LMCache Experimental: the engine, its configuration and its component interfaces."""
