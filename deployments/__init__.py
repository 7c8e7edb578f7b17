"""GPU floor of the Wan 2.1 I2V service, in rooms by concern: ``lora/``, ``speed/``, ``parallel/``,
``engine/`` (the pipeline; ``engine/compat.py`` holds every private diffusers/peft name) and ``replica/``.

The modules at this level (``spec``, ``errors``, ``config``, ``generator``, ``fetch``, ``joblog``) are the
torch-free base both floors share; ``contract`` re-exports what ``serve_app`` needs and is the only module
it imports. Nothing here imports ``serve_app``.
"""
