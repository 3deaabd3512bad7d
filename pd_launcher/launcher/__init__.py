"""The node launcher: `python -m pd_launcher run|stop|wait` (see README.md here).

Standard library only, Python >= 3.9: it runs inside arbitrary engine images.
Exit codes: 0 ok, 1 a child exited / launcher gone, 2 usage or bad spec,
3 node check failed (nothing started), 4 wait timed out, 5 already running.
"""
