"""pd-deploy's node package: the launcher (`python -m pd_launcher run|stop|wait`), the
proxy agent and the engine emulator. Standard library only, except the emulator
(aiohttp); tests/unit/test_layout.py enforces it. This is what the nodes receive.
"""
