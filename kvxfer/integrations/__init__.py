"""Integrations of kvxfer with serving engines (each needs its engine installed)."""
