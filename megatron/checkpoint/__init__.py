"""Checkpoints: the files and directories (``layout``), saving and loading a training run
(``protocol``), the RNG states they carry (``rng``), and offline reading, conversion and
resharding without a process group (``convert``)."""
