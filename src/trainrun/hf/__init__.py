"""Hugging Face interoperability: export checkpoints to transformers, initialise from transformers models.

* :mod:`~trainrun.hf.mapping`: the one table both directions read, tensor by tensor (no torch, no transformers);
* :mod:`~trainrun.hf.config`: a transformers ``config.json``, written for an export and read for
  ``model.init_from`` (:func:`~trainrun.hf.config.resolve_init_from`, a step of the run's start-up);
* :mod:`~trainrun.hf.safetensors_io`: the weight files: which file holds which tensor, reading boxes, writing shards;
* :mod:`~trainrun.hf.tokenizer`: the data's tokenizer as files ``AutoTokenizer`` loads;
* :mod:`~trainrun.hf.import_weights`: ``model.init_from``, each rank loading its own shards;
* :mod:`~trainrun.hf.export`: ``trainrun-export``, a checkpoint as a transformers model directory.

Nothing here imports transformers; safetensors is imported only when weights are read or written.
"""
