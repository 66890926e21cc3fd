"""Prefect flows: the end-to-end `fuse` flow, one flow per stage, and the scheduled `refusion`."""
