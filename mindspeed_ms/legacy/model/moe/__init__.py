"""Mixture of experts: router, token dispatcher, experts, the MoE layer and cold/hot experts.

Modules (import paths as in the reference API):

* :mod:`.router` - :class:`~.router.TopKRouter`
* :mod:`.token_dispatcher` - :class:`~.token_dispatcher.MoEAlltoAllTokenDispatcher`
* :mod:`.experts` - :class:`~.experts.SequentialMLP`, :class:`~.experts.GroupedMLP`
* :mod:`.moe_layer` - :class:`~.moe_layer.MoELayer`
* :mod:`.cold_hot` - :class:`~.cold_hot.ColdHotExpertMonitor`
* :mod:`.moe_utils` - auxiliary-loss scaling and the per-step collection API for the training loop

See docs/moe.md.
"""
