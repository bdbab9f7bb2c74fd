"""Data x tensor x pipeline parallelism over the plain model (see ../shared/DESIGN.md sections 3-4).

Nothing is built here yet: training runs on one process. ``model/`` never imports this package.
"""
