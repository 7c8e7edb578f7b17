"""GPU floor of the Wan 2.1 I2V service: generation contract, model loading, LoRAs, replicas.

Nothing here imports ``serve_app``; ``spec``, ``errors``, ``config`` and ``generator`` import no torch so the
ingress can share them.
"""
