"""An example lmcache plugin: an in-process storage tier."""
