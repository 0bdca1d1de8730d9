"""Hugging Face interoperability: export checkpoints to transformers, initialise from transformers models.

* ``trainrun-export`` (:mod:`trainrun.export.export`) writes a checkpoint as a transformers model directory.
* ``model.init_from`` (:mod:`trainrun.export.import_hf`) loads a Llama- or GPT-2-style model's weights.
* :mod:`trainrun.export.hf_mapping` is the one table both directions read (no torch, no transformers).

Nothing here imports transformers; safetensors is imported only when weights are read or written.
"""
