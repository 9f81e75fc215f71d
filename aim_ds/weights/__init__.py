"""The weights room: checkpoints, ZeRO shards read without unpickling code, exports, the ml-aim
key mapping, and the frozen trunk a probe runs. Built on :mod:`aim_ds.model`; see ARCHITECTURE.md.
"""
