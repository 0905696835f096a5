"""LMCache v1's module paths (``lmcache.v1.*``) as faces over lmcache."""
