"""The engine: model sources to a loaded pipeline, memory modes, generation (spec -> frames), video
encoding, and the one compat module that touches diffusers' and peft's private names."""
