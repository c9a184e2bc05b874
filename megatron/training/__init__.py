"""Training: the loop (``loop.pretrain``), the data iterators (``data``), the learning-rate
schedule (``schedule``), exit conditions (``exit``), FLOPs and MFU (``flops``), timers, what a run
logs (``log``) and how an entry point ends (``entry``).

Import from the modules (``from megatron.training.loop import pretrain``): the backends use the
schedule, and the loop uses the backends.
"""
