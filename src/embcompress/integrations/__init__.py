"""Integrations with other engines, each on top of the core and imported only on request."""
