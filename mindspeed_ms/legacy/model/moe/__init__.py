"""Mixture of experts: router, token dispatcher, experts and the MoE layer."""
