"""``influencekit.widgets``: Jupyter widgets for exploring influence results.

Not built yet: a later issue. ``InfluenceResult`` already holds everything they will show.
"""
