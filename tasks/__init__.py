"""Learnable constraint networks (critic, segmentation, detection) with their losses and evaluation."""
