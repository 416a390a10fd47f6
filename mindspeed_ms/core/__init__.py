"""Core building blocks: configs, communication, parallel state and the parallel layers."""
