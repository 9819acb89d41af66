"""``make gpu-check``: Longhaul's GPU path run for real, checked from outside.

``python3 -m benchmarks.gpu_check`` (standard library only until the machine is prepared): on a
machine without a CUDA GPU it says so in one line and exits 0. On one with a GPU it installs the
pinned runtime dependencies the machine lacks from a folder of wheels (``env``), then runs
``check`` with them: the tiny store built and served by ``python -m service`` on loopback, each
model's provider and fallback read from ``/v1/models``, GPU against CPU outputs at several
lengths (``compare``), encode and generation throughput, one summary table and its JSON.
"""
