"""Curation: score, filter, dedup and balance image-text pairs (``clipforge curate run|filter|report``).

Stages are batch functions registered by name (:mod:`clipforge.curate.stages`); the local engine
(:mod:`clipforge.curate.engine`) and the Ray engine (:mod:`clipforge.curate.ray_engine`) run the same
ones. Filters (:mod:`clipforge.curate.filter`) are safe expressions over the score columns.
"""
